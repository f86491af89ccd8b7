"""Scheduling policies: the order in which sequences get the step's token budget, and whom to preempt.

A policy is one sort key. Sequences with a smaller key go first; under memory pressure the running
sequence with the largest key is preempted. Write your own by subclassing `SchedulingPolicy` and
registering it in `POLICIES` (or passing the instance to the Scheduler).
"""

from __future__ import annotations

from typing import Any

from glassbox.engine.sequence import Sequence


class SchedulingPolicy:
    name = "base"
    description = ""

    def key(self, seq: Sequence) -> Any:
        raise NotImplementedError

    def order(self, seqs: list[Sequence]) -> list[Sequence]:
        return sorted(seqs, key=self.key)

    def victim(self, running: list[Sequence]) -> Sequence:
        return max(running, key=self.key)


class FCFS(SchedulingPolicy):
    name = "fcfs"
    description = "first come, first served; the latest arrival is preempted first"

    def key(self, seq: Sequence) -> Any:
        return seq.arrival_time


class Priority(SchedulingPolicy):
    name = "priority"
    description = "lower `priority` value first (ties by arrival); the least urgent is preempted first"

    def key(self, seq: Sequence) -> Any:
        return (seq.priority, seq.arrival_time)


class ShortestPromptFirst(SchedulingPolicy):
    name = "shortest_prompt_first"
    description = "shortest prompt first (ties by arrival); the longest prompt is preempted first"

    def key(self, seq: Sequence) -> Any:
        return (seq.num_prompt_tokens, seq.arrival_time)


POLICIES: dict[str, type[SchedulingPolicy]] = {p.name: p for p in (FCFS, Priority, ShortestPromptFirst)}


def get_policy(name: str) -> SchedulingPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown scheduling policy {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[name]()
