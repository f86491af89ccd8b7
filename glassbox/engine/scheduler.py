"""Continuous batching: which sequences run this step and how many of their tokens. Plain Python.

Every step (vLLM v1's unified rule): each sequence has tokens not yet in the cache — a whole prompt, a
prompt's remaining chunk, or the one token sampled last step — and gets up to that many under a per-step
token budget, so prefill chunks and decodes share one forward pass. Running sequences go first, in the
policy's order; if the pool runs out, the policy's victim is preempted (its blocks freed, to be recomputed
later) — never a crash. Then waiting sequences are admitted, in the policy's order, after a prefix-cache
lookup.

A policy may come from a researcher's plugin file: if it raises (or returns something that is not an
order of the sequences it was given, or a victim among them), the built-in FCFS takes over at once for
the same call, so the step goes on; the fault is kept in `policy_faults` for the engine to report.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from glassbox.engine.block_manager import BlockManager
from glassbox.engine.policies import SchedulingPolicy, get_policy
from glassbox.engine.sequence import Sequence, SequenceStatus

FALLBACK_POLICY = "fcfs"  # takes over from a policy that raised
T = TypeVar("T")


@dataclass(frozen=True)
class PolicyFault:
    """A policy that raised and was replaced by the fallback: its name and what it raised."""

    policy: str
    error: BaseException


@dataclass
class ScheduledBatch:
    """One step's work: (sequence, number of its tokens to compute) in batch order."""

    items: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)

    def __bool__(self) -> bool:
        return bool(self.items)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        policy: SchedulingPolicy | str = "fcfs",
        max_model_len: int = 1 << 62,
    ) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be at least 1")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.policy = get_policy(policy) if isinstance(policy, str) else policy
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.policy_faults: list[PolicyFault] = []  # read and cleared by the engine after each step

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        self.running = self._order(self.running)
        scheduled: set[int] = set()

        # 1. Running sequences: decodes and the rest of chunked prefills.
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_new = min(seq.num_uncomputed_tokens, budget)
            while not self.block_manager.allocate(seq, num_new):
                victim = self._victim([s for s in self.running if id(s) not in scheduled])
                self._preempt(victim, batch)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:  # preempted itself
                continue
            batch.items.append((seq, num_new))
            scheduled.add(id(seq))
            budget -= num_new
            index += 1

        # 2. Admit waiting sequences, unless this step had to preempt (the pool is tight).
        if not batch.preempted:
            self.waiting = self._order(self.waiting)
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                seq = self.waiting[0]
                self.block_manager.lookup_prefix(seq)
                num_new = min(seq.num_uncomputed_tokens, budget)
                if not self.block_manager.allocate(seq, num_new):
                    self.block_manager.free(seq)
                    seq.forget_cache()
                    break
                self.waiting.pop(0)
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                batch.items.append((seq, num_new))
                budget -= num_new
        return batch

    def _order(self, seqs: list[Sequence]) -> list[Sequence]:
        def order(policy: SchedulingPolicy) -> list[Sequence]:
            ordered = policy.order(seqs)
            if len(ordered) != len(seqs) or {id(s) for s in ordered} != {id(s) for s in seqs}:
                raise TypeError(f"order() must return the {len(seqs)} sequences it was given, reordered")
            return list(ordered)

        return self._guarded(order)

    def _victim(self, candidates: list[Sequence]) -> Sequence:
        def victim(policy: SchedulingPolicy) -> Sequence:
            chosen = policy.victim(candidates)
            if not any(chosen is s for s in candidates):
                raise TypeError("victim() must return one of the running sequences it was given")
            return chosen

        return self._guarded(victim)

    def _guarded(self, call: Callable[[SchedulingPolicy], T]) -> T:
        """call(policy); if the policy raises, FCFS replaces it for good and answers instead."""
        try:
            return call(self.policy)
        except Exception as error:  # a plugin's policy must not stop serving
            self.policy_faults.append(PolicyFault(self.policy.name, error))
            self.policy = get_policy(FALLBACK_POLICY)
            return call(self.policy)

    def schedule_ahead(self, in_flight: ScheduledBatch) -> ScheduledBatch | None:
        """Async scheduling: the decode step after `in_flight` (launched, its tokens not read yet), scheduled
        before those tokens are known, when it is the step `schedule` would make: nothing waiting, every
        running sequence in flight, a KV slot for each. Sequences whose in-flight token is their last by
        length drop out; one that the token ends by a stop token costs a spare row. None: let the host read
        the tokens and `schedule` the next step."""
        if self.waiting:
            return None
        items, num_live = [], 0  # one pass: this runs at every decode step of a busy GPU
        for seq, _ in in_flight.items:
            if seq.status is not SequenceStatus.FINISHED:
                num_live += 1
                if not self._reaches_length(seq, len(seq.token_ids) + 1):
                    items.append((seq, 1))
        if num_live != len(self.running) or not items:
            return None
        for seq, _ in items:
            if not self.block_manager.allocate(seq, 1):
                return None  # the pool is short: `schedule` decides who is preempted
        return ScheduledBatch(items)

    def mark_launched(self, batch: ScheduledBatch) -> None:
        """A step launched without waiting for it: its tokens count as computed now, so the step after it
        is built from the right positions before its tokens are read."""
        for seq, num_new in batch.items:
            seq.num_computed_tokens += num_new

    def update_from_output(self, batch: ScheduledBatch, sampled: dict[int, int], launched: bool = False) -> list[int]:
        """Record a step's result: its tokens are in the cache (full blocks join the prefix cache) and each
        row's sampled token is appended; a stop token or the length limit finishes the sequence (blocks
        freed). `launched`: the step was counted by `mark_launched`. Returns the rows that got a token
        (rows of sequences that finished or were aborted meanwhile get none)."""
        advanced = []
        finished = SequenceStatus.FINISHED
        for i, (seq, num_new) in enumerate(batch.items):
            if seq.status is finished:  # aborted, or ended by its previous token while this step ran: a spare row
                continue
            if not launched:
                seq.num_computed_tokens += num_new
            self.block_manager.commit(seq)
            if i not in sampled:
                continue
            token = sampled[i]
            seq.token_ids.append(token)
            advanced.append(i)
            if token in seq.stop_token_ids:
                self.finish(seq, "stop")
            elif self._reaches_length(seq, len(seq.token_ids)):
                self.finish(seq, "length")
        return advanced

    def _reaches_length(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether `num_tokens` tokens (prompt + output) are all the sequence may have."""
        return num_tokens - len(seq.prompt_token_ids) >= seq.max_tokens or num_tokens >= self.max_model_len

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        """Free the sequence's blocks; it goes back to waiting and recomputes its tokens when readmitted."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.forget_cache()
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.insert(0, seq)
        batch.preempted.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove a sequence (done or aborted) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.timings.finished = time.perf_counter()
