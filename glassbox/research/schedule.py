"""Compare scheduling policies on the same set of requests: /optimization/batch_schedule.

The set runs on the serving engine's loop thread, through a private engine over the same model (weights
shared, its own small KV pool, no prefix cache): nothing else shares its batches, so two runs of the same
set under two policies differ only by the policy. Serving waits meanwhile — a research tool, not for a
busy production server.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from glassbox.config import EngineConfig
from glassbox.engine.llm_engine import LLMEngine
from glassbox.engine.policies import SchedulingPolicy, get_policy
from glassbox.sampling import SamplingParams

# Per-step token budget: small chunks keep decodes flowing (latency); large ones fill the batch (throughput).
STRATEGIES = {"minimize_latency": 256, "maximize_throughput": 4096}


def _policy(algorithm: str) -> SchedulingPolicy:
    """The policy the request's `algorithm` field names (built in, alias or plugin); the error names the field."""
    try:
        return get_policy(algorithm)
    except ValueError as error:
        raise ValueError(f"algorithm: {error}") from None


@dataclass
class ScheduledRequest:
    prompt: str | list[int]
    priority: int = 0
    max_tokens: int = 32


def run_schedule(
    engine: LLMEngine,
    requests: list[ScheduledRequest],
    algorithm: str = "fcfs",
    max_batch_size: int = 8,
    strategy: str = "maximize_throughput",
) -> dict[str, Any]:
    """Run the set to the end under the policy (greedy decoding); per request: queue time, TTFT, finish
    time (ms from the set's start), output; and totals."""
    policy = _policy(algorithm)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: unknown {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    block_size = engine.config.block_size
    prompts = [engine.encode_prompt(r.prompt) for r in requests]
    blocks = sum(-(-(len(p) + r.max_tokens) // block_size) for p, r in zip(prompts, requests)) + 1
    private = LLMEngine(
        engine.loaded,
        EngineConfig(
            block_size=block_size,
            num_kv_blocks=blocks,
            max_num_seqs=max_batch_size,
            max_num_batched_tokens=STRATEGIES[strategy],
            enable_prefix_caching=False,
            quantization=engine.config.quantization,
            kv_cache_dtype=engine.config.kv_cache_dtype,
            enforce_eager=True,  # CUDA graphs would be captured anew for each short-lived engine
        ),
    )
    private.scheduler.policy = policy
    start = time.perf_counter()
    ids = [
        private.add_request(p, SamplingParams(temperature=0, max_tokens=r.max_tokens), priority=r.priority)
        for p, r in zip(prompts, requests)
    ]
    finished, order = {}, []
    while private.has_unfinished_requests():
        for out in private.step():
            if out.finished:
                finished[out.request_id] = out
                order.append(ids.index(out.request_id))
    wall_ms = (time.perf_counter() - start) * 1000
    results = []
    for index, request_id in enumerate(ids):
        out = finished[request_id]
        t = out.timings
        results.append(
            {
                "index": index,
                "priority": requests[index].priority,
                "prompt_tokens": len(out.prompt_token_ids),
                "queue_ms": t["queue_ms"],
                "ttft_ms": t["ttft_ms"],
                "finish_ms": t["total_ms"],
                "text": out.text,
                "completion_tokens": len(out.token_ids),
                "finish_reason": out.finish_reason,
            }
        )
    tokens = sum(r["completion_tokens"] for r in results)
    return {
        "algorithm": policy.name,
        "policy": policy.description,
        "strategy": strategy,
        "max_batch_size": max_batch_size,
        "completion_order": order,
        "results": results,
        "totals": {
            "wall_ms": wall_ms,
            "completion_tokens": tokens,
            "tokens_per_s": tokens / wall_ms * 1000 if wall_ms else 0.0,
            "mean_ttft_ms": sum(r["ttft_ms"] for r in results) / len(results),
            "mean_finish_ms": sum(r["finish_ms"] for r in results) / len(results),
            "steps": private.num_steps,
        },
    }


def set_serving_policy(engine: LLMEngine, algorithm: str) -> dict[str, str]:
    """Switch the policy of all traffic (takes effect at the next step)."""
    policy = _policy(algorithm)
    engine.scheduler.policy = policy
    return {"algorithm": policy.name, "description": policy.description}
