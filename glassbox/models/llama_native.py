"""The Llama decoder layers' forward on the native CPU kernels (kernels/cpu/), for block-quantized weights
(layers/quantized_linear.QLinear) and float32 activations.

The same computation as `LlamaDecoderLayer.forward`, in five kernel calls instead of ~30 tensor ops — on a
2-core CPU a batch-1 decode step was bound by dispatching its ~900 ops, not by its arithmetic:

    qkv = qkv_proj(rms_norm(x))             one call: the norm is the quantized GEMM's prologue
    a   = attention(rotary(qkv))            one call (rotary, KV store, paged attention) for a float32 or
                                            bfloat16 cache; the model's own `attend` for others (fp8)
    x   = x + o_proj(a)                     one call: the residual is the GEMM's epilogue
    x   = x + down(silu_mul(gate_up(rms_norm(x))))    two calls

and, where every layer's attention is native, all the layers in one call (NativeStack). Not installed into
the model: the runner's native executors (engine/executors.py) call these for the steps their plan gives
them; the plain forward stays for the others (sparsity masks, attention capture, latency timers,
cache-less forwards), and is the oracle the tests hold this one to.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from glassbox.kernels import cpu_native
from glassbox.layers.attention import AttentionMetadata
from glassbox.layers.quantized_linear import QLinear
from glassbox.models.llama import LlamaDecoderLayer


def supported(model: nn.Module) -> bool:
    """Whether every decoder layer is a Llama-family layer whose four projections run the native kernel
    (Qwen3's q/k norms excluded)."""
    layers = [m for m in model.modules() if isinstance(m, LlamaDecoderLayer)]
    return bool(layers) and all(_supported_layer(layer) for layer in layers)


def _supported_layer(layer: LlamaDecoderLayer) -> bool:
    if layer.self_attn.qk_norm:
        return False
    projections = (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
    return all(isinstance(p, QLinear) and p.native for p in projections)


def layer_forward(
    layer: LlamaDecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata
) -> torch.Tensor:
    """x [T, hidden] float32 -> [T, hidden], as layer.forward."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv = attn.qkv_proj.forward_fused(x, prologue="rms_norm", norm=layer.input_layernorm)
    cache = attn.attn.k_cache
    if meta.slot_mapping is not None and cache is not None and cache.dtype in cpu_native.CACHE_DTYPES:
        num_tokens, head_dim, layer_idx = qkv.shape[0], attn.head_dim, attn.attn.layer_idx
        quest = meta.quest
        out = cpu_native.paged_attention(
            qkv, cos.view(num_tokens, head_dim), sin.view(num_tokens, head_dim), cache, attn.attn.v_cache,
            meta.slot_mapping, meta.query_start_loc, meta.block_tables, meta.context_lens, attn.num_heads,
            attn.attn.scale, attn.attn.sliding_window,
            quest_summaries=None if quest is None else quest.summaries[layer_idx],
            top_blocks=None if quest is None else quest.budgets(layer_idx),
        )  # fmt: skip
    else:
        out = attn.attend(qkv, cos, sin, meta)
    x = attn.o_proj.forward_fused(out, residual=x)
    gate_up = mlp.gate_up_proj.forward_fused(x, prologue="rms_norm", norm=layer.post_attention_layernorm)
    return mlp.down_proj.forward_fused(gate_up, residual=x, prologue="silu_mul")


class NativeStack:
    """The model's forward with every decoder layer in one native call (kernels/cpu/llama_layers.c): the
    same kernels as `layer_forward` above, without going back to Python ~150 times a step. For steps over
    a cache of a CACHE_DTYPES dtype; the layer-by-layer forward otherwise.

    The kernel reads the layers' weights and caches through pointers, gathered once into a table; the
    table is rebuilt when another KV pool (or Quest's block summaries, engine/quest.py) is bound to the
    model (engine/kv_cache.bind). Only the caches' addresses are kept to notice that: the model must not
    keep a dropped pool alive."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers = list(model.layers)
        self.attns = [layer.self_attn.attn for layer in self.layers]
        first = self.layers[0].self_attn
        # (hidden, intermediate, heads, kv heads, head_dim); the block size comes with the caches
        self.dims = (
            model.embedding.embedding_dim, self.layers[0].mlp.gate_up_proj.out_features // 2, first.num_heads,
            first.num_kv_heads, first.head_dim,
        )  # fmt: skip
        self.eps, self.scale = self.layers[0].input_layernorm.eps, first.attn.scale
        self.table: ctypes.Array | None = None
        self.table_caches: tuple[int, ...] = ()  # the caches' addresses in the table

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, hidden], as the model's forward."""
        cache = self.attns[0].k_cache
        summaries = None if meta.quest is None else meta.quest.summaries
        caches = (*(t.data_ptr() for a in self.attns for t in (a.k_cache, a.v_cache)), summaries is not None and summaries.data_ptr())
        if caches != self.table_caches:
            self.table, self.table_caches = self._table(summaries), caches
        x, (cos, sin) = self.model.embed(input_ids, positions)
        dims = (*self.dims, cache.shape[1])
        cpu_native.llama_layers(
            self.table, dims, self.eps, self.scale, cache.dtype, x, cos, sin, meta.slot_mapping,
            meta.query_start_loc, meta.block_tables, meta.context_lens,
            None if meta.quest is None else meta.quest.top_blocks, meta.observe,
        )  # fmt: skip
        return self.model.final_norm(x)

    def _table(self, summaries: torch.Tensor | None) -> ctypes.Array:
        """summaries: Quest's [num_layers, num_blocks, KV, 2, D] block summaries, or None."""
        def ptr(t: torch.Tensor | None) -> int | None:
            return None if t is None else t.data_ptr()

        rows = []
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            rows.append(cpu_native.LlamaLayer(
                ptr(layer.input_layernorm.weight), ptr(layer.post_attention_layernorm.weight),
                *(p.qweight() for p in linears), ptr(attn.attn.k_cache), ptr(attn.attn.v_cache),
                attn.attn.sliding_window or 0, None if summaries is None else ptr(summaries[layer.self_attn.attn.layer_idx]),
            ))  # fmt: skip
        return (cpu_native.LlamaLayer * len(rows))(*rows)
