"""Imports point down only: the engine imports nothing from the server or research code, and the model
files nothing from the engine."""

from __future__ import annotations

import subprocess
import sys


def imported_glassbox_modules(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(m for m in sys.modules if m.startswith('glassbox')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_engine_imports_no_server_or_research_code():
    for module in ("glassbox.engine.llm_engine", "glassbox.engine.async_engine", "glassbox.llm"):
        mods = imported_glassbox_modules(module)
        assert not {m for m in mods if m.startswith(("glassbox.server", "glassbox.research"))}, mods


def test_models_import_no_engine_code():
    for module in ("glassbox.models.loader", "glassbox.models.llama", "glassbox.models.gpt2"):
        mods = imported_glassbox_modules(module)
        assert not {m for m in mods if m.startswith(("glassbox.engine", "glassbox.server", "glassbox.research"))}, mods


def test_scheduler_and_block_manager_do_not_import_torch():
    code = "import sys, glassbox.engine.scheduler, glassbox.engine.block_manager; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ---- what runs in a step is chosen by the runner's plan, not by patching the model (issue "Structure")
import ast  # noqa: E402
from pathlib import Path  # noqa: E402

PACKAGE = Path(__file__).resolve().parent.parent / "glassbox"


def _modules() -> dict[str, ast.Module]:
    """glassbox's modules by dotted name, parsed."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(), str(path))
    return found


def _attribute_targets(tree: ast.Module) -> list[ast.Attribute]:
    """Attributes assigned anywhere (x.a = ..., x.a += ..., setattr(x, "a", ...) as a fake Attribute)."""
    targets = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                for element in ast.walk(target):
                    if isinstance(element, ast.Attribute):
                        targets.append(element)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr"):
            if len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
                targets.append(ast.Attribute(value=node.args[0], attr=node.args[1].value, lineno=node.lineno))
    return targets


def test_no_module_assigns_a_forward_at_run_time():
    """Fast paths are executors the plan chooses (engine/executors.py), not `forward` methods replaced on
    modules; a `def forward` in a class body is a definition, not an assignment, and is not flagged."""
    offenders = [
        f"{name}:{target.lineno}"
        for name, tree in _modules().items()
        for target in _attribute_targets(tree)
        if target.attr == "forward"
    ]
    assert not offenders, f"forward assigned at run time: {offenders}"


def test_no_glassbox_attributes_on_models():
    """No `glassbox_*` attribute is set on (or read back from) a model: state lives on the engine's objects.
    Reads through getattr/hasattr with a "glassbox_..." name count too."""
    offenders = []
    for name, tree in _modules().items():
        for target in _attribute_targets(tree):
            if target.attr.startswith("glassbox_"):
                offenders.append(f"{name}:{target.lineno} sets {target.attr}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("glassbox_"):
                offenders.append(f"{name}:{node.lineno} reads {node.attr}")
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr", "setattr", "delattr")
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and str(node.args[1].value).startswith("glassbox_")
            ):
                offenders.append(f"{name}:{node.lineno} {node.func.id}({node.args[1].value!r})")
    assert not offenders, offenders


def _imports(name: str, tree: ast.Module) -> set[str]:
    """The glassbox modules a module imports, at any depth of its code (imports inside functions too)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:  # relative: from the package of `name`
                package = name.split(".")[: -node.level]
                base = ".".join(package + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return {m for m in found if m.startswith("glassbox")}


def test_server_has_no_import_cycle():
    """The server's modules import each other one way only: routes import schemas, shared helpers and the
    engine client, never each other or the app module that includes them."""
    modules = _modules()
    server = {name for name in modules if name.startswith("glassbox.server")}
    graph = {name: _imports(name, modules[name]) & server - {name} for name in server}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph[start]:
            if nxt == goal or (nxt not in seen and (seen.add(nxt) or reaches(nxt, goal, seen))):
                return True
        return False

    cycles = sorted(name for name in server if reaches(name, name, set()))
    assert not cycles, {name: sorted(graph[name]) for name in cycles}


def test_the_checks_above_catch_what_they_look_for():
    """The AST checks flag a patched forward, a glassbox_ attribute and an import cycle (so they can fail)."""
    patched = ast.parse("layer.forward = compiled\nsetattr(model, 'glassbox_native', True)\nx = m.glassbox_kv")
    assert [t.attr for t in _attribute_targets(patched)] == ["forward", "glassbox_native"]
    assert _imports("glassbox.server.a", ast.parse("from glassbox.server import b\ndef f():\n    import glassbox.server.c")) >= {
        "glassbox.server.b",
        "glassbox.server.c",
    }
