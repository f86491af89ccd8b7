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
        status = httpx.get(f"{url}/plugins").json()
        if status["version"] >= version or status["error"]:
            return status
        time.sleep(0.05)
    return httpx.get(f"{url}/plugins").json()


def test_plugin_policy_reloads_on_edit_without_reloading_the_model(tmp_path, tiny_model_dir):
    plugin = tmp_path / "my_algo.py"
    plugin.write_text(PLUGIN.replace("SIGN", "1"))
    proc, url = start_server("--model", str(tiny_model_dir("llama")), "--plugin", str(plugin))
    try:
        assert httpx.get(f"{url}/plugins").json()["policies"] == ["length_order"]
        loaded_at = httpx.get(f"{url}/model_info").json()["loaded_at"]
        assert order(url) == [1, 2, 0]  # shortest first

        edited = time.time()
        plugin.write_text(PLUGIN.replace("SIGN", "-1"))
        status = wait_for_version(url, 2)
        assert status["version"] == 2 and status["error"] is None
        assert order(url) == [0, 2, 1]  # longest first, from the edited file
        assert time.time() - edited < 2.0 + 1.0  # reload within 2 s, plus the request itself
        assert httpx.get(f"{url}/model_info").json()["loaded_at"] == loaded_at  # weights not reloaded

        # The serving policy follows the plugin's new versions too.
        assert httpx.post(f"{url}/optimization/scheduling_policy", json={"algorithm": "length_order"}).status_code == 200

        plugin.write_text("this is not python(")
        status = wait_for_version(url, 3)
        assert status["version"] == 2 and "SyntaxError" in status["error"]
        assert order(url) == [0, 2, 1]  # the last good version keeps serving
        assert httpx.post(f"{url}/generate", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
    finally:
        stop_server(proc)
