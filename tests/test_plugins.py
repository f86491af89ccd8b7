"""Algorithm plugins over the real server: a scheduling policy from a file, edited while serving."""

from __future__ import annotations

import time

import httpx
from conftest import start_server, stop_server

PLUGIN = '''
from glassbox.engine.policies import SchedulingPolicy


class LengthOrder(SchedulingPolicy):
    name = "length_order"
    description = "by prompt length, SIGN 1: shortest first, -1: longest first"

    def key(self, seq):
        return (SIGN * seq.num_prompt_tokens, seq.arrival_time)


def register(registry):
    registry.scheduling_policy(LengthOrder)
'''

REQUESTS = [
    {"prompt": "one two three four five six", "max_tokens": 2},
    {"prompt": "one", "max_tokens": 2},
    {"prompt": "one two three", "max_tokens": 2},
]


def order(url: str) -> list[int]:
    body = {"algorithm": "length_order", "requests": REQUESTS, "max_batch_size": 1}
    response = httpx.post(f"{url}/optimization/batch_schedule", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["completion_order"]


def wait_for_version(url: str, version: int) -> dict:
    deadline = time.time() + 2.0  # the bound: behaviour changes within 2 s of the edit
    while time.time() < deadline:
        status = httpx.get(f"{url}/plugins", timeout=60).json()
        if status["version"] >= version or status["error"]:
            return status
        time.sleep(0.05)
    return httpx.get(f"{url}/plugins", timeout=60).json()


def test_plugin_policy_reloads_on_edit_without_reloading_the_model(tmp_path, tiny_model_dir):
    plugin = tmp_path / "my_algo.py"
    plugin.write_text(PLUGIN.replace("SIGN", "1"))
    # The file loads before the engine is built, so the serving policy may be the plugin's from the start.
    proc, url = start_server("--model", str(tiny_model_dir("llama")), "--plugin", str(plugin), "--scheduling-policy", "length_order")
    try:
        assert httpx.get(f"{url}/plugins", timeout=60).json()["policies"] == ["length_order"]
        assert httpx.get(f"{url}/optimization/scheduling_policy", timeout=60).json()["algorithm"] == "length_order"
        loaded_at = httpx.get(f"{url}/model_info", timeout=60).json()["loaded_at"]
        assert order(url) == [1, 2, 0]  # shortest first

        edited = time.time()
        plugin.write_text(PLUGIN.replace("SIGN", "-1"))
        status = wait_for_version(url, 2)
        assert status["version"] == 2 and status["error"] is None
        assert order(url) == [0, 2, 1]  # longest first, from the edited file
        assert time.time() - edited < 2.0 + 1.0  # reload within 2 s, plus the request itself
        assert httpx.get(f"{url}/model_info", timeout=60).json()["loaded_at"] == loaded_at  # weights not reloaded

        # The serving policy follows the plugin's new versions too.
        assert httpx.post(f"{url}/optimization/scheduling_policy", json={"algorithm": "length_order"}, timeout=60).status_code == 200

        plugin.write_text("this is not python(")
        status = wait_for_version(url, 3)
        assert status["version"] == 2 and "SyntaxError" in status["error"]
        assert order(url) == [0, 2, 1]  # the last good version keeps serving
        assert httpx.post(f"{url}/generate", json={"prompt": "hi", "max_tokens": 2}, timeout=60).status_code == 200
    finally:
        stop_server(proc)


SPARSITY_PLUGIN = '''
from glassbox.layers.sparsity import SparsityMethod


class LastN(SparsityMethod):
    name = "last_n"
    description = "each query keeps its last few keys"
    selects_from = "positions"

    def __init__(self, n):
        self.n = n

    @classmethod
    def parse(cls, params):
        return cls(params.number("n", integer=True, minimum=1))

    def keep(self, x):
        return x.k_positions > x.q_positions - self.n * SCALE


def register(registry):
    registry.sparsity_method(LastN, example={"n": 2})
'''


def kept_per_row(url: str) -> int:
    body = {"token_ids": list(range(1, 21)), "layer_idx": 0, "head_idx": 0, "sparsity": {"method": "last_n", "n": 2}}
    response = httpx.post(f"{url}/debug/attention_scores", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return max(sum(p > 0 for p in row) for row in response.json()["attention_matrix"])


def test_plugin_sparsity_method_reloads_on_edit(tmp_path, tiny_model_dir):
    plugin = tmp_path / "my_mask.py"
    plugin.write_text(SPARSITY_PLUGIN.replace("SCALE", "1"))
    proc, url = start_server("--model", str(tiny_model_dir("llama")), "--plugin", str(plugin))
    try:
        assert httpx.get(f"{url}/plugins", timeout=60).json()["sparsity_methods"] == ["last_n"]
        assert kept_per_row(url) == 2
        methods = httpx.get(f"{url}/optimization/sparsity_mask", timeout=60).json()["methods"]
        (last_n,) = [m for m in methods if m["method"] == "last_n"]
        assert last_n["description"] == "each query keeps its last few keys" and last_n["selects_from"] == "positions"
        assert last_n["evicts"] is False  # a plugin's mask saves nothing it does not declare
        body = {"prompt": [1, 2, 3, 4, 5, 6, 7, 8], "max_tokens": 4, "temperature": 0, "sparsity": {"method": "last_n", "n": 2}}
        assert httpx.post(f"{url}/generate", json=body, timeout=60).json()["sparsity"]["density"] < 1
        assert httpx.post(f"{url}/optimization/sparsity_mask", json={"method": "last_n", "n": 1}, timeout=60).status_code == 200

        plugin.write_text(SPARSITY_PLUGIN.replace("SCALE", "2"))
        assert wait_for_version(url, 2)["version"] == 2
        assert kept_per_row(url) == 4  # the edited method, weights untouched
        assert httpx.get(f"{url}/optimization/sparsity_mask", timeout=60).json()["active"] == {"method": "last_n", "n": 1}

        plugin.write_text(SPARSITY_PLUGIN.replace("SCALE", "undefined_name"))  # raises on the test input
        status = wait_for_version(url, 3)
        assert status["version"] == 2 and "NameError" in status["error"]
        assert kept_per_row(url) == 4  # the last good version keeps serving
        assert httpx.post(f"{url}/generate", json={"prompt": "hi", "max_tokens": 2}, timeout=60).status_code == 200
    finally:
        stop_server(proc)
