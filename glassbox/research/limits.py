"""Budgets of the research calls and of every request: what one caller may make the server hold or do.

One frozen object per server (`ServerSettings.limits`), shown whole at GET /limits and under "limits" in
/model_info. A call over a budget is refused before it costs anything, with the limit's name in the message
and as the error's `param`: 413 for what is too big (a body, a tensor, a trace, a response), 429 for what
is already in use (handle bytes, a running schedule), 400 for a request field over its range.

The defaults keep a default-model server on the CPU (weights 0.5 GB + 1 GiB KV pool) under about 3 GB of
RSS whatever the research calls do (docs/benchmarks.md, "Reliability (issue 17)", measures it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

MiB = 1 << 20


class LimitError(ValueError):
    """A call over one of the budgets: `limit` names it, `status` is the HTTP status to answer."""

    def __init__(self, limit: str, message: str, status: int = 413) -> None:
        super().__init__(f"{limit}: {message}")
        self.limit, self.status = limit, status


@dataclass(frozen=True)
class Limits:
    # ---- every request
    max_body_bytes: int = 4 * MiB  # counted while the body is read, chunked bodies too
    max_json_depth: int = 32  # nesting of arrays and objects in a body
    # Σ over the sequences one HTTP request starts (n choices, batch prompts) of prompt + max_tokens.
    max_request_tokens: int = 65536
    # ---- profiling (/debug/profiling/*)
    profiling_max_seconds: float = 30.0  # a session stops recording after this long ...
    profiling_max_steps: int = 64  # ... or after this many engine steps, whichever comes first
    profiling_max_events: int = 1_000_000  # more recorded events: summary only, the trace deleted
    profiling_max_trace_bytes: int = 256 * MiB  # a larger trace file is deleted unread (no summary)
    profiling_traces_kept: int = 4  # the oldest trace is deleted when a new one would exceed this
    # ---- handles (/pipeline/* activations, /parallel/tensor_split splits)
    handle_ttl_s: float = 300.0
    max_handles: int = 64
    max_handle_bytes: int = 512 * MiB  # all handles together; the least recently used go first
    pipeline_max_tokens: int = 512  # tokens of one pipeline input (lm_head keeps [T, vocab] float32)
    tensor_max_elements: int = 1 << 22  # a random tensor to split, and the matmul's other operand
    # ---- /optimization/batch_schedule
    schedule_max_requests: int = 64
    schedule_max_tokens: int = 8192  # Σ prompt + max_tokens of the set
    schedule_max_pool_bytes: int = 512 * MiB  # the private KV pool sized for the set
    schedule_max_concurrent: int = 1  # runs at a time (each holds its own pool)
    # ---- /debug/attention_scores and /optimization/evaluate
    attention_max_tokens: int = 512  # every layer's [heads, n, n] probabilities are captured at once
    attention_max_values: int = 1 << 21  # attention-matrix values in one response (~40 MB of JSON)
    evaluate_max_tokens: int = 4096  # Σ tokens of the texts (each runs twice, dense and masked)
    # the speed part (research/decode_speed.py): a prompt and decode steps, twice, on a private KV pool
    # (schedule_max_pool_bytes bounds it too); serving waits for it
    evaluate_max_context: int = 8192
    evaluate_max_decode_steps: int = 64

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check(limit: str, value: int | float, maximum: int | float, what: str, status: int = 413) -> None:
    """Raise LimitError naming `limit` if value > maximum."""
    if value > maximum:
        raise LimitError(limit, f"{what} is {value}, over the limit of {maximum}", status)
