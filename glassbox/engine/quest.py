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

    def update(self, slot_mapping: torch.Tensor) -> None:
        """Fold the keys a step stored (at `slot_mapping` [T]; < 0: a padding row) into their blocks'
        summaries, in every layer, with tensor ops only: no host sync, so it runs after a CUDA step and
        inside a CUDA graph's capture."""
        if slot_mapping.numel() == 0:
            return
        k = self.kv_cache.k  # [L, NB, BS, KV, D]
        num_blocks = k.shape[1]
        valid = slot_mapping >= 0
        blocks = torch.where(valid, slot_mapping // self.block_size, num_blocks)  # padding -> the spare block
        offsets = torch.where(valid, slot_mapping % self.block_size, 0)
        new = k[:, blocks.clamp(max=num_blocks - 1), offsets].to(self.table.dtype)  # [L, T, KV, D]
        # A block whose first slot is written now starts afresh.
        fresh = torch.zeros(num_blocks + 1, dtype=torch.bool, device=k.device)
        fresh.index_fill_(0, torch.where(offsets == 0, blocks, num_blocks), True)
        fresh = fresh[blocks][None, :, None, None]  # [1, T, 1, 1]: the token's block starts afresh
        for side, reduce, start in ((0, "amin", float("inf")), (1, "amax", float("-inf"))):
            summary = self.table[:, :, :, side]  # [L, NB, KV, D], a view
            current = summary[:, blocks]  # [L, T, KV, D]
            base = current.masked_fill(fresh, start)
            combined = torch.minimum(base, new) if side == 0 else torch.maximum(base, new)
            summary.scatter_reduce_(1, blocks[None, :, None, None].expand_as(combined), combined, reduce, include_self=False)
