"""Block manager and scheduler, without a model."""

from __future__ import annotations

import pytest

from glassbox.algorithms import ALGORITHMS
from glassbox.engine.block_manager import BlockManager
from glassbox.engine.policies import SchedulingPolicy, get_policy
from glassbox.engine.scheduler import Scheduler
from glassbox.engine.sequence import Sequence, SequenceStatus


def seq(request_id: str, num_tokens: int, arrival: float = 0.0, priority: int = 0, first_token: int = 0) -> Sequence:
    return Sequence(request_id, list(range(first_token, first_token + num_tokens)), None, priority, arrival)


def run_step(scheduler: Scheduler) -> list[tuple[str, int]]:
    """Schedule, then pretend the model ran: computed tokens advance; finished prefills get a token."""
    batch = scheduler.schedule()
    for s, n in batch.items:
        s.num_computed_tokens += n
        scheduler.block_manager.commit(s)
        if s.num_computed_tokens == s.num_tokens:
            s.token_ids.append(7)
    return [(s.request_id, n) for s, n in batch.items]


def test_allocate_and_free_returns_every_block():
    bm = BlockManager(num_blocks=10, block_size=4)
    a, b = seq("a", 9), seq("b", 4)
    assert bm.allocate(a, 9) and bm.allocate(b, 4)
    assert len(a.block_table) == 3 and len(b.block_table) == 1
    assert bm.num_free_blocks == 6
    assert not bm.allocate(seq("c", 30), 30)  # 8 blocks > 6 free: nothing taken
    assert bm.num_free_blocks == 6
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 10 and a.block_table == []


def test_prefix_cache_hits_share_blocks_and_leave_one_token_to_compute():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = seq("a", 10)
    bm.lookup_prefix(a)
    assert a.num_cached_tokens == 0
    bm.allocate(a, 10)
    a.num_computed_tokens = 10
    bm.commit(a)  # two full blocks registered
    b = seq("b", 10)  # same tokens
    bm.lookup_prefix(b)
    assert b.num_cached_tokens == 8 and b.block_table == a.block_table[:2]
    assert bm.ref_counts[a.block_table[0]] == 2
    exact = seq("exact", 8)  # a prompt of exactly two cached blocks: the last block is recomputed
    bm.lookup_prefix(exact)
    assert exact.num_cached_tokens == 4
    other = seq("other", 10, first_token=1)
    bm.lookup_prefix(other)
    assert other.num_cached_tokens == 0
    assert bm.stats.hit_blocks == 3 and bm.stats.lookups == 4


def test_unreferenced_cached_blocks_are_reused_then_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq("a", 5)
    bm.lookup_prefix(a)
    bm.allocate(a, 5)
    a.num_computed_tokens = 5
    bm.commit(a)
    bm.free(a)
    assert bm.num_free_blocks == 4 and len(bm.evictable) == 2
    again = seq("again", 5)
    bm.lookup_prefix(again)
    assert again.num_cached_tokens == 4 and len(bm.evictable) == 0
    bm.free(again)
    big = seq("big", 8, first_token=100)
    bm.lookup_prefix(big)
    assert bm.allocate(big, 8)  # needs all 4 blocks: both cached blocks are evicted
    assert bm.stats.evictions == 2 and not bm.cached


def test_chunked_prefill_respects_the_token_budget():
    scheduler = Scheduler(BlockManager(100, 4), max_num_seqs=8, max_num_batched_tokens=10)
    scheduler.add(seq("long", 25))
    scheduler.add(seq("short", 3, arrival=1.0))
    assert run_step(scheduler) == [("long", 10)]
    assert run_step(scheduler) == [("long", 10)]
    # The long prompt finishes its last 5 tokens and the short one joins in the same step.
    assert run_step(scheduler) == [("long", 5), ("short", 3)]
    assert run_step(scheduler) == [("long", 1), ("short", 1)]


def test_preemption_when_the_pool_runs_out_and_recompute_later():
    bm = BlockManager(num_blocks=4, block_size=4)
    scheduler = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    first, second = seq("first", 8, arrival=0.0), seq("second", 8, arrival=1.0, first_token=50)
    scheduler.add(first)
    scheduler.add(second)
    run_step(scheduler)  # both prefilled: 2 blocks each, pool full; each has 9 tokens now
    assert bm.num_free_blocks == 0
    steps = run_step(scheduler)  # each needs a third block: the latest arrival is preempted
    assert steps == [("first", 1)]
    assert second.status is SequenceStatus.WAITING and second.num_computed_tokens == 0
    assert scheduler.num_preemptions == 1
    scheduler.finish(first, "stop")
    # Its freed blocks stayed cached, tail first in the LRU: "first" took the tail one for its third
    # block, so on readmission the head block is a hit and 9 - 4 tokens are recomputed.
    assert run_step(scheduler) == [("second", 5)]
    assert second.num_cached_tokens == 4


def test_policies_order_admission():
    for policy, expected in [
        ("fcfs", ["a", "b", "c"]),
        ("priority", ["c", "a", "b"]),
        ("shortest_prompt_first", ["b", "c", "a"]),
    ]:
        scheduler = Scheduler(BlockManager(100, 4), max_num_seqs=8, max_num_batched_tokens=100, policy=policy)
        scheduler.add(seq("a", 9, arrival=0.0, priority=1))
        scheduler.add(seq("b", 3, arrival=1.0, priority=2))
        scheduler.add(seq("c", 5, arrival=2.0, priority=0))
        assert [name for name, _ in run_step(scheduler)] == expected


def test_max_num_seqs_caps_the_batch():
    scheduler = Scheduler(BlockManager(100, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(3):
        scheduler.add(seq(str(i), 3, arrival=float(i)))
    assert [name for name, _ in run_step(scheduler)] == ["0", "1"]
    assert len(scheduler.waiting) == 1


def test_unknown_policy():
    with pytest.raises(ValueError, match="unknown scheduling policy"):
        get_policy("random")


class LongestFirst(SchedulingPolicy):
    name = "longest_first"
    description = "longest prompt first"

    def key(self, seq: Sequence) -> tuple[int, float]:
        return (-seq.num_prompt_tokens, seq.arrival_time)


def test_one_registry_names_builtins_aliases_and_plugin_policies():
    assert type(get_policy("sjf")) is type(get_policy("shortest_first")) is type(get_policy("shortest_prompt_first"))
    ALGORITHMS.scheduling_policies.set_plugin_entries({"longest_first": LongestFirst})  # what a plugin load does
    try:
        scheduler = Scheduler(BlockManager(100, 4), max_num_seqs=8, max_num_batched_tokens=100, policy="longest_first")
        for name, length, arrival in (("a", 9, 0.0), ("b", 3, 1.0), ("c", 5, 2.0)):
            scheduler.add(seq(name, length, arrival=arrival))
        assert [name for name, _ in run_step(scheduler)] == ["a", "c", "b"]
        with pytest.raises(ValueError, match="'fcfs' is built in"):
            ALGORITHMS.scheduling_policies.set_plugin_entries({"fcfs": LongestFirst})
    finally:
        ALGORITHMS.scheduling_policies.set_plugin_entries({})  # a reload that registers nothing
    with pytest.raises(ValueError, match="choose one of fcfs, priority, shortest_prompt_first, shortest_first, sjf$"):
        get_policy("longest_first")


def test_graph_block_table_rows_written_incrementally_match_a_full_write():
    """The CUDA-graph input buffer's block-table rows, updated with only what changed, equal rows written in
    full at every step: through growing tables, batch reordering, sequences leaving and freed-then-readmitted
    sequences (a new list), with real block manager tables."""
    import numpy as np

    from glassbox.engine.cuda_graphs import BlockTableRows

    manager = BlockManager(num_blocks=400, block_size=4, enable_prefix_caching=False)
    seqs = [seq(f"r{i}", 3 + 5 * i) for i in range(6)]
    for s in seqs:
        assert manager.allocate(s, s.num_tokens)
    rows = BlockTableRows(np.full((8, 40), -7, dtype=np.int32))
    for step in range(30):
        batch = [s for s in seqs if s.block_table]
        if step % 7 == 3:
            batch.reverse()
        if step == 12:  # preempted: freed, readmitted with a new list
            manager.free(seqs[2])
            assert manager.allocate(seqs[2], seqs[2].num_tokens)
        if step == 20:
            manager.free(seqs[0])
        for s in batch:
            s.num_computed_tokens = s.num_tokens
            s.token_ids.append(1)
            assert manager.allocate(s, 1)
        batch = [s for s in batch if s.block_table]
        rows.fill([s.block_table for s in batch])
        for row, s in zip(rows.array, batch):
            assert row[: len(s.block_table)].tolist() == s.block_table
