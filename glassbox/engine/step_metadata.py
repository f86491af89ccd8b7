"""Build the per-step inputs the model reads: flattened positions and `AttentionMetadata`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from glassbox.layers.attention import AttentionMetadata


@dataclass
class SeqChunk:
    """One sequence's share of a step: the tokens at positions [start, start + num_new) are computed now, into
    the cache slots [cache_start, cache_start + num_new), and attend over the slots before them too. The
    slots are the positions (cache_start None) unless an evicting sparsity method dropped tokens
    (engine/eviction.py)."""

    block_table: list[int]
    start: int
    num_new: int
    cache_start: int | None = None


def build_step_metadata(
    chunks: list[SeqChunk], block_size: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, AttentionMetadata]:
    """positions [T] and the metadata (slot mapping, padded block tables, lengths) for a step."""
    positions: list[int] = []
    slots: list[int] = []
    starts = [0]
    context_lens = []
    for chunk in chunks:
        first = chunk.start if chunk.cache_start is None else chunk.cache_start
        positions.extend(range(chunk.start, chunk.start + chunk.num_new))
        for slot in range(first, first + chunk.num_new):
            slots.append(chunk.block_table[slot // block_size] * block_size + slot % block_size)
        starts.append(starts[-1] + chunk.num_new)
        context_lens.append(first + chunk.num_new)
    width = max(len(c.block_table) for c in chunks)
    tables = np.full((len(chunks), width), -1, dtype=np.int32)  # row by row: cheaper than nested lists
    for row, chunk in zip(tables, chunks):
        row[: len(chunk.block_table)] = chunk.block_table
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_tables=torch.from_numpy(tables).to(device),
        query_start_loc_list=starts,
        context_lens_list=context_lens,
    )
    return torch.tensor(positions, dtype=torch.int64, device=device), meta


def filler_prompts(
    num_tokens: int, max_positions: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """`num_tokens` token ids (zeros) as whole prompts no longer than `max_positions` (GPT-2 has 1024), for a
    cache-less forward that only warms up or measures: ids [T], positions [T] and their metadata."""
    lengths = [min(max_positions, num_tokens - start) for start in range(0, num_tokens, max_positions)]
    ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])
    return ids, positions, AttentionMetadata.for_prompts(lengths, device)
