"""Checkpoints of GPT-2 (models/gpt2.py): q, k, v already stacked in `c_attn`, linear weights stored
as Conv1D [in, out], and original checkpoints whose names lack the "transformer." prefix."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from glassbox.config import ModelConfig
from glassbox.models.checkpoint_format import CheckpointFormat, hf_eos_token_ids
from glassbox.models.gguf_reader import GGUFFile

# Causal-mask buffers that old GPT-2 checkpoints save beside the parameters.
_MASK_BUFFERS = re.compile(r"(^|\.)attn\.(masked_)?bias$")
# Conv1D weights ([in, out] in Hugging Face checkpoints, [out, in] in llama.cpp's).
_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class GPT2Checkpoint(CheckpointFormat):
    architecture = "gpt2"
    model_class_path = "glassbox.models.gpt2:GPT2LMHeadModel"
    hf_model_types = ("gpt2",)
    packed_modules_mapping = {}  # the checkpoint already stacks q, k, v in c_attn
    layer_prefix = "transformer.h"
    gguf_architecture = "gpt2"
    gguf_layer_names = {
        "attn_norm": "ln_1",
        "attn_qkv": "attn.c_attn",
        "attn_output": "attn.c_proj",
        "ffn_norm": "ln_2",
        "ffn_up": "mlp.c_fc",
        "ffn_down": "mlp.c_proj",
    }
    gguf_global_names = {
        "token_embd": "transformer.wte",
        "position_embd": "transformer.wpe",
        "output_norm": "transformer.ln_f",
        "output": "lm_head",
    }

    def config_from_hf(self, hf: dict[str, Any]) -> ModelConfig:
        hidden = hf["n_embd"]
        return ModelConfig(
            architecture=self.architecture,
            model_type=hf["model_type"],
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf.get("n_inner") or 4 * hidden,
            num_hidden_layers=hf["n_layer"],
            num_attention_heads=hf["n_head"],
            num_key_value_heads=hf["n_head"],
            head_dim=hidden // hf["n_head"],
            max_position_embeddings=hf["n_positions"],
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            hidden_act=hf.get("activation_function", "gelu_new"),
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=hf_eos_token_ids(hf),
        )

    def config_from_gguf(self, gguf: GGUFFile) -> ModelConfig:
        fields = self.gguf_common_fields(gguf)
        return ModelConfig(
            **fields,
            num_key_value_heads=fields["num_attention_heads"],
            head_dim=fields["hidden_size"] // fields["num_attention_heads"],
            norm_eps=float(self.gguf_metadata(gguf, "attention.layer_norm_epsilon", 1e-5)),
            hidden_act="gelu_new",
        )

    def parameter_name(self, checkpoint_name: str) -> str | None:
        if _MASK_BUFFERS.search(checkpoint_name):
            return None
        if checkpoint_name.startswith(("transformer.", "lm_head.")):
            return checkpoint_name
        return "transformer." + checkpoint_name  # original GPT-2 checkpoints have no prefix

    def gguf_tensor(self, name: str, array: np.ndarray, config: ModelConfig) -> np.ndarray:
        return array.T if name.endswith(_CONV1D_WEIGHTS) else array

    def gguf_tensor_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(reversed(shape)) if name.endswith(_CONV1D_WEIGHTS) else shape


GPT2 = GPT2Checkpoint()
