"""Scheduling policies and sparse-attention methods by name: one registry for the built-ins and for what an
`--plugin` file registers.

Every lookup by name goes through it: the Scheduler's `policy="fcfs"` (engine/policies.get_policy), a
request's `sparsity.method` (layers/sparsity.parse_sparsity), the REST API's `algorithm` fields, and the
command line (`glassbox serve --scheduling-policy`, `glassbox algorithms`). The modules that define the
built-ins add them when imported (engine/policies.py, layers/sparsity.py), so look names up through those
functions; research/plugins.py replaces the plugin's entries as a whole on every reload.

One per process, on purpose: a name must resolve where no server object reaches (the Scheduler, built
inside the engine, gets only a string), and the plugin file comes from the command line, one per process.
Plain Python that imports nothing from glassbox, so every layer, the torch-free scheduler included, may use it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Generic, TypeVar

Entry = TypeVar("Entry", bound=type)


class UnknownNameError(ValueError):
    """A name that no built-in, alias or plugin entry has; the message lists the known ones."""

    def __init__(self, kind: str, name: object, known: list[str]) -> None:
        super().__init__(f"unknown {kind} {name!r}; choose one of {', '.join(known)}")
        self.kind, self.name, self.known = kind, name, known


class NameTable(Generic[Entry]):
    """Classes of one kind by their `name` attribute: built-ins (with aliases) first, then the plugin's."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._builtin: dict[str, Entry] = {}
        self._aliases: dict[str, str] = {}  # alias -> built-in name
        # Replaced whole, never changed in place: a reader on another thread sees one plugin version or the next.
        self._plugin: dict[str, Entry] = {}
        self._lock = threading.Lock()

    def add_builtin(self, entry: Entry, aliases: tuple[str, ...] = ()) -> Entry:
        with self._lock:
            self._builtin[entry.name] = entry
            self._aliases.update({alias: entry.name for alias in aliases})
        return entry

    def set_plugin_entries(self, entries: dict[str, Entry]) -> None:
        """The plugin's entries, replacing its previous version's (names it no longer registers are gone)."""
        clashes = [name for name in entries if self.is_builtin(name)]
        if clashes:
            raise ValueError(f"{self.kind} name {clashes[0]!r} is built in; choose another")
        with self._lock:
            self._plugin = dict(entries)

    def is_builtin(self, name: str) -> bool:
        return name in self._builtin or name in self._aliases

    def get(self, name: str) -> Entry:
        """The class named `name` (or an alias of it); UnknownNameError listing every known name."""
        plugin = self._plugin
        canonical = self._aliases.get(name, name) if isinstance(name, str) else name
        if canonical in self._builtin:
            return self._builtin[canonical]
        if canonical in plugin:
            return plugin[canonical]
        raise UnknownNameError(self.kind, name, self.names())

    def entries(self) -> dict[str, Entry]:
        """Every class by its own name (no aliases): built-ins first."""
        return {**self._builtin, **self._plugin}

    def names(self) -> list[str]:
        """Every name a user may give: built-ins, their aliases, the plugin's."""
        return [*self._builtin, *self._aliases, *self._plugin]

    def aliases_of(self, name: str) -> list[str]:
        return [alias for alias, target in self._aliases.items() if target == name]

    def is_from_plugin(self, name: str) -> bool:
        return name in self._plugin

    def plugin_entries(self) -> dict[str, Entry]:
        return self._plugin

    def plugin_modules(self) -> set[str]:
        """The module names of the plugin's entries (one plugin file: usually one name)."""
        return {entry.__module__ for entry in self._plugin.values()}


@dataclass(frozen=True)
class AlgorithmFault:
    """An algorithm that raised while serving: `kind` ("scheduling policy" / "sparsity method"), its name,
    the error, and whether it came from the plugin file (a plugin's fault is the plugin's, not the server's)."""

    kind: str
    name: str
    error: str
    from_plugin: bool


class AlgorithmRegistry:
    """The two kinds of algorithm a researcher swaps: who runs next, and which keys a query attends to."""

    def __init__(self) -> None:
        self.scheduling_policies: NameTable = NameTable("scheduling policy")
        self.sparsity_methods: NameTable = NameTable("sparsity method")
        # Called with each fault the engine reports (research/plugins.py unloads a plugin that raised).
        self._fault_listeners: list[Callable[[AlgorithmFault], None]] = []

    def add_fault_listener(self, listener: Callable[[AlgorithmFault], None]) -> None:
        self._fault_listeners.append(listener)

    def remove_fault_listener(self, listener: Callable[[AlgorithmFault], None]) -> None:
        if listener in self._fault_listeners:
            self._fault_listeners.remove(listener)

    def fault(self, table: NameTable, name: str, error: BaseException | str) -> AlgorithmFault:
        """Describe an algorithm that raised (before the plugin is unloaded: where it came from is known now)."""
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        return AlgorithmFault(table.kind, name, text, table.is_from_plugin(name))

    def report_fault(self, fault: AlgorithmFault) -> None:
        """Tell the listeners (on the engine's thread, between steps)."""
        for listener in list(self._fault_listeners):
            listener(fault)

    def plugin_in_traceback(self, traceback: TracebackType | None) -> tuple[NameTable, str] | None:
        """(table, entry name) of the plugin entry whose module raised, if a frame of the traceback runs
        plugin code: an error inside a plugin's method is the plugin's fault, wherever the engine called it."""
        tables = (self.scheduling_policies, self.sparsity_methods)
        modules = set().union(*(table.plugin_modules() for table in tables))
        if not modules:
            return None
        found = None
        while traceback is not None:
            frame = traceback.tb_frame
            module = frame.f_globals.get("__name__")
            if module in modules:
                owner = frame.f_locals.get("self", frame.f_locals.get("cls"))
                owner = owner if isinstance(owner, type) else type(owner)
                for table in tables:
                    for name, entry in table.plugin_entries().items():
                        if entry is owner:
                            return table, name  # a method of this plugin class raised
                        if found is None and entry.__module__ == module:
                            found = (table, name)  # a helper of the plugin's module: its first entry
            traceback = traceback.tb_next
        return found


ALGORITHMS = AlgorithmRegistry()
