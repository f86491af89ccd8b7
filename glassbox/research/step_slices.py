"""A private engine's step in slices of a few decoder layers, one slice per call on the serving engine's
thread, so a serving step (a new request's first token) waits behind one slice, not a whole private step.

/optimization/batch_schedule runs a set of requests through a private engine between serving steps. One
of its steps over 16 sequences is ~55 ms on a 2-core CPU (its prefill several times that): every request
arriving meanwhile waited for all of it. Here the private step runs on a thread of its own that hands
control back to the engine thread every few layers (TOKEN_LAYERS_PER_SLICE) and waits to be resumed:
exactly one of the two threads runs at any moment (a handover, not concurrency), so the private step never
shares the cores, the model or a KV pool binding with serving. Only the CPU's native layer path is cut this way (a
layer is one native call there); other paths run the private step whole.

The private step's kernels run on the engine thread all the same (Handover.on_caller): a parallel op on the
step's own thread would give it an OpenMP team of its own, alive as long as the thread, and two teams on
two cores slow every serving step (kernels/openmp.py). Its thread keeps the Python between them, on one
OpenMP thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from glassbox.engine.executors import NativeLayersExecutor
from glassbox.kernels.openmp import one_openmp_thread
from glassbox.layers.attention import AttentionMetadata
from glassbox.models import llama_native

# A slice's work in tokens x layers: ~10 ms on 2 cores (a 16-sequence decode step: 6 layers a slice, the LM
# head and sampling in the last; a 64-token prefill: one layer a slice).
TOKEN_LAYERS_PER_SLICE = 96


class SliceCancelled(BaseException):
    """Raised inside the private step when its run is dropped (the client left) while it was paused; a
    BaseException, so the engine's step does not take it for a failed step and go on."""


class Handover:
    """Runs fn() on its own thread, in turns with the caller: `resume()` (the engine thread) runs it to its
    next `pause()` (called by fn, on its thread) or to its end, and returns True at the end. Meanwhile fn
    may run work on the caller's thread (`on_caller`)."""

    def __init__(self) -> None:
        self._go, self._back = threading.Semaphore(0), threading.Semaphore(0)
        self._fn: Callable[[], Any] | None = None
        self.result: Any = None
        self._error: BaseException | None = None
        self._call: Callable[[], Any] | None = None  # asked of the caller's thread by on_caller
        self._answer: tuple[Any, BaseException | None] = (None, None)
        self._closed = False
        self.busy = False  # fn started and not ended
        self._thread = threading.Thread(target=self._main, name="glassbox-step-slices", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        one_openmp_thread()
        while True:
            self._go.acquire()
            if self._closed:
                return
            try:
                self.result = self._fn()
            except BaseException as error:  # handed to the caller of resume()
                self._error = error
            self.busy = False
            self._back.release()

    def start(self, fn: Callable[[], Any]) -> None:
        self._fn, self.result, self._error, self.busy = fn, None, None, True

    def resume(self) -> bool:
        """Run fn until its next pause or its end (then True; fn's error is raised here)."""
        self._go.release()
        self._back.acquire()
        while self._call is not None:  # fn asks for work on this thread, then waits for its answer
            call, self._call = self._call, None
            try:
                self._answer = (call(), None)
            except BaseException as error:  # raised on fn's thread
                self._answer = (None, error)
            self._go.release()
            self._back.acquire()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return not self.busy

    def pause(self) -> None:
        """On fn's thread: hand control back; returns once resumed (SliceCancelled if closed meanwhile)."""
        self._back.release()
        self._go.acquire()
        if self._closed:
            raise SliceCancelled

    def on_caller(self, call: Callable[[], Any]) -> Any:
        """On fn's thread: call() run on the thread in resume() (the engine's, whose OpenMP team runs the
        kernels), its result returned or its error raised here. Elsewhere (fn not running) call() runs at once."""
        if threading.current_thread() is not self._thread:
            return call()
        self._call = call
        self._back.release()
        self._go.acquire()
        (result, error), self._answer = self._answer, (None, None)
        if error is not None:
            raise error
        return result

    def close(self) -> None:
        """Drop fn where it is paused (its thread unwinds) and end the thread."""
        if self._closed:
            return
        self._closed, paused = True, self.busy  # (busy is stable here: fn's thread waits)
        self._go.release()  # a paused fn raises SliceCancelled; an idle thread returns
        if paused:
            self._back.acquire()  # fn has unwound
            self._go.release()  # and its thread, back at its wait, returns


class SlicedLayers(NativeLayersExecutor):
    """native_layers' forward (the same kernels, so the same bits as native_stack) with a pause every
    TOKEN_LAYERS_PER_SLICE / tokens layers (at least one), and after any layer at which `serving_waits()`
    says a serving request waits to be taken in: that request then waits for one layer (~1-4 ms on 2
    cores), not for the rest of a slice (under load, slices ran 8-17 ms, up to ~100). After a pause the
    private pool is bound again: the serving steps that ran meanwhile bound theirs to the same layers."""

    def __init__(
        self,
        model: nn.Module,
        handover: Handover,
        rebind: Callable[[], None],
        serving_waits: Callable[[], bool] = lambda: False,
    ) -> None:
        super().__init__(model)
        self.handover, self.rebind, self.serving_waits = handover, rebind, serving_waits

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        on_caller = self.handover.on_caller
        x, (cos, sin) = on_caller(lambda: self.model.embed(input_ids, positions))
        per_slice = max(1, TOKEN_LAYERS_PER_SLICE // input_ids.numel())
        since_pause = 0
        for layer in self.model.layers:
            if since_pause and (since_pause >= per_slice or self.serving_waits()):
                self.handover.pause()
                self.rebind()
                since_pause = 0
            since_pause += 1
            x = on_caller(lambda: llama_native.layer_forward(layer, x, cos, sin, meta))  # noqa: B023 (called at once)
        if self.serving_waits():  # (the LM head and sampling of a 16-sequence step are ~5 ms more)
            self.handover.pause()
        return on_caller(lambda: self.model.final_norm(x))
