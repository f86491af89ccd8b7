"""Compare scheduling policies on the same set of requests: /optimization/batch_schedule.

The set runs through a private engine over the serving model (weights shared, its own small KV pool, no
prefix cache): nothing else shares its batches, so two runs of the same set under two policies differ only
by the policy. It runs one private step per call on the serving engine's loop thread (`ScheduleRun.step`),
so serving steps run between two of its steps: it never holds serving for more than one step, and the
caller can stop calling (a client gone) to drop it. On the CPU's native path even one private step is cut
in slices of a few layers, one per call (research/step_slices.py): a new request waits behind a slice, not
a 16-sequence step. Its times are the sum of its own steps' times ("virtual" time), not wall time, so they
do not depend on the serving traffic interleaved with them.

Budgets (research/limits.py): the number of requests, their tokens (prompt + max_tokens), and the bytes of
the private KV pool sized for them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from glassbox.config import EngineConfig, ModelConfig
from glassbox.engine.kv_cache import KVCache, bytes_per_block
from glassbox.engine.llm_engine import LLMEngine, RequestState
from glassbox.engine.policies import SchedulingPolicy, get_policy
from glassbox.errors import FieldError
from glassbox.research.limits import Limits, check
from glassbox.research.step_slices import Handover, SlicedLayers
from glassbox.sampling import SamplingParams

# Per-step token budget: small chunks keep decodes flowing (latency); large ones fill the batch (throughput).
STRATEGIES = {"minimize_latency": 256, "maximize_throughput": 4096}


def _policy(algorithm: str) -> SchedulingPolicy:
    """The policy the request's `algorithm` field names (built in, alias or plugin); the error names the field."""
    try:
        return get_policy(algorithm)
    except ValueError as error:
        raise FieldError("algorithm", str(error)) from None


@dataclass
class ScheduledRequest:
    prompt: str | list[int]
    priority: int = 0
    max_tokens: int = 32


@dataclass(frozen=True)
class PoolSpec:
    """The private KV pool a set needs. `make()` touches no engine state: the server runs it off the engine
    thread (zeroing a 16 x 64-token set's ~60 MB pool took 15-60 ms there, every request waiting)."""

    config: ModelConfig
    num_blocks: int
    block_size: int
    dtype: torch.dtype
    device: torch.device

    def make(self) -> KVCache:
        return KVCache(self.config, self.num_blocks, self.block_size, self.dtype, self.device)


def _checked(engine: LLMEngine, requests: list[ScheduledRequest], limits: Limits) -> tuple[list[list[int]], PoolSpec]:
    """The requests' prompt ids and their pool, within the budgets (LimitError naming the one exceeded)."""
    check("schedule_max_requests", len(requests), limits.schedule_max_requests, "the number of requests", 413)
    prompts = []
    for i, r in enumerate(requests):
        try:
            prompts.append(engine.encode_prompt(r.prompt))
        except FieldError as error:
            raise error.renamed(f"requests[{i}].prompt") from None
    tokens = sum(len(p) + r.max_tokens for p, r in zip(prompts, requests))
    check("schedule_max_tokens", tokens, limits.schedule_max_tokens, "prompt + max_tokens over the set", 413)
    block_size = engine.config.block_size
    blocks = sum(-(-(len(p) + r.max_tokens) // block_size) for p, r in zip(prompts, requests)) + 1
    pool_bytes = blocks * bytes_per_block(engine.loaded.config, block_size, engine.kv_cache.dtype)
    check("schedule_max_pool_bytes", pool_bytes, limits.schedule_max_pool_bytes, "the private KV pool (bytes)", 413)
    return prompts, PoolSpec(engine.loaded.config, blocks, block_size, engine.kv_cache.dtype, engine.loaded.device)


def pool_spec(engine: LLMEngine, requests: list[ScheduledRequest], limits: Limits | None = None) -> PoolSpec:
    """The pool a ScheduleRun of these requests needs (checked against the budgets first)."""
    return _checked(engine, requests, limits or Limits())[1]


class ScheduleRun:
    """One set of requests on its private engine; `step()` until it returns True, then `result()`."""

    def __init__(
        self,
        engine: LLMEngine,
        requests: list[ScheduledRequest],
        algorithm: str = "fcfs",
        max_batch_size: int = 8,
        strategy: str = "maximize_throughput",
        limits: Limits | None = None,
        sliced: bool = True,
        serving_waits: Callable[[], bool] = lambda: False,
        kv_cache: KVCache | None = None,
    ) -> None:
        """`sliced`: cut each private step in slices of layers where the path allows (see step()); off for
        a run with nothing else to serve. `serving_waits`: whether a serving request waits to be taken in
        (the server's AsyncLLMEngine.serving_waits); a slice then ends at the next layer. `kv_cache`: the
        private pool, made from `pool_spec` (off the engine thread); made here if None."""
        limits = limits or Limits()
        self.policy = _policy(algorithm)
        if strategy not in STRATEGIES:
            raise FieldError("strategy", f"unknown {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        prompts, spec = _checked(engine, requests, limits)
        if kv_cache is None:
            kv_cache = spec.make()
        elif kv_cache.num_blocks < spec.num_blocks or kv_cache.block_size != spec.block_size:
            raise ValueError(f"kv_cache: {kv_cache.num_blocks} blocks of {kv_cache.block_size}, the set needs {spec.num_blocks} of {spec.block_size}")
        self.requests, self.strategy, self.max_batch_size = requests, strategy, max_batch_size
        self.handover: Handover | None = None
        executors = None  # the ones that apply to the model
        if sliced and "native_layers" in engine.runner.executors:
            self.handover = Handover()
            sliced_layers = SlicedLayers(engine.loaded.model, self.handover, self._bind_pool, serving_waits)
            executors = {"eager": engine.runner.executors["eager"], "native_layers": sliced_layers}
        try:
            self.private = self._private_engine(engine, kv_cache, max_batch_size, strategy, executors)
        except BaseException:
            self.close()
            raise
        self.private.scheduler.policy = self.policy
        if self.handover is not None:  # the LM head on the engine thread too, as the layers (step_slices.py)
            runner, compute_logits = self.private.runner, self.private.runner.compute_logits
            runner.compute_logits = lambda hidden: self.handover.on_caller(lambda: compute_logits(hidden))
        self.states: list[RequestState] = []
        for p, r in zip(prompts, requests):
            state = self.private.make_request(p, SamplingParams(temperature=0, max_tokens=r.max_tokens), priority=r.priority)
            self.private.enqueue(state)
            self.states.append(state)
        self.elapsed = 0.0  # seconds of the private engine's own steps
        self._step_began = 0.0  # self.elapsed when the step in progress began
        self.queue_s: dict[int, float] = {}
        self.first_token_s: dict[int, float] = {}
        self.finish_s: dict[int, float] = {}
        self.finished: dict[str, Any] = {}
        self.order: list[int] = []
        self.index = {state.seq.request_id: i for i, state in enumerate(self.states)}

    @staticmethod
    def _private_engine(
        engine: LLMEngine, kv_cache: KVCache, max_batch_size: int, strategy: str, executors: dict[str, Any] | None
    ) -> LLMEngine:
        """The run's engine: the serving model's weights, its own pool, no prefix cache."""
        return LLMEngine(
            engine.loaded,
            EngineConfig(
                block_size=kv_cache.block_size,
                num_kv_blocks=kv_cache.num_blocks,
                max_num_seqs=max_batch_size,
                max_num_batched_tokens=STRATEGIES[strategy],
                enable_prefix_caching=False,
                quantization=engine.config.quantization,
                activations=engine.config.activations,
                kv_cache_dtype=engine.config.kv_cache_dtype,
                enforce_eager=True,  # CUDA graphs would be captured anew for each short-lived engine
            ),
            beside=engine,
            kv_cache=kv_cache,
            executors=executors,
        )

    def _bind_pool(self) -> None:
        """Bind the private pool to the model's layers again (serving steps bound theirs meanwhile)."""
        runner = self.private.runner
        runner.kv_cache.bind(runner.attention_layers)

    def step(self) -> bool:
        """One private step, or one slice of it (see `sliced`); True once every request has finished."""
        if self.handover is None or not self.handover.busy:
            if not self.private.has_unfinished_requests():
                return True
            self._step_began = self.elapsed
            if self.handover is not None:
                self.handover.start(self.private.step)
        start = time.perf_counter()
        if self.handover is None:
            outputs = self.private.step()
        elif self.handover.resume():
            outputs = self.handover.result
        else:
            self.elapsed += time.perf_counter() - start
            return False
        self.elapsed += time.perf_counter() - start
        for i, state in enumerate(self.states):
            if i not in self.queue_s and state.seq.timings.first_scheduled is not None:
                self.queue_s[i] = self._step_began
        for out in outputs:
            i = self.index[out.request_id]
            if out.token_ids and i not in self.first_token_s:
                self.first_token_s[i] = self.elapsed
            if out.finished:
                self.finish_s[i] = self.elapsed
                self.finished[out.request_id] = out
                self.order.append(i)
        return not self.private.has_unfinished_requests()

    def close(self) -> None:
        """Drop the run where it is (on the engine thread: a paused private step unwinds there)."""
        if self.handover is not None:
            self.handover.close()

    def result(self) -> dict[str, Any]:
        """Per request: queue time, TTFT, finish time (ms of the set's own steps), output; and totals."""
        results = []
        for index, state in enumerate(self.states):
            out = self.finished[state.seq.request_id]
            results.append(
                {
                    "index": index,
                    "priority": self.requests[index].priority,
                    "prompt_tokens": len(out.prompt_token_ids),
                    "queue_ms": self.queue_s.get(index, 0.0) * 1000,
                    "ttft_ms": self.first_token_s.get(index, self.finish_s[index]) * 1000,
                    "finish_ms": self.finish_s[index] * 1000,
                    "text": out.text,
                    "completion_tokens": len(out.token_ids),
                    "finish_reason": out.finish_reason,
                }
            )
        wall_ms = self.elapsed * 1000
        tokens = sum(r["completion_tokens"] for r in results)
        return {
            "algorithm": self.policy.name,
            "policy": self.policy.description,
            "strategy": self.strategy,
            "max_batch_size": self.max_batch_size,
            "completion_order": self.order,
            "results": results,
            "totals": {
                "wall_ms": wall_ms,
                "completion_tokens": tokens,
                "tokens_per_s": tokens / wall_ms * 1000 if wall_ms else 0.0,
                "mean_ttft_ms": sum(r["ttft_ms"] for r in results) / len(results),
                "mean_finish_ms": sum(r["finish_ms"] for r in results) / len(results),
                "steps": self.private.num_steps,
                "time": "the sum of the set's own steps (serving steps between them not counted)",
            },
        }


def run_schedule(
    engine: LLMEngine,
    requests: list[ScheduledRequest],
    algorithm: str = "fcfs",
    max_batch_size: int = 8,
    strategy: str = "maximize_throughput",
    limits: Limits | None = None,
) -> dict[str, Any]:
    """The whole set at once (offline use: nothing else to serve meanwhile)."""
    run = ScheduleRun(engine, requests, algorithm, max_batch_size, strategy, limits, sliced=False)
    while not run.step():
        pass
    return run.result()


def set_serving_policy(engine: LLMEngine, algorithm: str) -> dict[str, str]:
    """Switch the policy of all traffic (takes effect at the next step)."""
    policy = _policy(algorithm)
    engine.scheduler.policy = policy
    return {"algorithm": policy.name, "description": policy.description}
