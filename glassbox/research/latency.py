"""Per-stage latency of the serving engine: tokenize, queue, embed, attention, mlp, lm_head, sample,
detokenize — plus what is left of the forward pass (norms, rotary, residuals) and of the step (scheduling,
metadata, bookkeeping), so that the stages of a step add up to the step.

Timers cost something, so they exist only while enabled: `enable()` attaches forward hooks to the model's
parts (its embedding, each layer's attention block and MLP, the LM head) and attaches this object to the
engine as a step observer; `disable()` removes both. While attached, the runner's plan times every step
on the eager executor (module hooks fire only there) and the engine reports the stages around the
forward; the executors the timed steps ran are counted. Wall-clock `time.perf_counter()`; on CUDA each
reading synchronizes the device first, so enabling the timers slows a GPU engine down.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from glassbox.engine.llm_engine import LLMEngine, RequestOutput
from glassbox.engine.step_plan import StepPlan

STAGES = ("tokenize", "queue", "embed", "attention", "mlp", "lm_head", "communication", "forward_other", "sample",
          "detokenize", "step_other")  # fmt: skip
_FORWARD_PARTS = ("embed", "attention", "mlp")  # timed inside the model's forward


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class LatencyStats:
    def __init__(self) -> None:
        self.enabled = False
        self.samples: dict[str, list[float]] = {stage: [] for stage in STAGES}
        # Running sums of the samples: a step's parts are read off their deltas.
        self.totals: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self.steps_by_executor: Counter[str] = Counter()
        self.last_plan: str | None = None
        self._undo: list[Callable[[], None]] = []
        self._covered_at_step_start = 0.0
        self._lm_head_at_step_start = 0.0
        self._cuda = False
        self._sync: Callable[[], None] = lambda: None
        # Seconds rank 0 has spent in the layers' collectives (tensor parallelism; 0 on one rank): what a hooked
        # part spent in them is the "communication" stage, not the part's.
        self._comm_seconds: Callable[[], float] = lambda: 0.0
        self._head_comm = 0.0  # of which inside the LM head (sampled rows' gather), a part of sampling

    # ---- switching
    def enable(self, engine: LLMEngine) -> dict[str, Any]:
        if self.enabled:
            return self.status()
        self.enabled = True
        self._cuda = engine.loaded.device.type == "cuda"
        self._sync = torch.cuda.synchronize if self._cuda else (lambda: None)
        model = engine.loaded.model
        if engine.distributed:
            comm = engine.runner.group.comm
            self._comm_seconds = lambda: comm.seconds
        self._hook(model.embedding, "embed")
        for layer in model.layers:
            self._hook(layer.attention, "attention")  # projections + attention + output projection
            self._hook(layer.mlp, "mlp")
        self._hook(model.lm_head, "lm_head")
        self._mark_step_start()
        engine.observers.append(self)
        self._undo.append(lambda: engine.observers.remove(self))
        return self.status()

    def disable(self) -> dict[str, Any]:
        while self._undo:
            self._undo.pop()()
        self.enabled = False
        return self.status()

    def reset(self) -> dict[str, Any]:
        for values in self.samples.values():
            values.clear()
        self.totals = dict.fromkeys(STAGES, 0.0)
        self.steps_by_executor.clear()
        self.last_plan = None
        self._covered_at_step_start = self._lm_head_at_step_start = self._head_comm = 0.0
        return self.status()

    def observe_request(self, out: RequestOutput) -> None:
        """Finish listener: the request's queue time."""
        if self.enabled and out.timings.get("queue_ms") is not None:
            self._record("queue", out.timings["queue_ms"] / 1000)

    # ---- the engine's reports (StepObserver)
    def on_stage(self, stage: str, seconds: float) -> None:
        self._record(stage, seconds)

    def on_step(self, plan: StepPlan, seconds: dict[str, float]) -> None:
        """A timed step: its forward, sampling (LM head included), detokenization and whole time. What the
        module hooks inside the forward did not cover is forward_other; what no stage covered, step_other."""
        self.steps_by_executor[plan.executor] += 1
        self.last_plan = str(plan)
        forward = seconds.get("forward", 0.0)
        covered = self._covered_in_forward() - self._covered_at_step_start
        self._record("forward_other", max(forward - covered, 0.0))
        if "sample" in seconds:
            lm_head = self.totals["lm_head"] + self._head_comm - self._lm_head_at_step_start
            self._record("sample", max(seconds["sample"] - lm_head, 0.0))
        self._record("detokenize", seconds.get("detokenize", 0.0))
        inside = forward + seconds.get("sample", 0.0) + seconds.get("detokenize", 0.0)
        self._record("step_other", max(seconds.get("step", 0.0) - inside, 0.0))
        self._mark_step_start()

    # ---- instrumentation
    def _mark_step_start(self) -> None:
        self._covered_at_step_start = self._covered_in_forward()
        self._lm_head_at_step_start = self.totals["lm_head"] + self._head_comm

    def _covered_in_forward(self) -> float:
        """Seconds the hooks inside the forward have recorded: its parts and their collectives."""
        return self._covered(_FORWARD_PARTS) + self.totals["communication"] - self._head_comm

    def _record(self, stage: str, seconds: float) -> None:
        self.samples[stage].append(seconds)
        self.totals[stage] += seconds

    def _covered(self, stages: tuple[str, ...]) -> float:
        return sum(self.totals[stage] for stage in stages)

    def _hook(self, module: nn.Module, stage: str) -> None:
        starts: list[float] = []

        def before(_module: nn.Module, _args: Any) -> None:
            self._sync()
            starts.append((time.perf_counter(), self._comm_seconds()))

        def after(_module: nn.Module, _args: Any, _out: Any) -> None:
            self._sync()
            start, comm_start = starts.pop()
            comm = self._comm_seconds() - comm_start
            self._record(stage, time.perf_counter() - start - comm)
            if comm > 0:
                self._record("communication", comm)
                if stage == "lm_head":
                    self._head_comm += comm

        handles = [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
        self._undo.append(lambda: [h.remove() for h in handles])

    # ---- report
    def status(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "timed_with": self.how()}

    def how(self) -> str:
        sync = " with torch.cuda.synchronize() before each reading" if self._cuda else ""
        return (
            "time.perf_counter() around forward hooks on the embedding, attention and MLP blocks and the LM head, "
            f"and the engine's own readings around tokenizing, the forward, sampling, detokenizing and the step{sync}; "
            "timed steps run the eager executor (module hooks fire only there); only while enabled"
        )

    def report(self) -> dict[str, Any]:
        stages = {}
        for stage, values in self.samples.items():
            ms = [v * 1000 for v in values]
            stages[stage] = {
                "count": len(ms),
                "total_ms": self.totals[stage] * 1000,
                "mean_ms": sum(ms) / len(ms) if ms else 0.0,
                "p50_ms": _percentile(ms, 0.5) if ms else 0.0,
                "p95_ms": _percentile(ms, 0.95) if ms else 0.0,
            }
        total = {stage: self.totals[stage] * 1000 for stage in STAGES}
        return {
            **self.status(),
            # The plans of the timed steps: which executor ran them (always the eager one while timed).
            "steps_by_executor": dict(self.steps_by_executor),
            "last_plan": self.last_plan,
            "stages": stages,
            # The design's summary: totals over everything timed since the last reset.
            "tokenize_ms": total["tokenize"],
            "embed_ms": total["embed"],
            "attention_ms": total["attention"],
            "mlp_ms": total["mlp"],
            "communication_ms": total["communication"],  # tensor parallelism: the layers' collectives on rank 0
            "output_ms": total["lm_head"] + total["sample"] + total["detokenize"],
            "total_ms": sum(v for k, v in total.items() if k != "queue"),
        }
