"""A request's state inside the engine: its tokens, how many are in the KV cache, its blocks, its timings.

Plain Python (no torch), so the scheduler and block manager can be tested without a model.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Timings:
    """Wall-clock instants (time.perf_counter seconds) of a request's life."""

    arrival: float = 0.0
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None
    token_times: list[float] = field(default_factory=list)  # when each output token was produced

    def summary(self) -> dict[str, float | None]:
        """Durations in milliseconds: queue, prefill, TTFT, decode (total and per token), end-to-end."""

        def ms(start: float | None, end: float | None) -> float | None:
            return None if start is None or end is None else round((end - start) * 1000, 3)

        decode_tokens = max(len(self.token_times) - 1, 0)
        decode_ms = ms(self.first_token, self.token_times[-1] if self.token_times else None)
        return {
            "queue_ms": ms(self.arrival, self.first_scheduled),
            "prefill_ms": ms(self.first_scheduled, self.first_token),
            "ttft_ms": ms(self.arrival, self.first_token),
            "decode_ms": decode_ms,
            "decode_ms_per_token": round(decode_ms / decode_tokens, 3) if decode_ms and decode_tokens else None,
            "total_ms": ms(self.arrival, self.finished),
        }


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: Any  # SamplingParams (kept untyped here: the scheduler never looks inside)
    priority: int = 0  # lower = more urgent (vLLM's convention)
    arrival_time: float = field(default_factory=time.perf_counter)
    # When the scheduler ends it after a step: a sampled stop token (EOS unless ignored; never sampled
    # before min_tokens), or this many output tokens.
    stop_token_ids: frozenset[int] = frozenset()
    max_tokens: int = 1 << 62

    token_ids: list[int] = field(default_factory=list)  # prompt + output
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose keys/values were computed (the next token's position)
    # Of those, how many an evicting sparsity method (sliding_window, h2o) dropped from the KV cache: the
    # cache holds `num_kv_slots` slots, and its blocks cover only those (engine/eviction.py).
    num_evicted_tokens: int = 0
    num_cached_tokens: int = 0  # of those, how many came from the prefix cache (last admission)
    block_table: list[int] = field(default_factory=list)
    # Chained hash of each leading full block already registered in the prefix cache.
    block_hashes: list[int] = field(default_factory=list)
    # False for sequences whose KV differs from the plain model's (a sparsity mask changes every layer's
    # input after the first): they neither reuse nor publish prefix-cache blocks.
    prefix_cacheable: bool = True
    sparsity: Any = None  # layers.sparsity.SparsityState while a mask applies (read by the model runner)
    num_preemptions: int = 0
    finish_reason: str | None = None
    timings: Timings = field(default_factory=Timings)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        self.timings.arrival = self.arrival_time

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def num_kv_slots(self) -> int:
        """Slots of the KV cache this sequence fills: its computed tokens less the evicted ones."""
        return self.num_computed_tokens - self.num_evicted_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def forget_cache(self) -> None:
        """Its KV cache is gone (preempted, or never admitted): every token is computed again, and an
        evicting method starts over from the recomputed prompt."""
        self.num_computed_tokens = self.num_cached_tokens = self.num_evicted_tokens = 0
        if self.sparsity is not None:
            self.sparsity.forget_cache()
