"""Scheduling policies: the order in which sequences get the step's token budget, and whom to preempt.

A policy is one sort key. Sequences with a smaller key go first; under memory pressure the running
sequence with the largest key is preempted. Write your own by subclassing `SchedulingPolicy` and
registering it from a plugin file (research/plugins.py), or pass the instance to the Scheduler. Names
resolve through the one registry of algorithms (glassbox/algorithms.py), built-ins and plugin alike.
"""

from __future__ import annotations

from typing import Any

from glassbox.algorithms import ALGORITHMS
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


ALGORITHMS.scheduling_policies.add_builtin(FCFS)
ALGORITHMS.scheduling_policies.add_builtin(Priority)
ALGORITHMS.scheduling_policies.add_builtin(ShortestPromptFirst, aliases=("shortest_first", "sjf"))


def get_policy(name: str) -> SchedulingPolicy:
    """A new instance of the policy called `name` (or an alias): built in, or registered by the plugin file.
    Raises UnknownNameError (a ValueError) listing the known names."""
    return ALGORITHMS.scheduling_policies.get(name)()
