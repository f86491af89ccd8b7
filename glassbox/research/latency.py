"""Per-stage latency of the serving engine: tokenize, queue, embed, attention, mlp, lm_head, sample,
detokenize — plus what is left of the forward pass (norms, rotary, residuals) and of the step (scheduling,
metadata, bookkeeping), so that the stages of a step add up to the step.

Timers cost something, so they exist only while enabled: `enable()` attaches forward hooks to the model's
modules and wraps the engine's tokenizer, sampler and step from outside; `disable()` removes them all.
Wall-clock `time.perf_counter()` around each call; on CUDA each timer synchronizes the device first, so
enabling them slows a GPU engine down.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from glassbox.engine.llm_engine import LLMEngine, RequestOutput
from glassbox.layers.attention import Attention

STAGES = ("tokenize", "queue", "embed", "attention", "mlp", "lm_head", "forward_other", "sample", "detokenize", "step_other")
_FORWARD_PARTS = ("embed", "attention", "mlp")  # timed inside the model's forward


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class LatencyStats:
    def __init__(self) -> None:
        self.enabled = False
        self.samples: dict[str, list[float]] = {stage: [] for stage in STAGES}
        # Running sums of the samples: the step and forward wrappers read their parts off these deltas.
        self.totals: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self._undo: list[Callable[[], None]] = []
        self._forward_seconds = 0.0
        self._cuda = False
        self._sync: Callable[[], None] = lambda: None

    # ---- switching
    def enable(self, engine: LLMEngine) -> dict[str, Any]:
        if self.enabled:
            return self.status()
        self.enabled = True
        self._cuda = engine.loaded.device.type == "cuda"
        self._sync = torch.cuda.synchronize if self._cuda else (lambda: None)
        model = engine.loaded.model
        for module, stage in self._timed_modules(model):
            self._hook(module, stage)
        self._wrap(engine.tokenizer, "encode", "tokenize")
        self._wrap(engine.tokenizer, "decode", "detokenize")
        self._wrap(engine.runner, "sample", "sample")
        self._wrap_forward(model)
        self._wrap_step(engine)
        # A CUDA graph replays kernels without calling the modules, the native CPU layers call their kernels
        # without the submodules, and an overlapped decode step samples without `sample`: time steps
        # eagerly, on the plain forward, one at a time, meanwhile.
        runner = engine.runner
        saved = {name: getattr(runner, name) for name in ("use_graphs", "use_native", "overlap")}
        for name in saved:
            setattr(runner, name, False)
        self._undo.append(lambda: [setattr(runner, name, value) for name, value in saved.items()])
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
        return self.status()

    def observe_request(self, out: RequestOutput) -> None:
        """Finish listener: the request's queue time."""
        if self.enabled and out.timings.get("queue_ms") is not None:
            self._record("queue", out.timings["queue_ms"] / 1000)

    # ---- instrumentation
    @staticmethod
    def _timed_modules(model: nn.Module) -> list[tuple[nn.Module, str]]:
        found = []
        for name, module in model.named_modules():
            if isinstance(module, nn.Embedding) and name.endswith(("embed_tokens", "wte")):
                found.append((module, "embed"))
            elif any(isinstance(child, Attention) for child in module.children()):
                found.append((module, "attention"))  # projections + attention + output projection
            elif name.endswith(".mlp"):
                found.append((module, "mlp"))
            elif name == "lm_head":
                found.append((module, "lm_head"))
        return found

    def _record(self, stage: str, seconds: float) -> None:
        self.samples[stage].append(seconds)
        self.totals[stage] += seconds

    def _covered(self, stages: tuple[str, ...]) -> float:
        return sum(self.totals[stage] for stage in stages)

    def _hook(self, module: nn.Module, stage: str) -> None:
        starts: list[float] = []

        def before(_module: nn.Module, _args: Any) -> None:
            self._sync()
            starts.append(time.perf_counter())

        def after(_module: nn.Module, _args: Any, _out: Any) -> None:
            self._sync()
            self._record(stage, time.perf_counter() - starts.pop())

        handles = [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
        self._undo.append(lambda: [h.remove() for h in handles])

    def _wrap(self, owner: Any, attribute: str, stage: str) -> None:
        original = getattr(owner, attribute)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._sync()
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self._sync()
                self._record(stage, time.perf_counter() - start)

        setattr(owner, attribute, timed)  # an instance attribute, shadowing the method
        self._undo.append(lambda: delattr(owner, attribute) if attribute in vars(owner) else None)

    def _wrap_forward(self, model: nn.Module) -> None:
        """Time the whole forward; what its parts (embed, attention, mlp) do not cover is forward_other."""
        starts: list[tuple[float, float]] = []

        def before(_module: nn.Module, _args: Any) -> None:
            self._sync()
            starts.append((time.perf_counter(), self._covered(_FORWARD_PARTS)))

        def after(_module: nn.Module, _args: Any, _out: Any) -> None:
            self._sync()
            start, covered_before = starts.pop()
            self._forward_seconds = time.perf_counter() - start
            covered = self._covered(_FORWARD_PARTS) - covered_before
            self._record("forward_other", max(self._forward_seconds - covered, 0.0))

        handles = [model.register_forward_pre_hook(before), model.register_forward_hook(after)]
        self._undo.append(lambda: [h.remove() for h in handles])

    def _wrap_step(self, engine: LLMEngine) -> None:
        """Time each step; what the timed stages inside it do not cover is step_other."""
        original = engine.step

        # Timed inside a step outside the model's forward (the LM head runs on the sampled rows only).
        outside_forward = ("lm_head", "sample", "detokenize")

        def timed_step() -> list[RequestOutput]:
            self._forward_seconds = 0.0
            before = self._covered(outside_forward)
            start = time.perf_counter()
            outputs = original()
            elapsed = time.perf_counter() - start
            inside = self._forward_seconds + self._covered(outside_forward) - before
            self._record("step_other", max(elapsed - inside, 0.0))
            return outputs

        engine.step = timed_step
        self._undo.append(lambda: delattr(engine, "step"))

    # ---- report
    def status(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "timed_with": self.how()}

    def how(self) -> str:
        sync = " with torch.cuda.synchronize() before each reading" if self._cuda else ""
        return (
            "time.perf_counter() around forward hooks on the embedding, attention and MLP blocks and the LM head, "
            f"and around the engine's tokenizer, sampler and step{sync}; only while enabled"
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
            "stages": stages,
            # The design's summary: totals over everything timed since the last reset.
            "tokenize_ms": total["tokenize"],
            "embed_ms": total["embed"],
            "attention_ms": total["attention"],
            "mlp_ms": total["mlp"],
            "output_ms": total["lm_head"] + total["sample"] + total["detokenize"],
            "total_ms": sum(v for k, v in total.items() if k != "queue"),
        }
