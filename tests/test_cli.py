"""`glassbox generate`: prints the continuation only; --json prints the generated ids. `glassbox serve` and
`glassbox algorithms` name policies and sparsity methods from the one registry."""

from __future__ import annotations

import json
import subprocess
import sys

from glassbox import LLM, SamplingParams
from glassbox.models.loader import load_model

PROMPT = "The capital of France is"

PLUGIN = """
from glassbox.engine.policies import SchedulingPolicy


class LongestFirst(SchedulingPolicy):
    name = "longest_first"
    description = "longest prompt first"

    def key(self, seq):
        return (-seq.num_prompt_tokens, seq.arrival_time)


def register(registry):
    registry.scheduling_policy(LongestFirst)
"""


def glassbox(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "glassbox.cli", *args], capture_output=True, text=True, timeout=300, check=True
    )
    return result.stdout


def test_generate_json_and_text(tiny_model_dir):
    folder = tiny_model_dir("llama")
    loaded = load_model(folder)
    # The engine alone, greedy: the stop token, if one comes, is the last id (and not in the text).
    expected_ids = LLM(str(folder), kv_cache_memory=1 << 20).generate(PROMPT, SamplingParams(temperature=0, max_tokens=8))[0].token_ids

    out = json.loads(glassbox("generate", PROMPT, "--max-tokens", "8", "--model", str(folder), "--json"))
    assert out["token_ids"] == expected_ids
    assert out["text"] == loaded.tokenizer.decode(expected_ids)

    text = glassbox("generate", PROMPT, "--max-tokens", "8", "--model", str(folder))
    assert text == loaded.tokenizer.decode(expected_ids) + "\n"


def test_generate_default_model_chat():
    out = json.loads(glassbox("generate", "What is the capital of France?", "--chat", "--max-tokens", "12", "--json"))
    assert "Paris" in out["text"]
    assert 1 <= len(out["token_ids"]) <= 12


def test_algorithms_lists_builtins_aliases_and_the_plugins(tmp_path):
    plugin = tmp_path / "my_policy.py"
    plugin.write_text(PLUGIN)
    out = glassbox("algorithms", "--plugin", str(plugin))
    assert "shortest_prompt_first (shortest_first, sjf):" in out
    assert "longest_first: longest prompt first [plugin]" in out
    assert "h2o:" in out and "top_k:" in out


def test_serve_rejects_an_unknown_policy_before_loading_the_model(tmp_path):
    plugin = tmp_path / "my_policy.py"
    plugin.write_text(PLUGIN)
    args = ["serve", "--plugin", str(plugin), "--scheduling-policy", "longest"]
    result = subprocess.run([sys.executable, "-m", "glassbox.cli", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--scheduling-policy: unknown scheduling policy 'longest'" in result.stderr
    assert "fcfs, priority, shortest_prompt_first, shortest_first, sjf, longest_first" in result.stderr
