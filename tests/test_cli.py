"""`glassbox generate`: prints the continuation only; --json prints the generated ids."""

from __future__ import annotations

import json
import subprocess
import sys

from glassbox.generate import greedy_generate
from glassbox.models.loader import load_model

PROMPT = "The capital of France is"


def glassbox(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "glassbox.cli", *args], capture_output=True, text=True, timeout=300, check=True
    )
    return result.stdout


def test_generate_json_and_text(tiny_model_dir):
    folder = tiny_model_dir("llama")
    loaded = load_model(folder)
    expected_ids = greedy_generate(loaded, loaded.tokenizer.encode(PROMPT), 8)

    out = json.loads(glassbox("generate", PROMPT, "--max-tokens", "8", "--model", str(folder), "--json"))
    assert out["token_ids"] == expected_ids
    assert out["text"] == loaded.tokenizer.decode(expected_ids)

    text = glassbox("generate", PROMPT, "--max-tokens", "8", "--model", str(folder))
    assert text == loaded.tokenizer.decode(expected_ids) + "\n"


def test_generate_default_model_chat():
    out = json.loads(glassbox("generate", "What is the capital of France?", "--chat", "--max-tokens", "12", "--json"))
    assert "Paris" in out["text"]
    assert 1 <= len(out["token_ids"]) <= 12
