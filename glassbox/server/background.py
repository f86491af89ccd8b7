"""Research work that needs no engine state — statistics over logits, a seeded random tensor, sharded
matmuls, a PNG — runs here, on background threads at the lowest CPU priority.

Why not `asyncio.to_thread`: on a small CPU that work competes with serving for the cores (a 40 ms
`torch.randn` beside a prefill's two OpenMP threads stalls their barriers). At nice 19, as are the OpenMP
threads it starts (Linux gives a thread's priority to the threads it creates), the engine's threads take
the cores whenever they have work, and research runs in what is left. (Work that holds the GIL
throughout, as torch writing a profiling trace does, does not belong here: at this priority it would
hold it longer, and serving waits for the GIL.)
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

T = TypeVar("T")


def _lowest_priority() -> None:
    if sys.platform == "linux":  # per thread there (elsewhere PRIO_PROCESS would lower the whole server)
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass


class Background:
    def __init__(self, workers: int = 2) -> None:
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="glassbox-research", initializer=_lowest_priority)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on a background thread; await its result."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
