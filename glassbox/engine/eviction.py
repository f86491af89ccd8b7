"""KV eviction: what an evicting sparsity method drops leaves the sequence's KV cache, and the blocks it
filled go back to the pool.

After each step, for every sequence whose method evicts (layers/sparsity.py: `sliding_window`, `h2o`) and
whose prompt is computed, the method says which slots the next query no longer keeps. Those slots are
filled with the kept slots from the end of the cache — one key and one value copied per evicted token, per
layer and KV head, all in one indexed copy — and the blocks past the last filled slot are released. Slots
stop being in token order (a decode query attends to all of them, so order does not matter), and each key
keeps the rotary position it was computed at (the choice of positions is explained in layers/sparsity.py).

Measured on a tiny model (tests/test_kv_eviction.py): 4,096 tokens generated under sliding_window (window
512, 4 sinks, blocks of 16) hold 33 blocks at the end, under h2o (0.1 + 0.1) 52, dense 257. At 8k tokens of
context on the SmolLM2-135M shape (bench/kv_eviction.py, CPU): 504 blocks -> 33, and a decode step on the
native path 27.9 -> 5.1 ms. A decode step over evicted caches runs on the CUDA decode graphs (each row's
slots are its `num_kv_slots`, not its position): on the H200, 32 such sequences 38.2 -> 5.6 ms a step
(bench/kv_eviction.py). h2o's rows run the native stack on the CPU, whose attention writes the probabilities
they accumulate (StepPlan.observed_rows), and the readable attention elsewhere. The choice and the
bookkeeping run on the host (no device work or wait per sequence); the moves of all sequences go to the
device in one copy a step.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from glassbox.engine.block_manager import BlockManager
from glassbox.engine.kv_cache import KVCache
from glassbox.engine.sequence import Sequence
from glassbox.kernels.attention_torch import FP8_DTYPES
from glassbox.layers.sparsity import KVSlots, broadcast_rows


class EvictionError(RuntimeError):
    """A method's eviction broke the cache's rule (rows evicting different counts): a bug in the method."""


class KVEvictor:
    def __init__(self, kv_cache: KVCache, block_manager: BlockManager, num_heads: int) -> None:
        self.kv_cache = kv_cache
        self.block_manager = block_manager
        self.num_heads = num_heads  # query heads: h2o sums each KV head's group of them

    @staticmethod
    def applies(seq: Sequence) -> bool:
        """A sequence whose method evicts, whose last step computed the rest of its prompt (or its last
        token): the next step decodes one token."""
        state = seq.sparsity
        return state is not None and state.evicting and not seq.is_finished and seq.num_uncomputed_tokens == 1

    def after_step(self, items: Iterable[tuple[Sequence, int]]) -> int:
        """Evict for every sequence of a finished step (`items`: (sequence, tokens it computed)): the choices
        and the slots' bookkeeping on the host, then every sequence's moved keys and values in one indexed
        copy per cache, then the emptied blocks back to the pool. Returns the tokens evicted, all sequences
        together."""
        moves = Moves()
        evicting = [(seq, self.evict(seq, num_new, moves)) for seq, num_new in items if self.applies(seq)]
        moves.apply(self.kv_cache)
        for seq, count in evicting:
            if count:
                self.block_manager.release_unused(seq)
        return sum(count for _, count in evicting)

    def evict(self, seq: Sequence, num_new: int, moves: Moves) -> int:
        """Choose what `seq`'s next query (at position seq.num_computed_tokens) no longer keeps, after a step
        that computed its last `num_new` tokens; fill the holes in its slots' bookkeeping and add the key and
        value moves that do the same in the cache to `moves`. Returns how many tokens each row evicts."""
        state = seq.sparsity
        next_position = seq.num_computed_tokens
        if state.slots is None:  # the prompt was just computed, in the mask form: every token is cached
            num_layers, _, _, num_kv, _ = self.kv_cache.k.shape
            state.slots = KVSlots.full(num_layers, num_kv, seq.num_kv_slots, self.kv_cache.k.device)
            state.method.start_eviction(state.slots, state.layer_state, self.num_heads)
            state.layer_state.clear()  # the mask form's history ([H, prompt] per layer) is in the slots now
        else:
            state.slots.append(next_position - num_new, num_new)
        evicted = state.method.evict(state.slots, next_position).cpu()  # [L, KV, n] bool
        if broadcast_rows(evicted):  # one row for all: the same count in every row
            count = int(evicted[0, 0].sum())
        else:
            per_row = evicted.sum(-1)
            count = int(per_row[0, 0])
            if bool((per_row != count).any()):
                raise EvictionError(
                    f"sparsity method {state.method.name!r} evicted {per_row.min()}..{per_row.max()} slots across "
                    "rows; every (layer, KV head) must evict the same number"
                )
        if count:
            moves.add(seq.block_table, self.kv_cache.block_size, *state.slots.compact(evicted, count))
            seq.num_evicted_tokens += count
            state.evicted += count
        return count


class Moves:
    """A step's key and value moves within the cache, every sequence's: whole slots (every layer and KV
    head: uniform caches) and single rows' slots, as flat cache slots."""

    def __init__(self) -> None:
        self.slots: list[np.ndarray] = []  # [2, P]: to, from
        self.rows: list[np.ndarray] = []  # [4, P]: layer, KV head, to, from

    def add(self, block_table: list[int], block_size: int, layers: np.ndarray | None, heads: np.ndarray | None,
            to: np.ndarray, of: np.ndarray) -> None:
        """One sequence's moves, as KVSlots.compact gives them (slots within the sequence's cache)."""
        blocks = np.asarray(block_table)
        to, of = (blocks[s // block_size] * block_size + s % block_size for s in (to, of))
        if layers is None:
            self.slots.append(np.stack([to, of]))
        else:
            self.rows.append(np.stack([layers, heads, to, of]))

    def apply(self, kv_cache: KVCache) -> None:
        """Move the keys and values (one host-to-device copy of the indices and one indexed copy per cache
        and kind of move)."""
        if not (self.slots or self.rows):
            return
        device = kv_cache.k.device
        slots = torch.from_numpy(np.concatenate(self.slots, axis=1)).to(device) if self.slots else None
        rows = torch.from_numpy(np.concatenate(self.rows, axis=1)).to(device) if self.rows else None
        for cache in (kv_cache.k, kv_cache.v):
            if cache.dtype in FP8_DTYPES:  # no 8-bit float indexing kernel on the CPU: move the bytes
                cache = cache.view(torch.uint8)
            flat = cache.view(cache.shape[0], -1, *cache.shape[3:])  # [L, num_blocks * block_size, KV, D]
            if slots is not None:
                flat.index_copy_(1, slots[0], flat.index_select(1, slots[1]))
            if rows is not None:
                layers, heads, to, of = rows
                flat[layers, to, heads] = flat[layers, of, heads]
