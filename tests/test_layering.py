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
