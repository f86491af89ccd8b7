"""Quest's block summaries (Tang et al., 2024): per KV-cache block, layer and KV head, the elementwise min and
max of the keys stored in it, so that a `block_sparse` decode token can bound q·k for every key of a block
(Σ_d max(q_d·min_d, q_d·max_d)) and read only the blocks of highest bound (layers/sparsity.BlockSparse; the
kernels: kernels/cpu/paged_attention.c, kernels/attention_triton.quest_tables).

The table covers the whole pool — [num_layers, num_blocks, KV heads, 2, head_dim], 1/block_size of the
pool's bytes in the cache's dtype (float32 on the CPU) — and is made on the first request that can use it,
so that serving without block_sparse neither pays for it nor keeps it up to date. From then on every step
keeps it exact: the native CPU attention updates the blocks its new tokens fill as it stores them, and
`update` does it after the other steps (the readable path, CUDA graphs, the Triton kernels). A token
written to a block's first slot starts that block afresh (the block may have held another sequence's keys).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from glassbox.engine.kv_cache import KVCache
from glassbox.engine.sequence import Sequence

SUMMARIZE_BLOCKS = 4096  # blocks summarized at a time when the table is made (bounds the float32 copy)


class BlockSummaries:
    def __init__(self, kv_cache: KVCache, running: Iterable[Sequence]) -> None:
        """The summaries of every block of `kv_cache` as it holds now: exact for full blocks (the prefix
        cache keeps only those), and for the partial last blocks of the `running` sequences, summarized over
        the slots they filled."""
        num_layers, num_blocks, self.block_size, num_kv, head_dim = kv_cache.k.shape
        cpu = kv_cache.k.device.type == "cpu"
        # min/max of stored keys are stored keys: exact in the cache's dtype (bfloat16 for 8-bit floats).
        dtype = torch.float32 if cpu or kv_cache.dtype == torch.float32 else torch.bfloat16
        if kv_cache.dtype in (torch.float16, torch.bfloat16) and not cpu:
            dtype = kv_cache.dtype
        self.kv_cache = kv_cache
        # One spare block past the pool's: what padding rows of a CUDA-graph step fold into (never read).
        self.table = torch.empty(num_layers, num_blocks + 1, num_kv, 2, head_dim, dtype=dtype, device=kv_cache.k.device)
        self.table[:, num_blocks] = 0
        for start in range(0, num_blocks, SUMMARIZE_BLOCKS):
            end = min(start + SUMMARIZE_BLOCKS, num_blocks)
            keys = kv_cache.k[:, start:end].float()  # [L, n, BS, KV, D]
            self.table[:, start:end, :, 0] = keys.amin(2).to(dtype)
            self.table[:, start:end, :, 1] = keys.amax(2).to(dtype)
        for seq in running:
            filled = seq.num_kv_slots % self.block_size
            if filled and seq.block_table:
                block = seq.block_table[(seq.num_kv_slots - 1) // self.block_size]
                keys = kv_cache.k[:, block, :filled].float()  # [L, filled, KV, D]
                self.table[:, block, :, 0] = keys.amin(1).to(dtype)
                self.table[:, block, :, 1] = keys.amax(1).to(dtype)

    @property
    def nbytes(self) -> int:
        return self.table.nbytes

    def update(self, slot_mapping: torch.Tensor, one_per_block: bool = False) -> None:
        """Fold the keys a step stored (at `slot_mapping` [T]; < 0: a padding row) into their blocks'
        summaries, in every layer. `one_per_block`: no two tokens share a block (a decode step: each sequence
        writes its own last block), so each block's new summary is written in one indexed copy, without a host
        sync — it runs inside a CUDA graph's capture. Otherwise the blocks' summaries are gathered once,
        reduced over their tokens and written back (a reduction over the whole table's view cost ~10 ms a
        step on the H200: it copies the table)."""
        if slot_mapping.numel() == 0:
            return
        k = self.kv_cache.k  # [L, NB, BS, KV, D]
        num_blocks = k.shape[1]
        valid = slot_mapping >= 0
        blocks = torch.where(valid, slot_mapping // self.block_size, num_blocks)  # padding -> the spare block
        offsets = torch.where(valid, slot_mapping % self.block_size, 0)
        new = k[:, blocks.clamp(max=num_blocks - 1), offsets].to(self.table.dtype)  # [L, T, KV, D]
        if one_per_block:
            fresh = (offsets == 0)[None, :, None, None]  # a token in its block's first slot starts it afresh
            for side, start in ((0, float("inf")), (1, float("-inf"))):
                base = self.table[:, blocks, :, side].masked_fill(fresh, start)  # [L, T, KV, D]
                self.table[:, blocks, :, side] = torch.minimum(base, new) if side == 0 else torch.maximum(base, new)
            return
        unique, inverse = torch.unique(blocks, return_inverse=True)  # [U], [T]
        fresh = torch.zeros(unique.shape[0], dtype=torch.bool, device=k.device)
        fresh[inverse[offsets == 0]] = True
        index = inverse[None, :, None, None].expand_as(new)
        for side, reduce, start in ((0, "amin", float("inf")), (1, "amax", float("-inf"))):
            base = self.table[:, unique, :, side].masked_fill(fresh[None, :, None, None], start)  # [L, U, KV, D]
            self.table[:, unique, :, side] = base.scatter_reduce_(1, index, new, reduce)
