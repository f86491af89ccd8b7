"""Graceful shutdown with a drain timeout, and stopping the process when the engine cannot go on.

On SIGTERM (or Ctrl-C) uvicorn stops accepting connections and waits for the open ones; meanwhile the
drain here refuses new requests (503) and gives the requests in flight `shutdown_timeout_s` to finish.
Those still running then are failed with a "shutting down" error: each stream gets an error event and
`[DONE]`, each waiting response a 503, and the connections close, so uvicorn's own wait ends and the
process exits within the timeout (uvicorn is also given the timeout plus a margin, as a backstop).

uvicorn owns the signal handlers while it serves; `DrainOnSignal` wraps them for the lifespan of the app
(and puts them back after), so the drain starts on the same signal that starts uvicorn's shutdown.

If the engine dies (engine/async_engine.py: every waiter is answered at once), `exit_when_engine_dies`
sends the process SIGTERM, so uvicorn shuts down and the process ends with a non-zero status (uvicorn
re-raises the signal once it has shut down).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from types import FrameType
from typing import Any, Callable

from glassbox.server.engine_client import EngineClient

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
POLL_S = 0.05
BACKSTOP_S = 5.0  # uvicorn's own graceful-shutdown timeout is the drain's plus this


async def drain(client: EngineClient, timeout_s: float) -> None:
    """Refuse new requests, wait for those in flight up to `timeout_s`, then fail the rest."""
    client.draining = True
    if not client.is_alive:
        return  # a dead engine answered every waiter already
    deadline = time.monotonic() + timeout_s
    remaining = await client.num_unfinished()
    while remaining and time.monotonic() < deadline:
        await asyncio.sleep(POLL_S)
        remaining = await client.num_unfinished()
    if remaining:
        logger.warning("shutdown: %d request(s) still running after %.1f s; failing them", remaining, timeout_s)
        client.fail_all()


class DrainOnSignal:
    """While installed, SIGTERM/SIGINT start `drain` on the event loop, then reach uvicorn's handler."""

    def __init__(self, client: EngineClient, timeout_s: float) -> None:
        self.client, self.timeout_s = client, timeout_s
        self._previous: dict[int, Any] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task | None = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach the main thread only (a test server in a thread has no signals)
        self._loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, sig: int, frame: FrameType | None) -> None:
        if self.task is None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._start)
        previous = self._previous.get(sig)
        if callable(previous):
            previous(sig, frame)

    def _start(self) -> None:
        self.task = asyncio.ensure_future(drain(self.client, self.timeout_s))


def exit_when_engine_dies() -> Callable[[BaseException], None]:
    """A death listener for the engine: stop this process (SIGTERM to itself: uvicorn shuts down, then the
    process ends by the signal, a non-zero status)."""

    def stop(error: BaseException) -> None:
        logger.critical("the engine cannot go on (%s: %s); stopping the server", type(error).__name__, error)
        os.kill(os.getpid(), signal.SIGTERM)

    return stop
