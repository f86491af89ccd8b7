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
native path 27.9 -> 5.1 ms. A step with evicted rows skips the CUDA decode graphs (they compute slots from
positions) and h2o's rows take the readable attention, which hands them the probabilities they accumulate.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from glassbox.engine.block_manager import BlockManager
from glassbox.engine.kv_cache import KVCache
from glassbox.engine.sequence import Sequence
from glassbox.kernels.attention_torch import FP8_DTYPES
from glassbox.layers.sparsity import KVSlots


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
        """Evict for every sequence of a finished step (`items`: (sequence, tokens it computed)). Returns
        the tokens evicted, all sequences together."""
        return sum(self.evict(seq, num_new) for seq, num_new in items if self.applies(seq))

    def evict(self, seq: Sequence, num_new: int) -> int:
        """Drop from `seq`'s cache what its next query (at position seq.num_computed_tokens) no longer keeps,
        after a step that computed its last `num_new` tokens; release the blocks left empty."""
        state = seq.sparsity
        next_position = seq.num_computed_tokens
        if state.slots is None:  # the prompt was just computed, in the mask form: every token is cached
            num_layers, _, _, num_kv, _ = self.kv_cache.k.shape
            state.slots = KVSlots.full(num_layers, num_kv, seq.num_kv_slots, self.kv_cache.k.device)
            state.method.start_eviction(state.slots, state.layer_state, self.num_heads)
            state.layer_state.clear()  # the mask form's history ([H, prompt] per layer) is in the slots now
        else:
            state.slots.append(next_position - num_new, num_new)
        evicted = state.method.evict(state.slots, next_position)  # [L, KV, n] bool
        per_row = evicted.sum(-1)
        count = int(per_row[0, 0])
        if bool((per_row != count).any()):
            raise EvictionError(
                f"sparsity method {state.method.name!r} evicted {per_row.min()}..{per_row.max()} slots across rows; "
                "every (layer, KV head) must evict the same number"
            )
        if count:
            self._compact(seq.block_table, state.slots, evicted, count)
            seq.num_evicted_tokens += count
            state.evicted += count
            self.block_manager.release_unused(seq)
        return count

    def _compact(self, block_table: list[int], slots: KVSlots, evicted: torch.Tensor, count: int) -> None:
        """Fill each row's evicted slots below n - count with its kept slots at or above it."""
        keep = slots.num_slots - count
        holes = evicted[..., :keep].nonzero()  # [P, 3]: layer, KV head, slot; row-major, so ...
        sources = (~evicted[..., keep:]).nonzero()  # ... the i-th source is in the i-th hole's row
        layers, heads = holes[:, 0], holes[:, 1]
        destination, source = holes[:, 2], sources[:, 2] + keep
        block_size = self.kv_cache.block_size
        blocks = torch.tensor(block_table, device=holes.device)

        def flat_slot(slot: torch.Tensor) -> torch.Tensor:
            return blocks[slot // block_size] * block_size + slot % block_size

        to, of = flat_slot(destination), flat_slot(source)
        for cache in (self.kv_cache.k, self.kv_cache.v):
            if cache.dtype in FP8_DTYPES:  # no 8-bit float indexing kernel on the CPU: move the bytes
                cache = cache.view(torch.uint8)
            flat = cache.view(cache.shape[0], -1, *cache.shape[3:])  # [L, num_blocks * block_size, KV, D]
            flat[layers, to, heads] = flat[layers, of, heads]
        slots.move((layers, heads), destination, source, keep)
