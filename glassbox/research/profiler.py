"""torch.profiler sessions around the engine's steps, started and stopped on the engine's loop thread
(where the model runs). Traces are written to a directory the server owns; clients get an id, never a
path.

Bounded (research/limits.py): a session stops recording by itself after `profiling_max_steps` engine steps
or `profiling_max_seconds`, whichever comes first (a step hook, so recording never outlives its budget even
if nobody calls stop); a session that recorded more than `profiling_max_events` events keeps no trace (its
summary is still given); a trace over `profiling_max_trace_bytes` is deleted unread; at most
`profiling_traces_kept` traces are kept, the oldest deleted first, and all of them when the server stops.
Only stopping the session runs on the engine thread: writing the trace runs in a forked child (Linux, no CUDA;
a worker thread otherwise), and reading the summary from it in a child process (research/trace_summary.py),
while serving goes on. A `with_stack` session records the engine's Python calls, not the event loop's
(`untrace_this_thread`).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.autograd.profiler import profile

from glassbox.engine.llm_engine import LLMEngine
from glassbox.errors import FieldError
from glassbox.research.limits import Limits

ACTIVITIES = ("cpu", "cuda")
TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
TRACE_EXPORT_TIMEOUT_S = 120.0  # a trace within profiling_max_trace_bytes is written in seconds


def yield_cores(pid: int) -> None:
    """Run process `pid` (0: this one) only on cores serving leaves idle (Linux's SCHED_IDLE; the lowest nice
    elsewhere). For the profiler's child processes: at nice 0 the trace writer took one of the two cores
    from a prefill's OpenMP team (prefill 10 -> 80-170 ms while it ran). A child shares no GIL with the
    server, so idle priority cannot stall serving (as it does for a thread of the server's own)."""
    try:
        if hasattr(os, "SCHED_IDLE"):
            os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
        else:
            os.setpriority(os.PRIO_PROCESS, pid, 19)
    except OSError:  # (gone already, or not allowed: it runs as it is)
        pass


def untrace_this_thread() -> None:
    """Stop a `with_stack` session's Python tracer from recording this thread's calls (torch hooks every
    thread of the process at start). The server's event loop calls it after a start: its calls (HTTP, JSON,
    other clients' requests) are not the engine's, and each one recorded is a stack that the session's
    stop turns into strings on the engine thread holding the GIL — 0.5-1.8 s with the event loop busy,
    every request of the server waiting."""
    sys.setprofile(None)


async def _export_trace(torch_session: profile, path: Path) -> None:
    """Write the session's Chrome trace. torch writes it in C++ holding the GIL throughout (0.3-1 s for a
    few steps with_stack, every request of the server waiting), so on Linux a forked child writes it
    (copy-on-write: the recorded events are already in its memory) while this process only waits for it;
    the child runs no torch op and touches no lock but the GIL it is forked with. Elsewhere, and once CUDA is
    initialized (a forked child must not touch it), a worker thread writes it."""
    if sys.platform != "linux" or torch.cuda.is_initialized():
        await asyncio.to_thread(torch_session.export_chrome_trace, str(path))
        return
    with warnings.catch_warnings():  # (3.12 warns of fork in a threaded process: the child only writes a file)
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: write, and leave without running any of the parent's exit code
        code = 1
        try:
            yield_cores(0)
            torch_session.export_chrome_trace(str(path))
            code = 0
        finally:
            os._exit(code)
    try:
        _, status = await asyncio.wait_for(asyncio.to_thread(os.waitpid, pid, 0), TRACE_EXPORT_TIMEOUT_S)
    except asyncio.TimeoutError:
        os.kill(pid, signal.SIGKILL)  # (its waitpid, still running on the worker thread, reaps it)
        raise RuntimeError(f"writing the profiling trace took over {TRACE_EXPORT_TIMEOUT_S} s; stopped") from None
    if os.waitstatus_to_exitcode(status) != 0 or not path.exists():
        raise RuntimeError(f"writing the profiling trace failed (child exit status {os.waitstatus_to_exitcode(status)})")


class ProfilerError(RuntimeError):
    """Asked to stop without a session, or to start a second one."""


class _Session:
    """One running (or finished recording) torch.profiler session and what it started from."""

    def __init__(self, torch_session: profile, engine: LLMEngine, options: dict[str, Any]) -> None:
        self.torch_session = torch_session
        self.options = options
        self.started = time.monotonic()
        self.steps_at_start = engine.num_steps
        self.executors_at_start = engine.executor_counts.copy()
        self.recording = True
        self.stopped_because: str | None = None  # the budget that ended recording early
        self.steps = 0
        self.executors: Counter[str] = Counter()


class Profiler:
    def __init__(self, limits: Limits | None = None, trace_dir: Path | None = None) -> None:
        self.limits = limits or Limits()
        self.trace_dir = trace_dir or Path(tempfile.mkdtemp(prefix="glassbox-traces-"))
        self._session: _Session | None = None
        self._traces: list[str] = []  # kept trace ids, oldest first
        self._lock = threading.Lock()  # the trace list: written off the engine thread

    @property
    def active(self) -> bool:
        return self._session is not None

    def start(
        self, engine: LLMEngine, activities: list[str] | None = None, record_shapes: bool = False, with_stack: bool = False
    ) -> dict[str, Any]:
        """On the engine thread. FieldError naming `activities` for one this machine cannot record."""
        if self._session is not None:
            raise ProfilerError("a profiling session is already running; stop it first")
        names = list(dict.fromkeys(activities or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])))
        unknown = [a for a in names if a not in ACTIVITIES]
        if unknown:
            raise FieldError("activities", f"unknown {unknown}; choose from {list(ACTIVITIES)}")
        if "cuda" in names and not torch.cuda.is_available():
            raise FieldError("activities", "'cuda' needs a CUDA device; this server runs on the CPU: use ['cpu']")
        # torch.autograd.profiler's profile (Kineto underneath), not torch.profiler's: the latter's first start
        # imports torch._inductor (~2 s on the engine thread, every request waiting).
        torch_session = profile(
            use_cpu="cpu" in names, use_device="cuda" if "cuda" in names else None, record_shapes=record_shapes,
            with_stack=with_stack, use_kineto=True,
        )  # fmt: skip
        torch_session.__enter__()  # if this raises nothing is kept: the next start begins afresh
        options = {"activities": names, "record_shapes": record_shapes, "with_stack": with_stack}
        self._session = _Session(torch_session, engine, options)
        engine.step_hooks.append(self._on_step)
        limits = self.limits
        return {
            "profiling": True,
            **options,
            "limits": {"max_steps": limits.profiling_max_steps, "max_seconds": limits.profiling_max_seconds},
        }

    def _on_step(self, engine: LLMEngine) -> None:
        """After each engine step: stop recording once the session has used its budget."""
        session = self._session
        if session is None or not session.recording:
            return
        steps = engine.num_steps - session.steps_at_start
        if steps >= self.limits.profiling_max_steps:
            self._stop_recording(engine, f"profiling_max_steps ({self.limits.profiling_max_steps} steps)")
        elif time.monotonic() - session.started >= self.limits.profiling_max_seconds:
            self._stop_recording(engine, f"profiling_max_seconds ({self.limits.profiling_max_seconds} s)")

    def _stop_recording(self, engine: LLMEngine, reason: str | None) -> None:
        session = self._session
        if session.recording:
            session.recording = False
            session.stopped_because = reason
            session.steps = engine.num_steps - session.steps_at_start
            session.executors = engine.executor_counts - session.executors_at_start
            session.torch_session.__exit__(None, None, None)
        if self._on_step in engine.step_hooks:
            engine.step_hooks.remove(self._on_step)

    def stop(self, engine: LLMEngine) -> _Session:
        """On the engine thread: end the session (recording stops now if it had not); `summarize` it next,
        off the engine thread."""
        if self._session is None:
            raise ProfilerError("no profiling session is running; POST /debug/profiling/start first")
        if self._session.recording and time.monotonic() - self._session.started >= self.limits.profiling_max_seconds:
            self._stop_recording(engine, f"profiling_max_seconds ({self.limits.profiling_max_seconds} s)")
        self._stop_recording(engine, None)
        session, self._session = self._session, None
        return session

    async def summarize(self, session: _Session, top: int = 25) -> dict[str, Any]:
        """The top operators by self time, and the trace's id (None if the session was over a budget).

        Off the engine thread: torch writes the trace (`_export_trace`), and a child process reads the summary from
        it (research/trace_summary.py: torch's own reading is Python over every event, and would take the
        GIL from serving for seconds). The child is started from the event loop: a thread at the lowest
        priority would hold the GIL while its child, of that priority, waits to run up to its exec
        (serving stalled ~0.2 s at a time)."""
        limits = self.limits
        trace_id = uuid.uuid4().hex
        path = self.trace_dir / f"{trace_id}.json"
        await _export_trace(session.torch_session, path)
        size = path.stat().st_size
        result: dict[str, Any] = {
            "trace_id": None,
            "steps": session.steps,
            # Each step's forward is named after its executor in the trace: glassbox::forward[<executor>].
            "steps_by_executor": dict(session.executors),
            "num_events": None,
            "recording_stopped_by": session.stopped_because,
            "top_ops_by_self_cpu_time": None,
        }
        if size > limits.profiling_max_trace_bytes:
            path.unlink()
            result["trace_omitted"] = (
                f"profiling_max_trace_bytes: the trace is {size} bytes, over the limit of {limits.profiling_max_trace_bytes}"
                " (the summary is read from the trace: none either)"
            )
            return result
        try:
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "glassbox.research.trace_summary", str(path), "--top", str(top),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            yield_cores(child.pid)  # (it has just exec'd: its start-up is still ahead)
            out, err = await child.communicate()
            if child.returncode != 0:
                raise RuntimeError(f"the trace summary failed: {err.decode(errors='replace')[-500:]}")
            summary = json.loads(out)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        result.update(summary)
        if summary["num_events"] > limits.profiling_max_events:
            path.unlink()
            result["trace_omitted"] = (
                f"profiling_max_events: {summary['num_events']} events recorded, over the limit of {limits.profiling_max_events}"
            )
        else:
            result["trace_id"], result["trace_bytes"] = trace_id, size
            result["deleted_traces"] = self._keep(trace_id)
        return result

    def _keep(self, trace_id: str) -> list[str]:
        """Record a new trace; delete the oldest beyond `profiling_traces_kept`. Returns the deleted ids."""
        with self._lock:
            self._traces.append(trace_id)
            deleted = self._traces[: -self.limits.profiling_traces_kept]
            self._traces = self._traces[-self.limits.profiling_traces_kept :]
        for old in deleted:
            (self.trace_dir / f"{old}.json").unlink(missing_ok=True)
        return deleted

    def delete(self, trace_id: str) -> bool:
        path = self.trace_path(trace_id)
        if path is None:
            return False
        with self._lock:
            if trace_id in self._traces:
                self._traces.remove(trace_id)
        path.unlink(missing_ok=True)
        return True

    def traces(self) -> list[str]:
        with self._lock:
            return list(self._traces)

    def close(self) -> None:
        """Delete every trace (server shutdown)."""
        shutil.rmtree(self.trace_dir, ignore_errors=True)

    def trace_path(self, trace_id: str) -> Path | None:
        """The trace file of an id, or None; ids are checked so no other path can be named."""
        if not TRACE_ID.match(trace_id):
            return None
        path = self.trace_dir / f"{trace_id}.json"
        return path if path.is_file() else None
