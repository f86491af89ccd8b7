"""The Llama decoder layers' forward on the native CPU kernels (kernels/cpu/), for int8 weights in float32.

The same computation as `LlamaDecoderLayer.forward`, in five kernel calls instead of ~30 tensor ops — on a
2-core CPU a batch-1 decode step was bound by dispatching its ~900 ops, not by its arithmetic:

    qkv = qkv_proj(rms_norm(x))             one call: the norm is the int8 GEMM's prologue
    a   = attention(rotary(qkv))            one call (rotary, KV store, paged attention) for a float32 or
                                            bfloat16 cache; the model's own `attend` for others (fp8)
    x   = x + o_proj(a)                     one call: the residual is the GEMM's epilogue
    x   = x + down(silu_mul(gate_up(rms_norm(x))))    two calls

and, where every layer's attention is native, all the layers in one call (NativeStack). Applied from
outside (engine/optimize.py) for the steps whose metadata says `native`; the plain forward stays for the
others (sparsity masks, attention capture, latency timers, cache-less forwards), and is the oracle the
tests hold this one to.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch
from torch import nn

from glassbox.kernels import cpu_native
from glassbox.layers.attention import AttentionMetadata
from glassbox.layers.quantized_linear import Int8Linear
from glassbox.models.llama import LlamaDecoderLayer, LlamaModel


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
    if meta.slot_mapping is not None and cache is not None and cache.dtype in cpu_native.CACHE_DTYPES:
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
    says `native`, and the decoder stack one that runs all its layers in one native call where the step
    allows (NativeStack). Returns whether every layer got one (the runner then marks its steps native)."""
    layers = [m for m in model.modules() if isinstance(m, LlamaDecoderLayer)]
    if not layers or not all(supported(layer) for layer in layers):
        return False
    for layer in layers:
        layer.forward = _dispatch(layer, layer.forward)
    for stack in (m for m in model.modules() if isinstance(m, LlamaModel)):
        stack.forward = NativeStack(stack, stack.forward)
    return True


def _dispatch(layer: LlamaDecoderLayer, eager: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def dispatching_forward(
        x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        return forward(layer, x, cos, sin, meta) if meta.native else eager(x, cos, sin, meta)

    return dispatching_forward


class NativeStack:
    """LlamaModel's forward with every decoder layer in one native call (kernels/cpu/llama_layers.c): the
    same kernels as `forward` above, without going back to Python ~150 times a step. Taken for native
    steps with a cache of a CACHE_DTYPES dtype; the layer-by-layer forward otherwise.

    The kernel reads the layers' weights and caches through pointers, gathered once into a table; the
    table is rebuilt when another KV pool is bound to the model (engine/kv_cache.bind). Only the caches'
    addresses are kept to notice that: the model must not keep a dropped pool alive."""

    def __init__(self, stack: LlamaModel, eager: Callable[..., torch.Tensor]) -> None:
        self.stack, self.eager = stack, eager
        self.layers = list(stack.layers)
        self.attns = [layer.self_attn.attn for layer in self.layers]
        first = self.layers[0].self_attn
        # (hidden, intermediate, heads, kv heads, head_dim); the block size comes with the caches
        self.dims = (
            stack.embed_tokens.embedding_dim, self.layers[0].mlp.gate_up_proj.out_features // 2, first.num_heads,
            first.num_kv_heads, first.head_dim,
        )  # fmt: skip
        self.eps, self.scale = self.layers[0].input_layernorm.eps, first.attn.scale
        self.table: ctypes.Array | None = None
        self.table_caches: tuple[int, ...] = ()  # the caches' addresses in the table

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        cache = self.attns[0].k_cache
        native = meta.native and meta.slot_mapping is not None and cache is not None
        if not native or cache.dtype not in cpu_native.CACHE_DTYPES:
            return self.eager(input_ids, positions, meta)
        caches = tuple(t.data_ptr() for a in self.attns for t in (a.k_cache, a.v_cache))
        if caches != self.table_caches:
            self.table, self.table_caches = self._table(), caches
        x = self.stack.embed_tokens(input_ids)
        cos, sin = self.stack.rotary_emb(positions, x.dtype)
        dims = (*self.dims, cache.shape[1])
        cpu_native.llama_layers(
            self.table, dims, self.eps, self.scale, cache.dtype, x, cos, sin, meta.slot_mapping,
            meta.query_start_loc, meta.block_tables, meta.context_lens,
        )  # fmt: skip
        return self.stack.norm(x)

    def _table(self) -> ctypes.Array:
        def ptr(t: torch.Tensor | None) -> int | None:
            return None if t is None else t.data_ptr()

        rows = []
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            rows.append(cpu_native.LlamaLayer(
                ptr(layer.input_layernorm.weight), ptr(layer.post_attention_layernorm.weight),
                *(ptr(p.packed_weight) for p in linears), *(ptr(p.scale) for p in linears),
                *(ptr(p.bias) for p in linears), ptr(attn.attn.k_cache), ptr(attn.attn.v_cache),
                attn.attn.sliding_window or 0,
            ))  # fmt: skip
        return (cpu_native.LlamaLayer * len(rows))(*rows)
