"""The Llama family: Llama 2/3, SmolLM2, TinyLlama, Mistral — and Qwen2 (q/k/v bias) and Qwen3 (q/k RMSNorm),
which differ from Llama only by the two `ModelConfig` flags `attention_bias` and `qk_norm`.

Parameter names are Hugging Face's, except that q/k/v and gate/up are stacked into `qkv_proj` and
`gate_up_proj` (one matmul each), as `packed_modules_mapping` says; how checkpoints are named and read is
the class's `checkpoint_format` (models/llama_checkpoint.py). The model is plain: attention goes through
`layers.attention.Attention`, whose backend and KV cache are set from outside, and its parts (`embed`,
`layers`, `final_norm`, `compute_logits`; per layer `attention_residual` and `mlp_residual`) are what the
engine's executors and the research tools run piece by piece.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from glassbox.config import ModelConfig
from glassbox.layers.attention import Attention, AttentionMetadata
from glassbox.layers.norm import RMSNorm
from glassbox.layers.rotary import RotaryEmbedding, apply_rotary
from glassbox.models.checkpoint_format import CheckpointFormat, PackedModulesMapping
from glassbox.models.llama_checkpoint import LLAMA, QWEN2, QWEN3


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        # q_proj, k_proj and v_proj of the checkpoint, stacked: one matmul instead of three.
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.output_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
        self.qk_norm = config.qk_norm
        self.attn = Attention(
            self.num_heads, self.num_kv_heads, self.head_dim, layer_idx, sliding_window=config.layer_windows[layer_idx]
        )

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        # x: [T, hidden]
        return self.o_proj(self.attend(self.qkv_proj(x), cos, sin, meta))

    def attend(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """qkv [T, q_size + 2 * kv_size] (the fused projection) -> attention output [T, q_size]."""
        num_tokens = qkv.shape[0]
        if self.qk_norm:
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = apply_rotary(self.q_norm(q.view(num_tokens, self.num_heads, self.head_dim)), cos, sin)
            k = apply_rotary(self.k_norm(k.view(num_tokens, self.num_kv_heads, self.head_dim)), cos, sin)
        else:
            # q and k heads side by side, rotated in one go: [T, heads + kv_heads, head_dim]
            qk = apply_rotary(qkv[:, : self.q_size + self.kv_size].view(num_tokens, -1, self.head_dim), cos, sin)
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        v = qkv[:, self.q_size + self.kv_size :].view(num_tokens, self.num_kv_heads, self.head_dim)
        out = self.attn(q, k, v, meta)  # [T, heads, head_dim]
        return out.reshape(num_tokens, self.q_size)


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # gate_proj and up_proj of the checkpoint, stacked.
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = LlamaMLP(config)

    @property
    def input_norm(self) -> RMSNorm:
        return self.input_layernorm

    @property
    def post_norm(self) -> RMSNorm:
        return self.post_attention_layernorm

    @property
    def attention(self) -> LlamaAttention:
        return self.self_attn

    def attention_residual(
        self, x: torch.Tensor, layer_args: tuple[torch.Tensor, ...], meta: AttentionMetadata
    ) -> torch.Tensor:
        """x [T, hidden] + attention(input_norm(x)); layer_args: (cos, sin) from LlamaForCausalLM.embed."""
        return x + self.self_attn(self.input_layernorm(x), *layer_args, meta)

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] + mlp(post_norm(x))."""
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        # attention_residual then mlp_residual, written out in one frame: torch.compile (engine/executors.py)
        # resumes after attention's graph break in this frame, so the residual add fuses with the next norm.
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The decoder stack's modules under their checkpoint names (model.embed_tokens, model.layers.N,
    model.norm); LlamaForCausalLM runs them."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # _weight skips the random init (slow on the meta device, and the loader overwrites it anyway).
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size, _weight=torch.empty(config.vocab_size, config.hidden_size)
        )
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.rotary_emb = RotaryEmbedding(
            config.head_dim, config.rope_theta, config.rope_scaling, config.rope_freq_factors
        )


class LlamaForCausalLM(nn.Module):
    checkpoint_format: ClassVar[CheckpointFormat] = LLAMA
    packed_modules_mapping: ClassVar[PackedModulesMapping] = LLAMA.packed_modules_mapping

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def final_norm(self) -> RMSNorm:
        return self.model.norm

    @property
    def embedding(self) -> nn.Embedding:
        return self.model.embed_tokens

    def embed(
        self, input_ids: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """input_ids, positions [T] -> hidden [T, hidden] and every layer's extra inputs: the rotary
        (cos, sin) [T, 1, head_dim], in the hidden states' dtype, computed once for all layers."""
        x = self.model.embed_tokens(input_ids)
        return x, self.model.rotary_emb(positions, x.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T] (flattened batch) -> final hidden states [T, hidden]."""
        x, layer_args = self.embed(input_ids, positions)
        for layer in self.layers:
            x = layer(x, *layer_args, meta)
        return self.final_norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab]; the engine calls it on the rows it samples from only."""
        return self.lm_head(hidden)


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2: Llama with biases on q, k and v (config.attention_bias)."""

    checkpoint_format = QWEN2


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3: Llama with an RMSNorm on each head of q and k before RoPE (config.qk_norm)."""

    checkpoint_format = QWEN3
