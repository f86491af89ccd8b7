"""Layers whose rows do not depend on the batch: swapped in for a model's linears, RMSNorms and attention
backend from outside the model file (engine/batch_invariant.py), on CUDA, for `EngineConfig(batch_invariant=
True)`.

A request's logits move with the batch when a kernel's reduction order depends on how many rows it got:
cuBLAS picks a tile shape, instruction and split-K by M; the split-K decode kernel splits a sequence's keys
by the batch size; a decode row that shares its step with a prefill chunk goes through the prefill kernel
instead. Here every reduction is fixed per row (Thinking Machines, "Defeating Nondeterminism in LLM
Inference", 2025; vLLM's batch-invariant mode):
- linears: kernels/matmul_triton.py, one configuration per weight shape, no split-K, M not specialized;
- RMSNorm: kernels/rms_norm_triton.py, one program per row;
- attention: every row, prefill or decode, through the prefill kernel, whose key tiles start at position 0
  whatever the chunk or batch (no split-K).
The elementwise work between them (rotary, SiLU·mul, residual adds) and the gathers (embedding, sampled
rows) are exact per element. CUDA graphs then replay the same kernels, and padding rows are rows of their
own.

The modules keep the originals' parameters (the same tensors: a tied head stays tied) and their classes
(isinstance checks of nn.Linear and RMSNorm still hold).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from glassbox.kernels import attention_torch
from glassbox.layers.attention import Attention, AttentionMetadata, TritonAttentionBackend
from glassbox.layers.norm import RMSNorm


class BatchInvariantLinear(nn.Linear):
    """nn.Linear on the batch-invariant Triton matmul: row i of the output is the same bits for any M."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> BatchInvariantLinear:
        new = cls(linear.in_features, linear.out_features, bias=False, device="meta")  # no storage of its own
        new.weight = linear.weight
        new.bias = linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from glassbox.kernels import matmul_triton  # Triton is imported by the GPU path only

        return matmul_triton.linear(x, self.weight, self.bias)


class BatchInvariantRMSNorm(RMSNorm):
    """RMSNorm with one Triton program per row (x [T, D] or per head [T, H, D])."""

    @classmethod
    def from_norm(cls, norm: RMSNorm) -> BatchInvariantRMSNorm:
        new = cls(norm.weight.shape[0], norm.eps)
        new.weight = norm.weight
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from glassbox.kernels import rms_norm_triton

        return rms_norm_triton.rms_norm(x, self.weight, self.eps)


class BatchInvariantAttentionBackend(TritonAttentionBackend):
    """The Triton backend with every row through the prefill kernel: a decode row alone, in a batch of
    decodes, or beside a prefill chunk is computed by the same program over the same key tiles. (The
    default backend's decode kernel splits a sequence's keys by the batch size and adds the query's own key
    last.) The readable path still serves cache-less forwards, probability capture and masked rows."""

    def _attend_eagerly(
        self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        probe = meta.probe
        if meta.slot_mapping is None or (probe is not None and layer.layer_idx in probe.capture_layers):
            return self.reference.forward(layer, q, k, v, meta)
        k_cache, v_cache = layer.k_cache, layer.v_cache
        self.kernels.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = self.kernels.prefill_attention(
            q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.context_lens,
            meta.max_query_len, layer.scale, layer.sliding_window, batch_invariant=True,
        )  # fmt: skip
        starts = meta.query_start_loc_list
        for i, state in (probe.masks.items() if probe is not None else ()):
            rows = slice(starts[i], starts[i + 1])
            out[rows], _ = attention_torch.attend_cached(
                q[rows], k_cache, v_cache, meta.block_tables[i], meta.context_lens_list[i], layer.scale,
                layer.sliding_window, select=partial(state.select, layer.layer_idx),
            )  # fmt: skip
        return out


def is_batch_invariant(model: nn.Module) -> bool:
    """Whether engine/batch_invariant.py converted this model's layers (read off its modules)."""
    return any(isinstance(m, BatchInvariantLinear) for m in model.modules())
