"""Which KV-cache blocks belong to which sequence, and the prefix cache over them. Plain Python.

Prefix caching: a full block is keyed by a chained hash of every token up to its end, so two sequences
with the same first N blocks of tokens share those blocks (reference counted). A block whose last
reference goes keeps its contents and its key, and waits in an LRU list; it is reused on a hit, or
evicted (key dropped) when a fresh block is needed and no never-used block is left.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

from glassbox.engine.sequence import Sequence


def chain_hash(previous: int | None, tokens: tuple[int, ...]) -> int:
    """Key of a full block: depends on the block's tokens and, through `previous`, on all tokens before."""
    return hash((previous, tokens))


@dataclass
class PrefixCacheStats:
    lookups: int = 0  # sequences admitted with a prefix lookup
    queried_tokens: int = 0  # prompt tokens looked up
    queried_blocks: int = 0  # full prompt blocks looked up
    hit_tokens: int = 0
    hit_blocks: int = 0
    evictions: int = 0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_keys: list[tuple[int, tuple[int, ...]] | None] = [None] * num_blocks  # (hash, tokens)
        self.free_blocks: deque[int] = deque(range(num_blocks))  # hold nothing reusable
        self.evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced cached blocks, LRU first
        self.cached: dict[int, int] = {}  # chain hash -> block id
        self.stats = PrefixCacheStats()

    # ---- queries
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks) + len(self.evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_kv_slots + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    # ---- admission: reuse cached prefix blocks
    def lookup_prefix(self, seq: Sequence) -> None:
        """Give a sequence with no blocks the cached blocks of its longest cached prefix.

        At least one token is always left to compute, since its logits are needed to sample."""
        assert not seq.block_table, "prefix lookup is for sequences without blocks"
        seq.num_computed_tokens = seq.num_cached_tokens = 0
        seq.block_hashes.clear()
        if not (self.enable_prefix_caching and seq.prefix_cacheable):
            return
        self.stats.lookups += 1
        self.stats.queried_tokens += seq.num_tokens
        self.stats.queried_blocks += (seq.num_tokens - 1) // self.block_size
        previous = None
        for index in range((seq.num_tokens - 1) // self.block_size):
            tokens = tuple(seq.token_ids[index * self.block_size : (index + 1) * self.block_size])
            key = chain_hash(previous, tokens)
            block = self.cached.get(key)
            if block is None or self.block_keys[block] != (key, tokens):
                break
            if self.ref_counts[block] == 0:
                del self.evictable[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(key)
            previous = key
        hits = len(seq.block_table)
        seq.num_computed_tokens = seq.num_cached_tokens = hits * self.block_size
        self.stats.hit_blocks += hits
        self.stats.hit_tokens += hits * self.block_size

    # ---- allocation
    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make the block table cover `num_new_tokens` more tokens. False (and nothing taken) if the pool
        is short."""
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > self.num_free_blocks:
            return False
        for _ in range(needed):
            seq.block_table.append(self._take_free_block())
        return True

    def _take_free_block(self) -> int:
        if self.free_blocks:
            block = self.free_blocks.popleft()
        else:
            block, _ = self.evictable.popitem(last=False)
            key, _ = self.block_keys[block]
            del self.cached[key]
            self.block_keys[block] = None
            self.stats.evictions += 1
        self.ref_counts[block] = 1
        return block

    def commit(self, seq: Sequence) -> None:
        """Register the sequence's newly completed full blocks in the prefix cache: blocks whose tokens are
        all computed and known (a step launched ahead computes a token the host has not appended yet)."""
        if not (self.enable_prefix_caching and seq.prefix_cacheable):
            return
        for index in range(len(seq.block_hashes), min(seq.num_computed_tokens, seq.num_tokens) // self.block_size):
            tokens = tuple(seq.token_ids[index * self.block_size : (index + 1) * self.block_size])
            key = chain_hash(seq.block_hashes[-1] if index else None, tokens)
            seq.block_hashes.append(key)
            block = seq.block_table[index]
            # If another sequence cached the same content first, this block stays private.
            if key not in self.cached and self.block_keys[block] is None:
                self.cached[key] = block
                self.block_keys[block] = (key, tokens)

    # ---- release
    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references; last blocks first, so the LRU evicts a prompt's tail first."""
        self._release(seq.block_table)
        seq.block_table = []
        seq.block_hashes = []

    def release_unused(self, seq: Sequence) -> int:
        """Give back the blocks past the sequence's filled slots (after an evicting method dropped tokens:
        engine/eviction.py); last first, as `free` does. Returns how many."""
        keep = -(-seq.num_kv_slots // self.block_size)
        released = seq.block_table[keep:]
        self._release(released)
        del seq.block_table[keep:]
        return len(released)

    def _release(self, blocks: list[int]) -> None:
        """One reference less on each block, last first; a block nobody holds goes back to the pool (or, if
        the prefix cache knows it, to the evictable LRU)."""
        for block in reversed(blocks):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if self.block_keys[block] is not None:
                    self.evictable[block] = None
                else:
                    self.free_blocks.append(block)

    def reset_prefix_cache(self) -> int:
        """Forget every unreferenced cached block (e.g. after weights change). Returns how many."""
        dropped = len(self.evictable)
        for block in list(self.evictable):
            key, _ = self.block_keys[block]
            del self.cached[key]
            self.block_keys[block] = None
            self.free_blocks.append(block)
        self.evictable.clear()
        return dropped
