"""The engine behind the server: a background thread steps the engine while there is work, and every
request gets an asyncio stream of its outputs.

All engine state is touched by the loop thread only. A request is made once, in the caller
(`make_request`: tokenizing and checking are thread-safe and touch no queue), then `stream(state)` hands
that same object over through a queue, as does `abort()`; `generate()` is the two in one. Anything else
that reads or changes the engine runs on the loop thread through `call(fn)`.

A step that raises fails only its own requests (their streams raise `RequestFailedError`, saying whose
fault it was) and the loop goes on (engine/llm_engine.py). If the engine cannot go on (`EngineFatalError`,
or any error outside a step), the loop stops: the engine is dead (`is_alive` turns False, /health says
503), every open stream gets `EngineDeadError` at once, every `call` waiting in the queue is answered,
and the death listeners run (the server stops its process with a non-zero status).

Give it a factory rather than a built engine to run the engine's set-up (weight layout, KV-pool fill)
on the loop thread too: on the CPU, torch ops issued from a second thread after the first has run
parallel work are ~25% slower (each thread gets its own OpenMP team), so all compute stays on one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Callable

from glassbox.engine.llm_engine import LLMEngine, RequestError, RequestOutput, RequestState
from glassbox.layers.sparsity import SparsityMethod
from glassbox.sampling import SamplingParams

logger = logging.getLogger(__name__)

YIELD_AFTER_OUTPUT_S = 0.0005
# While requests wait to be scheduled, calls wait for the steps that take them in: a new request's first
# token does not sit behind a research call. At most this many steps in a row, though (preempted requests
# can wait long under KV pressure, and a call must not starve).
CALLS_DEFERRED_AT_MOST = 8


class EngineDeadError(RuntimeError):
    """The engine loop stopped after an error; the server must be restarted."""


class RequestFailedError(RuntimeError):
    """The engine ended this request with an error (its step failed, or the server is shutting down);
    `error.fault` says whose fault it was."""

    def __init__(self, error: RequestError) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


def _deliver(items: list[tuple[_Stream, RequestOutput]]) -> None:
    for stream, item in items:
        stream.queue.put_nowait(item)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine], idle_wait_s: float = 0.5) -> None:
        self._factory = None if isinstance(engine, LLMEngine) else engine
        self.engine: LLMEngine = engine if isinstance(engine, LLMEngine) else None  # set by start()
        self._ready = threading.Event()
        # Serving's own operations (new requests, aborts), and calls (research, introspection): a request
        # waits behind at most one call, not behind every call queued before it.
        self._ops: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._stopping = False
        self._idle_wait_s = idle_wait_s
        self.error: BaseException | None = None
        self._finish_listeners: list[Callable[[RequestOutput], None]] = []
        self._death_listeners: list[Callable[[BaseException], None]] = []
        # Held while a stream registers or an op is queued, and while the dying loop answers them: nothing
        # slips in after the last answer and waits for ever.
        self._lock = threading.Lock()
        self._dead = False
        self._thread = threading.Thread(target=self._run, name="glassbox-engine", daemon=True)

    # ---- lifecycle
    def start(self) -> AsyncLLMEngine:
        """Start the loop thread; returns once the engine is built (raises what building raised)."""
        self._thread.start()
        self._ready.wait()
        if self.engine is None:
            raise self.error
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop (after its current step); streams still open get EngineDeadError."""
        self._stopping = True
        self._wakeup.set()
        self._thread.join(timeout)

    def add_death_listener(self, listener: Callable[[BaseException], None]) -> None:
        """Call listener(error) once, on the loop thread, if the engine dies (the loop cannot go on)."""
        self._death_listeners.append(listener)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def add_finish_listener(self, listener: Callable[[RequestOutput], None]) -> None:
        """Call listener(output) on the loop thread for every request that finishes (e.g. metrics)."""
        self._finish_listeners.append(listener)

    def submit(self, fn: Callable[[LLMEngine], Any]) -> None:
        """Run fn(engine) on the loop thread between steps, from any thread, without waiting."""
        self._submit(lambda: fn(self.engine), call=True)

    def call(self, fn: Callable[[LLMEngine], Any]) -> asyncio.Future:
        """Run fn(engine) on the loop thread between steps (for introspection and changes); await it.
        Once the loop has stopped (after an error, or shutdown) nothing else touches the engine, and fn
        runs at once in the caller: a dead server still answers /model_info and /metrics."""
        return asyncio.wrap_future(self._on_loop(fn))

    def call_blocking(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run fn(engine) on the loop thread and wait for it, from a thread without an event loop (start-up
        code, after start()); at once in the caller if the loop has stopped."""
        if self._thread.ident is None:
            raise RuntimeError("call_blocking() before start(): nothing would run fn")
        return self._on_loop(fn).result()

    def _on_loop(self, fn: Callable[[LLMEngine], Any]) -> concurrent.futures.Future:
        """fn(engine)'s result (or error) as a future, run on the loop thread between steps, or here once
        the loop has stopped. A caller that cancels before fn starts (a client gone) skips it."""
        future: concurrent.futures.Future = concurrent.futures.Future()

        def op() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(self._run_here(fn))
            except BaseException as error:  # handed to the caller, the engine goes on
                future.set_exception(error)

        if not self._submit(op, call=True):
            op()  # the loop has stopped: run here (a dead server still answers /model_info and /metrics)
        return future

    def serving_waits(self) -> bool:
        """Whether serving has work queued that the loop has not taken in: a new request (or an abort) not yet
        run, or a request waiting for its first step. Research work that holds the loop thread in slices
        (research/step_slices.py) asks it between two pieces and hands the thread back early when it is
        True, so a new request waits for one piece of research work, not a whole slice. For the loop thread
        and code it hands over to (it reads the scheduler); cheap enough to ask every few milliseconds."""
        return not self._ops.empty() or (self.engine is not None and self.engine.has_waiting_requests())

    def _loop_stopped(self) -> bool:
        return self._dead or (self._thread.ident is not None and not self._thread.is_alive())

    def _run_here(self, fn: Callable[[LLMEngine], Any]) -> Any:
        if self.engine is None:
            raise EngineDeadError(f"the engine was never built: {type(self.error).__name__}: {self.error}")
        return fn(self.engine)

    # ---- requests
    def make_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        sparsity: SparsityMethod | None = None,
    ) -> RequestState:
        """Tokenize and validate in the caller's thread (raises ValueError naming the problem); the
        result is what `stream` runs, so a prompt is tokenized once."""
        if not self.is_alive:
            raise EngineDeadError("the engine is not running")
        request_id = request_id or f"async-{next(self._ids)}"
        return self.engine.make_request(prompt, params, request_id, priority, sparsity)

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """A prompt's token ids (text is tokenized, ids are checked against the vocabulary); thread-safe."""
        return self.engine.encode_prompt(prompt)

    async def stream(self, state: RequestState) -> AsyncIterator[RequestOutput]:
        """Run a request made by `make_request`; yield its outputs as tokens arrive, the last one with
        finished=True. Leaving the iteration early (client gone, task cancelled) aborts the request and
        frees its blocks."""
        if not self.is_alive:
            raise EngineDeadError("the engine is not running")
        request_id = state.seq.request_id
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if self._dead:
                raise EngineDeadError(f"the engine stopped: {type(self.error).__name__}: {self.error}")
            self._streams[request_id] = stream
        self._submit(lambda: self._enqueue(state, stream))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine holds no more of it
                    raise item
                finished = item.finished
                if item.error is not None:
                    raise RequestFailedError(item.error)
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        sparsity: SparsityMethod | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """make_request + stream: the request's outputs as tokens arrive (see `stream`)."""
        outputs = self.stream(self.make_request(prompt, params, request_id, priority, sparsity))
        try:
            async for output in outputs:
                yield output
        finally:
            await outputs.aclose()  # now, not when collected: leaving early must abort at once

    def abort(self, request_id: str) -> None:
        self._submit(lambda: self.engine.abort(request_id))

    def fail_all(self, error: RequestError) -> None:
        """End every request now with `error` (the drain timeout of a shutdown): each stream gets it."""
        self._submit(lambda: self._deliver_outputs(self.engine.fail_requests(None, error)))

    # ---- the loop thread
    def _submit(self, op: Callable[[], None], call: bool = False) -> bool:
        """Queue op for the loop thread (a `call`: after serving's own); False (not queued) once the loop
        has stopped."""
        with self._lock:
            if self._loop_stopped():
                return False
            (self._calls if call else self._ops).put(op)
        self._wakeup.set()
        return True

    def _enqueue(self, state: RequestState, stream: _Stream) -> None:
        try:
            self.engine.enqueue(state)
        except ValueError as error:  # a request id in use: that stream's error, not the loop's
            stream.put(error)

    def _run_op(self, op: Callable[[], None]) -> None:
        """An op that raises is its caller's problem (a `call` hands the error back): the loop goes on."""
        try:
            op()
        except Exception:
            logger.exception("an operation submitted to the engine loop raised; the loop goes on")

    def _deliver_outputs(self, outputs: list[RequestOutput]) -> None:
        # One wake-up of each event loop per step, not one per token.
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = {}
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream, output))
            if output.finished:
                for listener in self._finish_listeners:
                    listener(output)
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_deliver, items)

    def _answer_everyone(self, error: BaseException) -> None:
        """The loop is gone: every open stream gets `error`, every queued op runs here (a `call` answers)."""
        with self._lock:
            self._dead = True
            streams = list(self._streams.values())
        for stream in streams:
            try:
                stream.put(error)
            except RuntimeError:  # its event loop is closed: nobody waits on it
                pass
        for ops in (self._ops, self._calls):
            while not ops.empty():
                self._run_op(ops.get())

    def _run(self) -> None:
        try:
            if self._factory is not None:
                self.engine = self._factory()
        except BaseException as error:
            self.error = error
            return
        finally:
            self._ready.set()
        deferred = 0  # steps run in a row while calls waited
        try:
            while not self._stopping:
                for _ in range(self._ops.qsize()):
                    self._run_op(self._ops.get())
                # Calls: one between two steps while requests run (a pipeline's or a schedule's steps, each
                # queued as soon as the last ends, would otherwise hold serving), none while requests wait
                # to be taken in (see CALLS_DEFERRED_AT_MOST); those queued by now if idle.
                busy = self.engine.has_unfinished_requests()
                if busy and self.engine.has_waiting_requests() and deferred < CALLS_DEFERRED_AT_MOST:
                    deferred += 1
                else:
                    deferred = 0
                    for _ in range(min(1, self._calls.qsize()) if busy else self._calls.qsize()):
                        self._run_op(self._calls.get())
                if not self.engine.has_unfinished_requests():
                    if not self._ops.empty() or not self._calls.empty():
                        continue
                    self._wakeup.wait(self._idle_wait_s)
                    self._wakeup.clear()
                    self.engine.check_alive()  # a tensor-parallel rank that died while idle stops the loop now
                    continue
                outputs = self.engine.step()
                self._deliver_outputs(outputs)
                if outputs:
                    # Let the event loop take the GIL and send these tokens now: the next step holds
                    # it most of the time, and the tokens would otherwise wait for that step to end.
                    time.sleep(YIELD_AFTER_OUTPUT_S)
            self._answer_everyone(EngineDeadError("the server is shutting down"))
        except BaseException as error:
            logger.exception("engine loop died")
            self.error = error
            self._answer_everyone(EngineDeadError(f"the engine stopped: {type(error).__name__}: {error}"))
            for listener in self._death_listeners:
                try:
                    listener(error)
                except Exception:
                    logger.exception("a death listener raised")
        finally:
            self.engine.shutdown()  # worker processes (tensor parallelism) end with the loop
