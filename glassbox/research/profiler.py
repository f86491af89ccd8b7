"""torch.profiler sessions around the engine's steps, started and stopped on the engine's loop thread
(where the model runs). Traces are written to a directory the server owns; clients get an id, never a
path."""

from __future__ import annotations

import re
import tempfile
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from glassbox.engine.llm_engine import LLMEngine

ACTIVITIES = {"cpu": ProfilerActivity.CPU, "cuda": ProfilerActivity.CUDA}
TRACE_ID = re.compile(r"^[0-9a-f]{32}$")


class ProfilerError(RuntimeError):
    """Asked to stop without a session, or to start a second one."""


class Profiler:
    def __init__(self, trace_dir: Path | None = None) -> None:
        self.trace_dir = trace_dir or Path(tempfile.mkdtemp(prefix="glassbox-traces-"))
        self._session: profile | None = None
        self._steps_at_start = 0
        self._executors_at_start: Counter[str] = Counter()

    @property
    def active(self) -> bool:
        return self._session is not None

    def start(
        self, engine: LLMEngine, activities: list[str] | None = None, record_shapes: bool = False, with_stack: bool = False
    ) -> dict[str, Any]:
        if self._session is not None:
            raise ProfilerError("a profiling session is already running; stop it first")
        names = activities or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
        unknown = [a for a in names if a not in ACTIVITIES]
        if unknown:
            raise ValueError(f"activities: unknown {unknown}; choose from {sorted(ACTIVITIES)}")
        self._session = profile(
            activities=[ACTIVITIES[a] for a in names], record_shapes=record_shapes, with_stack=with_stack
        )
        self._session.start()
        self._steps_at_start = engine.num_steps
        self._executors_at_start = engine.executor_counts.copy()
        return {"profiling": True, "activities": names, "record_shapes": record_shapes, "with_stack": with_stack}

    def stop(self, engine: LLMEngine, top: int = 25) -> dict[str, Any]:
        if self._session is None:
            raise ProfilerError("no profiling session is running; POST /debug/profiling/start first")
        session, self._session = self._session, None
        session.stop()
        trace_id = uuid.uuid4().hex
        session.export_chrome_trace(str(self.trace_dir / f"{trace_id}.json"))
        rows = sorted(session.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
        return {
            "trace_id": trace_id,
            "steps": engine.num_steps - self._steps_at_start,
            # Each step's forward is named after its executor in the trace: glassbox::forward[<executor>].
            "steps_by_executor": dict(engine.executor_counts - self._executors_at_start),
            "top_ops_by_self_cpu_time": [
                {
                    "name": e.key,
                    "calls": e.count,
                    "self_cpu_ms": e.self_cpu_time_total / 1000,
                    "cpu_total_ms": e.cpu_time_total / 1000,
                }
                for e in rows
            ],
        }

    def trace_path(self, trace_id: str) -> Path | None:
        """The trace file of an id, or None; ids are checked so no other path can be named."""
        if not TRACE_ID.match(trace_id):
            return None
        path = self.trace_dir / f"{trace_id}.json"
        return path if path.is_file() else None
