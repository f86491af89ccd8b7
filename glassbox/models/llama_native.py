"""The Llama decoder layer's forward on the native CPU kernels (kernels/cpu/), for int8 weights in float32.

The same computation as `LlamaDecoderLayer.forward`, in five kernel calls instead of ~30 tensor ops — on a
2-core CPU a batch-1 decode step was bound by dispatching its ~900 ops, not by its arithmetic:

    qkv = qkv_proj(rms_norm(x))             one call: the norm is the int8 GEMM's prologue
    a   = attention(rotary(qkv))            one call (rotary, KV store, paged attention), for decode tokens
                                            and prefill chunks of up to NATIVE_ATTENTION_MAX_QUERY tokens;
                                            the model's own `attend` for longer chunks
    x   = x + o_proj(a)                     one call: the residual is the GEMM's epilogue
    x   = x + down(silu_mul(gate_up(rms_norm(x))))    two calls

Applied from outside (engine/optimize.py) as the layer's forward for the steps whose metadata says
`native`; the plain forward stays for the others (sparsity masks, attention capture, latency timers,
cache-less forwards), and is the oracle the tests hold this one to.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from glassbox.kernels import cpu_native
from glassbox.layers.attention import AttentionMetadata
from glassbox.layers.quantized_linear import Int8Linear
from glassbox.models.llama import LlamaDecoderLayer

# The native kernel computes a query's scores key by key; over a longer chunk, PyTorch's blocked
# attention (matrix products over the whole chunk) is faster.
NATIVE_ATTENTION_MAX_QUERY = 256


def supported(layer: nn.Module) -> bool:
    """A Llama-family layer whose four projections run the native int8 kernel (Qwen3's q/k norms excluded)."""
    if not isinstance(layer, LlamaDecoderLayer) or layer.self_attn.qk_norm:
        return False
    projections = (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
    return all(isinstance(p, Int8Linear) and p.native for p in projections)


def forward(
    layer: LlamaDecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata
) -> torch.Tensor:
    """x [T, hidden] float32 -> [T, hidden], as layer.forward."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv = attn.qkv_proj.forward_fused(x, prologue="rms_norm", norm=layer.input_layernorm)
    cache = attn.attn.k_cache
    if cache is not None and cache.dtype in cpu_native.CACHE_DTYPES and meta.max_query_len <= NATIVE_ATTENTION_MAX_QUERY:
        num_tokens, head_dim = qkv.shape[0], attn.head_dim
        out = cpu_native.paged_attention(
            qkv, cos.view(num_tokens, head_dim), sin.view(num_tokens, head_dim), cache, attn.attn.v_cache,
            meta.slot_mapping, meta.query_start_loc, meta.block_tables, meta.context_lens, attn.num_heads,
            attn.attn.scale, attn.attn.sliding_window,
        )  # fmt: skip
    else:
        out = attn.attend(qkv, cos, sin, meta)
    x = attn.o_proj.forward_fused(out, residual=x)
    gate_up = mlp.gate_up_proj.forward_fused(x, prologue="rms_norm", norm=layer.post_attention_layernorm)
    return mlp.down_proj.forward_fused(gate_up, residual=x, prologue="silu_mul")


def install(model: nn.Module) -> bool:
    """Give every supported decoder layer a forward that takes the native path when the step's metadata
    says `native`. Returns whether every layer got one (the runner then marks its steps native)."""
    layers = [m for m in model.modules() if isinstance(m, LlamaDecoderLayer)]
    if not layers or not all(supported(layer) for layer in layers):
        return False
    for layer in layers:
        layer.forward = _dispatch(layer, layer.forward)
    return True


def _dispatch(layer: LlamaDecoderLayer, eager: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def dispatching_forward(
        x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        return forward(layer, x, cos, sin, meta) if meta.native else eager(x, cos, sin, meta)

    return dispatching_forward
