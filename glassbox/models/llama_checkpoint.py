"""Checkpoints of the Llama family (models/llama.py): Llama 2/3, SmolLM2, TinyLlama, Mistral, and Qwen2
and Qwen3, which store the same tensors under the same names and differ in two config flags."""

from __future__ import annotations

from typing import Any

import numpy as np

from glassbox.config import ModelConfig
from glassbox.models.checkpoint_format import CheckpointFormat, hf_eos_token_ids
from glassbox.models.gguf_reader import GGUFFile


class LlamaCheckpoint(CheckpointFormat):
    architecture = "llama"
    model_class_path = "glassbox.models.llama:LlamaForCausalLM"
    hf_model_types = ("llama", "mistral")
    # q/k/v and gate/up of the checkpoint, each pair or triple stacked into one matmul
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    layer_prefix = "model.layers"
    gguf_architecture = "llama"
    gguf_layer_names = {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    gguf_global_names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    # llama.cpp's converter interleaves the two rotary halves of each head in q_proj and k_proj of "llama"
    # files (its RoPE rotates adjacent pairs); Qwen2/3 files keep Hugging Face's order.
    gguf_permutes_qk = True
    qk_norm = False  # RMSNorm over head_dim on q and k before RoPE

    def attention_biases(self, hf: dict[str, Any]) -> tuple[bool, bool]:
        """(bias on q/k/v, bias on o_proj): Llama's `attention_bias` covers all four projections."""
        bias = bool(hf.get("attention_bias") or False)
        return bias, bias

    def config_from_hf(self, hf: dict[str, Any]) -> ModelConfig:
        # transformers 5 keeps RoPE settings in `rope_parameters`; 4 in rope_theta + rope_scaling.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        rope_scaling = rope if rope.get("rope_type", "default") != "default" else None
        num_heads = hf["num_attention_heads"]
        num_layers = hf["num_hidden_layers"]
        attention_bias, output_bias = self.attention_biases(hf)
        return ModelConfig(
            architecture=self.architecture,
            model_type=hf["model_type"],
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            hidden_act=hf.get("hidden_act", "silu"),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            output_bias=output_bias,
            qk_norm=self.qk_norm,
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            layer_windows=_layer_windows(hf, num_layers),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=hf_eos_token_ids(hf),
        )

    def parameter_name(self, checkpoint_name: str) -> str | None:
        # older transformers saved the rotary inverse frequencies; ours are computed (layers/rotary.py)
        return None if checkpoint_name.endswith(".rotary_emb.inv_freq") else checkpoint_name

    def config_from_gguf(self, gguf: GGUFFile) -> ModelConfig:
        fields = self.gguf_common_fields(gguf)
        num_heads = fields["num_attention_heads"]
        tensors = {t.name: t for t in gguf.tensors}
        rope_scaling = None
        if self.gguf_metadata(gguf, "rope.scaling.type") == "linear":
            rope_scaling = {"rope_type": "linear", "factor": float(self.gguf_metadata(gguf, "rope.scaling.factor"))}
        # Llama 3.x files store the llama3 RoPE scaling as per-frequency divisors in `rope_freqs.weight`.
        rope_freqs = tensors.get("rope_freqs.weight")
        return ModelConfig(
            **fields,
            num_key_value_heads=int(self.gguf_metadata(gguf, "attention.head_count_kv", num_heads)),
            head_dim=int(self.gguf_metadata(gguf, "attention.key_length", fields["hidden_size"] // num_heads)),
            norm_eps=float(self.gguf_metadata(gguf, "attention.layer_norm_rms_epsilon", 1e-6)),
            attention_bias="blk.0.attn_q.bias" in tensors,
            output_bias="blk.0.attn_output.bias" in tensors,
            qk_norm=self.qk_norm,
            rope_theta=float(self.gguf_metadata(gguf, "rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            rope_freq_factors=None if rope_freqs is None else rope_freqs.dequantize().tolist(),
        )

    def gguf_tensor(self, name: str, array: np.ndarray, config: ModelConfig) -> np.ndarray:
        if self.gguf_permutes_qk and name.endswith("self_attn.q_proj.weight"):
            return _unpermute(array, config.num_attention_heads)
        if self.gguf_permutes_qk and name.endswith("self_attn.k_proj.weight"):
            return _unpermute(array, config.num_key_value_heads)
        return array


class Qwen2Checkpoint(LlamaCheckpoint):
    architecture = "qwen2"
    model_class_path = "glassbox.models.llama:Qwen2ForCausalLM"
    hf_model_types = ("qwen2",)
    gguf_architecture = "qwen2"
    gguf_permutes_qk = False

    def attention_biases(self, hf: dict[str, Any]) -> tuple[bool, bool]:
        return True, False  # always biased q/k/v, o_proj never (its config.json has no attention_bias)


class Qwen3Checkpoint(LlamaCheckpoint):
    architecture = "qwen3"
    model_class_path = "glassbox.models.llama:Qwen3ForCausalLM"
    hf_model_types = ("qwen3",)
    gguf_architecture = "qwen3"
    gguf_permutes_qk = False
    qk_norm = True

    def attention_biases(self, hf: dict[str, Any]) -> tuple[bool, bool]:
        return bool(hf.get("attention_bias") or False), False


LLAMA, QWEN2, QWEN3 = LlamaCheckpoint(), Qwen2Checkpoint(), Qwen3Checkpoint()


def _layer_windows(hf: dict[str, Any], num_layers: int) -> list[int | None]:
    """Sliding-window size per layer: Mistral applies `sliding_window` to every layer; Qwen2/3 name
    the windowed layers in `layer_types` (only when `use_sliding_window` is on)."""
    window = hf.get("sliding_window")
    if not window or hf.get("use_sliding_window") is False:
        return [None] * num_layers
    layer_types = hf.get("layer_types")
    if layer_types:
        return [window if t == "sliding_attention" else None for t in layer_types]
    return [window] * num_layers


def _unpermute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: [heads * head_dim, in] with each head's rows in rotary pairs
    (0, half, 1, half + 1, ...) back to Hugging Face's two halves."""
    rows = weight.shape[0]
    return (
        weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )
