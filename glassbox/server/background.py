"""Research work that needs no engine state — statistics over logits, a seeded random tensor, sharded
matmuls, a PNG — runs here, on background threads at the lowest CPU priority.

Why not `asyncio.to_thread`: on a small CPU that work competes with serving for the cores (a 40 ms
`torch.randn` beside a prefill's two OpenMP threads stalls their barriers). On Linux the threads run under
SCHED_IDLE (as do the threads they start: Linux gives a thread's policy to the threads it creates): a thread
of the engine that wakes takes the core at once. At nice 19, as they ran before, the scheduler lets the
running thread finish its slice first, and the engine's OpenMP worker waited at each wake: a few-token
prefill beside a research thread running tensor_split's work back to back took 15.1 ms (median; p75 89)
at nice 19, 12.0 (p75 14.8) under SCHED_IDLE, 11.4 with nothing beside it (interleaved on one engine,
2 cores; with a nice-19 client process and a thread making bursts of Python beside it too: 17.6 at nice
19, 15.5 under SCHED_IDLE, 17.1 with no research thread). Elsewhere they run at normal priority. (Work that
holds the GIL throughout, as torch writing a profiling trace does, does not belong here: at this priority
it would hold it longer, and serving waits for the GIL.)

And on one core each, without an OpenMP team of their own (kernels/openmp.py says why).
"""

from __future__ import annotations

import asyncio
import functools
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from glassbox.kernels.openmp import one_openmp_thread

T = TypeVar("T")


def _lowest_priority() -> None:
    """This thread under SCHED_IDLE (nice 19 where that is refused). Per thread: Linux only (elsewhere
    PRIO_PROCESS would lower the whole server)."""
    if sys.platform != "linux":
        return
    thread = threading.get_native_id()
    try:
        os.sched_setscheduler(thread, os.SCHED_IDLE, os.sched_param(0))
    except OSError:
        try:
            os.setpriority(os.PRIO_PROCESS, thread, 19)
        except OSError:
            pass


def _research_thread() -> None:
    _lowest_priority()
    one_openmp_thread()


class Background:
    def __init__(self, workers: int = 2) -> None:
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="glassbox-research", initializer=_research_thread)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on a background thread; await its result."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
