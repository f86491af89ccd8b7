"""The one attention layer every model file uses, and the per-step metadata it reads.

A step's tokens are flattened: the new tokens of every sequence in the batch are concatenated into one
[num_tokens] stream (prefill chunks and decode tokens alike), and `AttentionMetadata` says where each
sequence starts, how long its context is and where its keys/values live in the paged KV cache.

The backend (how attention is computed) is chosen from outside: `set_attention_backend(model, backend)`.
The default `TorchAttentionBackend` is the readable CPU path and the reference for GPU kernels;
`TritonAttentionBackend` is the GPU path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import Protocol

import torch
from torch import nn

from glassbox.kernels import attention_torch
from glassbox.layers.probe import StepProbe


@dataclass
class QuestStep:
    """Quest's inputs to a step (engine/quest.py keeps the summaries): the decode tokens of sequences with a
    budget read only that many KV blocks, chosen per KV head by their keys' min/max bounds."""

    summaries: torch.Tensor  # [num_layers, num_blocks, KV, 2, D]: each block's key min and max
    top_blocks: torch.Tensor | None = None  # [num_layers, S] int32 budgets (0: all); None: every row reads all

    def budgets(self, layer_idx: int) -> torch.Tensor | None:
        return None if self.top_blocks is None else self.top_blocks[layer_idx]


@dataclass
class AttentionMetadata:
    """Everything attention needs to know about one step, passed down explicitly.

    Shapes: S = number of sequences in the step, T = total new tokens, B = max blocks per sequence.
    """

    query_start_loc: torch.Tensor  # [S + 1] int32: sequence i's new tokens are [start[i], start[i+1])
    context_lens: torch.Tensor  # [S] int32: tokens in the cache for sequence i after this step
    slot_mapping: torch.Tensor | None = None  # [T] int64: flat KV slot of each new token; None = no cache
    block_tables: torch.Tensor | None = None  # [S, B] int32 block ids, padded with -1
    # Host copies of the two length vectors, so the CPU path does not sync per layer.
    query_start_loc_list: list[int] = field(default_factory=list)
    context_lens_list: list[int] = field(default_factory=list)
    # Research inputs and outputs of this step (masks, captured probabilities): a separate object, None
    # when nothing is probed (layers/probe.py).
    probe: StepProbe | None = None
    # Quest's block summaries (kept up to date by the native CPU attention) and budgets, once an engine keeps
    # them (engine/quest.py); None otherwise.
    quest: QuestStep | None = None
    # The attention evicted caches' keys receive (H2O's history), written by the native stack: (rows [T]
    # int32: each token's row of out or -1, out [num_layers, R, KV, W] float32 zeros); None otherwise.
    observe: tuple[torch.Tensor, torch.Tensor] | None = None
    # Built by the first layer that needs it and reused by the others (see DecodeBatch).
    decode_batch: attention_torch.DecodeBatch | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.query_start_loc_list:
            self.query_start_loc_list = self.query_start_loc.tolist()
        if not self.context_lens_list:
            self.context_lens_list = self.context_lens.tolist()

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens_list)

    @cached_property  # read by every layer of a step
    def max_query_len(self) -> int:
        starts = self.query_start_loc_list
        return max(b - a for a, b in zip(starts, starts[1:]))

    @classmethod
    def for_prompts(cls, lengths: list[int], device: torch.device | str = "cpu") -> AttentionMetadata:
        """Metadata for a cache-less forward over whole prompts of the given lengths."""
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        return cls(
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            context_lens=torch.tensor(lengths, dtype=torch.int32, device=device),
            query_start_loc_list=starts,
            context_lens_list=list(lengths),
        )


_NO_PROBE = StepProbe()  # read, never written: a step without a probe masks and captures nothing


class AttentionBackend(Protocol):
    def forward(
        self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor: ...


class TorchAttentionBackend:
    """Pure-PyTorch attention over the paged cache (or over the step's own tokens without a cache)."""

    def forward(
        self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        if meta.slot_mapping is not None:
            attention_torch.store_kv(k, v, layer.k_cache, layer.v_cache, meta.slot_mapping)
        probe = meta.probe if meta.probe is not None else _NO_PROBE
        capture = layer.layer_idx in probe.capture_layers
        cached = meta.slot_mapping is not None
        if cached and meta.decode_batch is None:
            meta.decode_batch = attention_torch.DecodeBatch.build(
                meta.query_start_loc_list,
                meta.context_lens_list,
                meta.block_tables,
                layer.k_cache.shape[1],
                exclude=probe.masks.keys(),
            )
        selectors = {i: partial(state.select, layer.layer_idx) for i, state in probe.masks.items()}
        out, probs = attention_torch.attention(
            q,
            k,
            v,
            layer.k_cache if meta.slot_mapping is not None else None,
            layer.v_cache if meta.slot_mapping is not None else None,
            meta.block_tables,
            meta.query_start_loc_list,
            meta.context_lens_list,
            scale=layer.scale,
            sliding_window=layer.sliding_window,
            return_probs=capture,
            # A layer handing out probabilities takes the per-sequence path for all its sequences.
            decode_batch=None if capture or not cached else meta.decode_batch,
            selectors=selectors,
        )
        if capture:
            probe.captured[layer.layer_idx] = probs
        return out


class TritonAttentionBackend:
    """The GPU path: Triton kernels over the paged cache, reading lengths on the device only (so a decode
    step can be captured in a CUDA graph). What the kernels do not cover goes to the readable path: a
    layer handing out probabilities, a forward without a cache, and the rows of masked sequences (their
    keys are stored first; their rows are then recomputed with the mask — the others are not slowed)."""

    def __init__(self) -> None:
        from glassbox.kernels import attention_triton  # imported here: Triton is GPU-only

        self.kernels = attention_triton
        self.reference = TorchAttentionBackend()
        # The compiled layers (engine/executors.py) call this as opaque code: it branches on per-step metadata
        # and launches its own kernels. Wrapped here, not at import, so that CPU processes never load dynamo.
        self._attend = torch.compiler.disable(self._attend_eagerly)

    def forward(
        self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        return self._attend(layer, q, k, v, meta)

    def _attend_eagerly(
        self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        probe = meta.probe if meta.probe is not None else _NO_PROBE
        if meta.slot_mapping is None or layer.layer_idx in probe.capture_layers:
            return self.reference.forward(layer, q, k, v, meta)
        kernels, k_cache, v_cache = self.kernels, layer.k_cache, layer.v_cache
        budgets = meta.quest.budgets(layer.layer_idx) if meta.quest is not None else None
        if meta.max_query_len == 1:  # the decode kernel stores this step's keys/values itself
            # Quest (budgets): each KV head reads the blocks chosen for it
            summaries = meta.quest.summaries[layer.layer_idx] if budgets is not None else None
            out = kernels.paged_decode_attention(
                q, k_cache, v_cache, meta.block_tables, meta.context_lens, layer.scale, layer.sliding_window,
                k_new=k, v_new=v, slot_mapping=meta.slot_mapping, quest_summaries=summaries, quest_budgets=budgets,
            )  # fmt: skip
        else:
            kernels.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
            out = kernels.prefill_attention(
                q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.context_lens,
                meta.max_query_len, layer.scale, layer.sliding_window,
            )
        starts = meta.query_start_loc_list
        for i, state in probe.masks.items():
            rows = slice(starts[i], starts[i + 1])
            out[rows], _ = attention_torch.attend_cached(
                q[rows], k_cache, v_cache, meta.block_tables[i], meta.context_lens_list[i], layer.scale,
                layer.sliding_window, select=partial(state.select, layer.layer_idx),
            )
        return out


class Attention(nn.Module):
    """softmax(q·kᵀ·scale + causal mask)·v with grouped-query heads, over the paged KV cache.

    q: [T, num_heads, head_dim]; k, v: [T, num_kv_heads, head_dim] (RoPE already applied) -> [T, num_heads, head_dim].
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        layer_idx: int,
        scale: float | None = None,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.layer_idx = layer_idx
        self.scale = head_dim**-0.5 if scale is None else scale
        self.sliding_window = sliding_window
        # Bound by the engine to views of its KV pool: [num_blocks, block_size, num_kv_heads, head_dim].
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.backend: AttentionBackend = TorchAttentionBackend()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.backend.forward(self, q, k, v, meta)


def attention_layers(model: nn.Module) -> list[Attention]:
    """The model's attention layers in layer order."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    return sorted(layers, key=lambda m: m.layer_idx)


def set_attention_backend(model: nn.Module, backend: AttentionBackend) -> None:
    for layer in attention_layers(model):
        layer.backend = backend
