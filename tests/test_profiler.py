"""research/profiler.py's ways of keeping a profiling session off serving's GIL: a `with_stack` session does
not trace the threads that opt out (the server's event loop), and the trace is written by a forked child."""

import asyncio
import json
import os
import sys
import threading

import pytest
import torch
from torch.autograd.profiler import profile

from glassbox.research.profiler import _export_trace, untrace_this_thread


def glassbox_traced_marker() -> int:
    return 1


def glassbox_untraced_marker() -> int:
    return 2


def test_a_with_stack_session_skips_the_threads_that_opt_out(tmp_path):
    go, done = threading.Event(), [threading.Event(), threading.Event()]

    def worker(index: int, opt_out: bool) -> None:
        go.wait()
        if opt_out:
            untrace_this_thread()
        for _ in range(50):
            (glassbox_untraced_marker if opt_out else glassbox_traced_marker)()
        done[index].set()

    threads = [threading.Thread(target=worker, args=(0, True)), threading.Thread(target=worker, args=(1, False))]
    for thread in threads:  # running before the session starts: torch hooks every thread there is
        thread.start()
    session = profile(use_cpu=True, with_stack=True, use_kineto=True)
    session.__enter__()
    go.set()
    for event in done:
        event.wait()
    torch.randn(8, 8).sum()
    session.__exit__(None, None, None)
    for thread in threads:
        thread.join()
    asyncio.run(_export_trace(session, tmp_path / "trace.json"))
    names = {event.get("name", "") for event in json.loads((tmp_path / "trace.json").read_text())["traceEvents"]}
    assert any("glassbox_traced_marker" in name for name in names)  # other threads are traced...
    assert not any("glassbox_untraced_marker" in name for name in names)  # ...but not one that opted out


@pytest.mark.skipif(sys.platform != "linux", reason="the forked writer is Linux's")
def test_the_trace_written_by_a_forked_child_is_torchs(tmp_path):
    x = torch.randn(16, 16)
    with profile(use_cpu=True, record_shapes=True, use_kineto=True) as session:
        (x @ x).relu()
    asyncio.run(_export_trace(session, tmp_path / "child.json"))
    session.export_chrome_trace(str(tmp_path / "here.json"))
    child, here = (json.loads((tmp_path / f"{name}.json").read_text())["traceEvents"] for name in ("child", "here"))
    assert [e.get("name") for e in child] == [e.get("name") for e in here]
    assert any(e.get("name") == "aten::mm" for e in child)


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux's SCHED_IDLE")
def test_the_profilers_child_processes_run_on_idle_cores_only():
    """The trace writer and the summary reader take no core time that serving wants (yield_cores)."""
    import subprocess

    from glassbox.research.profiler import yield_cores

    child = subprocess.Popen(["sleep", "5"])
    try:
        assert os.sched_getscheduler(child.pid) != os.SCHED_IDLE
        yield_cores(child.pid)
        assert os.sched_getscheduler(child.pid) == os.SCHED_IDLE
    finally:
        child.kill()
        child.wait()
