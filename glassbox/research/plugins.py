"""Algorithm plugins: a Python file named on the command line (`glassbox serve --plugin my_algo.py`) that
registers scheduling policies and sparse-attention methods, reloaded when the file changes —
the weights stay loaded. A plugin that fails to import or to register is reported and the last good
version keeps serving. Plugins come only from the command line, never from a request.

A plugin whose policy or method raises while serving is unloaded as a whole (the engine reports the fault
through `ALGORITHMS.report_fault`): the built-ins take over (FCFS, no global mask), /plugins shows the
error, and the file is loaded again when it changes.

What it registers joins the built-ins in the one registry (glassbox/algorithms.py), so every place that
takes a name takes the plugin's too: `--scheduling-policy` (the file is loaded before the engine is built),
/optimization/scheduling_policy and /batch_schedule's `algorithm`, any request's `sparsity.method`.

A plugin file:

    from glassbox.engine.policies import SchedulingPolicy, get_policy
from glassbox.engine.scheduler import FALLBACK_POLICY

    class LongestFirst(SchedulingPolicy):
        name = "longest_first"
        description = "longest prompt first"
        def key(self, seq):
            return (-seq.num_prompt_tokens, seq.arrival_time)

    class LocalOnly(SparsityMethod):          # from glassbox.layers.sparsity import Params, SparsityMethod
        name = "local_only"
        def __init__(self, window): self.window = window
        @classmethod
        def parse(cls, params: Params):
            return cls(params.number("window", 8, integer=True, minimum=1))
        def keep(self, x):                      # x: MaskInputs; -> bool broadcastable to [H, Lq, Lk]
            return x.k_positions > x.q_positions - self.window

    def register(registry):
        registry.scheduling_policy(LongestFirst)
        registry.sparsity_method(LocalOnly, example={"window": 4})
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from glassbox.algorithms import ALGORITHMS, AlgorithmFault
from glassbox.engine.llm_engine import LLMEngine
from glassbox.engine.policies import SchedulingPolicy, get_policy
from glassbox.engine.scheduler import FALLBACK_POLICY
from glassbox.layers.sparsity import SparsityMethod, SparsityState, parse_sparsity

logger = logging.getLogger(__name__)


class PluginEntries:
    """What a plugin's `register(registry)` fills, checked entry by entry. Published to the one registry
    (glassbox/algorithms.py) as a whole once the file has loaded, replacing the previous version's."""

    def __init__(self) -> None:
        self.policies: dict[str, type[SchedulingPolicy]] = {}
        self.sparsity_methods: dict[str, type[SparsityMethod]] = {}

    def scheduling_policy(self, policy: type[SchedulingPolicy]) -> None:
        if not (isinstance(policy, type) and issubclass(policy, SchedulingPolicy)):
            raise TypeError("scheduling_policy() takes a SchedulingPolicy subclass")
        if ALGORITHMS.scheduling_policies.is_builtin(policy.name):
            raise ValueError(f"policy name {policy.name!r} is built in; choose another")
        self.policies[policy.name] = policy

    def sparsity_method(self, method: type[SparsityMethod], example: dict[str, Any] | None = None) -> None:
        """Register a sparse-attention method. It is tried once on random scores with the `example`
        parameters, so a method that raises or returns a wrong shape fails the load, not a request."""
        if not (isinstance(method, type) and issubclass(method, SparsityMethod)):
            raise TypeError("sparsity_method() takes a SparsityMethod subclass")
        if ALGORITHMS.sparsity_methods.is_builtin(method.name):
            raise ValueError(f"sparsity method name {method.name!r} is built in; choose another")
        instance = parse_sparsity({"method": method.name, **(example or {})}, {method.name: method})
        _try_method(instance)
        self.sparsity_methods[method.name] = method


def _try_method(method: SparsityMethod, heads: int = 2, q_len: int = 5, context_len: int = 9, dim: int = 8) -> None:
    """Run the method on one random prefill chunk; raise what it raised."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(q_len, heads, dim, generator=generator)
    keys = torch.randn(context_len, 1, dim, generator=generator)
    allowed = torch.arange(context_len)[None, :] <= torch.arange(context_len - q_len, context_len)[:, None]
    scores = torch.einsum("qhd,kd->hqk", q, keys[:, 0]).masked_fill(~allowed, float("-inf"))
    state = SparsityState(method)
    state.select(0, scores, allowed, q, keys)
    if state.error:
        raise RuntimeError(f"sparsity method {method.name!r} failed on a test input: {state.error}")


class PluginManager:
    """Loads the plugin file into the registry, and again whenever it changes (`watch`). Load it before the
    engine is built, so that `--scheduling-policy` may name one of its policies."""

    def __init__(self, path: Path, on_reload: Callable[[PluginEntries], None] | None = None, poll_s: float = 0.25) -> None:
        self.path = path
        self.poll_s = poll_s
        self.entries = PluginEntries()
        self.version = 0  # successful loads
        self.last_error: str | None = None
        self.loaded_at: float | None = None
        self._listeners: list[Callable[[PluginEntries], None]] = [on_reload] if on_reload is not None else []
        self._unload_listeners: list[Callable[[PluginEntries], None]] = []
        self._mtime: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.unloaded_at: float | None = None
        self.faults = 0  # times an entry raised while serving
        ALGORITHMS.add_fault_listener(self._on_fault)

    def add_unload_listener(self, listener: Callable[[PluginEntries], None]) -> None:
        """Call listener(the unloaded entries) when a fault unloads the plugin, on the thread that reported
        it (the engine's loop thread)."""
        self._unload_listeners.append(listener)

    def _on_fault(self, fault: AlgorithmFault) -> None:
        """An entry of this plugin raised while serving: unload the plugin; the built-ins take over."""
        if not fault.from_plugin:
            return
        unloaded, self.entries = self.entries, PluginEntries()
        ALGORITHMS.scheduling_policies.set_plugin_entries({})
        ALGORITHMS.sparsity_methods.set_plugin_entries({})
        self.faults += 1
        self.unloaded_at = time.time()
        self.last_error = (
            f"{fault.kind} {fault.name!r} raised {fault.error} while serving: the plugin was unloaded and the "
            "built-ins serve; it loads again when the file changes"
        )
        logger.error("plugin %s: %s", self.path, self.last_error)
        for listener in self._unload_listeners:
            listener(unloaded)

    def add_listener(self, listener: Callable[[PluginEntries], None]) -> None:
        """Call listener(entries) after every successful (re)load, on the thread that loaded."""
        self._listeners.append(listener)

    def load(self) -> bool:
        """(Re)load the file; on failure keep the last good version in the registry and record the error."""
        try:
            self._mtime = self.path.stat().st_mtime
            spec = importlib.util.spec_from_file_location(f"glassbox_plugin_{self.version + 1}", self.path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            register = getattr(module, "register", None)
            if not callable(register):
                raise AttributeError("the plugin defines no register(registry) function")
            entries = PluginEntries()
            register(entries)
        except Exception as error:  # a researcher's file: any error is reported, none stops the server
            self.last_error = f"{type(error).__name__}: {error}"
            logger.error("plugin %s failed to load, keeping version %d:\n%s", self.path, self.version, traceback.format_exc())
            return False
        ALGORITHMS.scheduling_policies.set_plugin_entries(entries.policies)
        ALGORITHMS.sparsity_methods.set_plugin_entries(entries.sparsity_methods)
        self.entries, self.last_error, self.unloaded_at = entries, None, None
        self.version += 1
        self.loaded_at = time.time()
        logger.warning(
            "plugin %s loaded (version %d): policies %s, sparsity methods %s",
            self.path, self.version, sorted(entries.policies), sorted(entries.sparsity_methods),
        )
        for listener in self._listeners:
            listener(entries)
        return True

    def watch(self) -> PluginManager:
        """Reload whenever the file's modification time changes (polled)."""
        self._thread = threading.Thread(target=self._poll, name="glassbox-plugins", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        ALGORITHMS.remove_fault_listener(self._on_fault)

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                mtime = self.path.stat().st_mtime
            except OSError:
                continue
            if mtime != self._mtime:
                self.load()

    def status(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "version": self.version,
            "loaded_at": self.loaded_at,
            "policies": sorted(self.entries.policies),
            "sparsity_methods": sorted(self.entries.sparsity_methods),
            "error": self.last_error,
            "unloaded": self.unloaded_at is not None,
            "unloaded_at": self.unloaded_at,
            "faults": self.faults,
        }


def follow_new_version(engine: LLMEngine, entries: PluginEntries) -> None:
    """After a reload, on the engine's loop thread between steps: a serving policy or global sparsity mask
    that came from the plugin is replaced by its new version (the registry already holds it)."""
    current = engine.scheduler.policy.name
    if current in entries.policies:
        engine.scheduler.policy = entries.policies[current]()
    mask = engine.default_sparsity
    if mask is not None and mask.name in entries.sparsity_methods:
        try:
            engine.default_sparsity = parse_sparsity(mask.spec())
        except Exception:  # the new version rejects the old parameters: the global mask is dropped
            logger.exception("plugin reload: the global sparsity mask %s no longer parses; cleared", mask.spec())
            engine.default_sparsity = None


def fall_back_to_builtins(engine: LLMEngine, unloaded: PluginEntries) -> None:
    """After a fault unloaded the plugin, on the engine's loop thread: a serving policy or global mask of
    the plugin gives way to the built-ins (FCFS, no mask)."""
    if engine.scheduler.policy.name in unloaded.policies:
        engine.scheduler.policy = get_policy(FALLBACK_POLICY)
    mask = engine.default_sparsity
    if mask is not None and mask.name in unloaded.sparsity_methods:
        engine.default_sparsity = None
