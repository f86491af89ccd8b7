"""Engine introspection over the real server: /cache/stats, /cache/clear, /debug/memory_usage."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from conftest import start_server, stop_server

from glassbox.engine.optimize import optimize_model
from glassbox.models.loader import load_model
from glassbox.research.memory import weight_bytes

KV_GIB = 0.25
PROMPT = "You are a careful assistant. Answer briefly and precisely. " * 6 + "Question: what is the capital of France?"


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    proc, url = start_server()  # conftest: --kv-cache-memory 0.25
    yield url
    stop_server(proc)


def test_repeated_prompt_hits_the_prefix_cache_and_clear_resets_it(server):
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    first = httpx.post(f"{server}/generate", json=body, timeout=60).json()
    second = httpx.post(f"{server}/generate", json=body, timeout=60).json()
    assert first["cached_tokens"] == 0 and second["cached_tokens"] >= 64
    assert second["text"] == first["text"]
    stats = httpx.get(f"{server}/cache/stats", timeout=60).json()
    assert stats["prefix_cache"]["hit_tokens"] >= 64 and stats["prefix_cache"]["token_hit_rate"] > 0
    assert stats["blocks"]["cached_free"] > 0 and stats["blocks"]["in_use"] == 0

    cleared = httpx.post(f"{server}/cache/clear", timeout=60).json()
    assert cleared["freed_blocks"] == stats["blocks"]["cached_free"]
    assert cleared["cache"]["blocks"]["cached_free"] == 0 and cleared["cache"]["prefix_cache"]["cached_blocks"] == 0
    third = httpx.post(f"{server}/generate", json=body, timeout=60).json()
    assert third["cached_tokens"] == 0 and third["text"] == first["text"]


def test_clear_never_touches_a_running_request(server):
    body = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    alone = httpx.post(f"{server}/generate", json=body, timeout=120).json()
    result = {}
    worker = threading.Thread(target=lambda: result.update(httpx.post(f"{server}/generate", json=body, timeout=120).json()))
    worker.start()
    deadline = time.time() + 30
    while time.time() < deadline and httpx.get(f"{server}/cache/stats", timeout=60).json()["blocks"]["in_use"] == 0:
        time.sleep(0.01)
    in_use = httpx.get(f"{server}/cache/stats", timeout=60).json()["blocks"]["in_use"]
    cleared = httpx.post(f"{server}/cache/clear", timeout=60).json()
    assert in_use > 0 and cleared["cache"]["blocks"]["in_use"] > 0  # the running request kept its blocks
    worker.join()
    assert result["token_ids"] == alone["token_ids"]


def test_memory_usage_matches_weights_and_pool(server):
    memory = httpx.get(f"{server}/debug/memory_usage", timeout=60).json()
    model = load_model(None).model
    float32_weights = weight_bytes(model) / 2**20
    assert float32_weights == pytest.approx(134_515_008 * 4 / 2**20)  # float32, tied head counted once
    optimize_model(model, "auto")  # as the server's engine did: the GGUF's Q4_1 blocks, a Q8_0 head
    assert memory["model_weights_mb"] == pytest.approx(weight_bytes(model) / 2**20)
    assert memory["model_weights_mb"] < 0.45 * float32_weights
    # 30 layers x K and V x 3 heads x 64 dims x 4 bytes x 16 tokens = 737,280 bytes a block
    blocks = int(KV_GIB * 2**30 // 737_280)
    assert memory["kv_cache_mb"]["allocated"] == pytest.approx(blocks * 737_280 / 2**20)
    assert memory["kv_cache_mb"]["in_use"] == 0
    assert memory["process_rss_mb"] > memory["model_weights_mb"] and memory["peak_memory_mb"] >= memory["process_rss_mb"]
    assert memory["how"]


def test_profiling_session_yields_a_chrome_trace_of_our_ops(server):
    assert httpx.post(f"{server}/debug/profiling/stop", timeout=60).status_code == 409  # no session yet
    started = httpx.post(f"{server}/debug/profiling/start", json={"record_shapes": True}, timeout=60)
    assert started.status_code == 200 and started.json()["activities"] == ["cpu"]
    assert httpx.post(f"{server}/debug/profiling/start", json={}, timeout=60).status_code == 409  # one at a time
    httpx.post(f"{server}/generate", json={"prompt": "Hello", "max_tokens": 4, "temperature": 0}, timeout=60)
    stopped = httpx.post(f"{server}/debug/profiling/stop", timeout=60).json()
    assert stopped["steps"] >= 4
    names = [row["name"] for row in stopped["top_ops_by_self_cpu_time"]]
    assert any(name.startswith("aten::") for name in names)
    trace = httpx.get(f"{server}{stopped['trace_url']}", timeout=60).json()  # Chrome trace JSON
    events = {event.get("name") for event in trace["traceEvents"]}
    # The step's forward and its executor by name (the default model runs on the native CPU kernels).
    assert {"glassbox::forward", "glassbox::sample"} <= events
    assert any(str(name).startswith("glassbox::executor[") for name in events)
    assert httpx.get(f"{server}/debug/profiling/traces/..%2F..%2Fetc%2Fpasswd", timeout=60).status_code == 404
    assert httpx.post(f"{server}/debug/profiling/start", json={"activities": ["tpu"]}, timeout=60).status_code == 400


def test_batch_schedule_policies_give_different_orders(server):
    requests = [
        {"prompt": "One two three four five six seven eight nine ten", "priority": 3, "max_tokens": 6},
        {"prompt": "Alpha beta gamma", "priority": 2, "max_tokens": 6},
        {"prompt": "Red", "priority": 1, "max_tokens": 6},
        {"prompt": "The quick brown fox jumps", "priority": 0, "max_tokens": 6},
    ]
    runs = {}
    for algorithm in ("fcfs", "priority", "shortest_first"):
        body = {"algorithm": algorithm, "requests": requests, "max_batch_size": 1}
        response = httpx.post(f"{server}/optimization/batch_schedule", json=body, timeout=120)
        assert response.status_code == 200, response.text
        runs[algorithm] = response.json()
    assert runs["fcfs"]["completion_order"] == [0, 1, 2, 3]
    assert runs["priority"]["completion_order"] == [3, 2, 1, 0]  # lower value first
    assert runs["shortest_first"]["completion_order"] == [2, 1, 3, 0]
    # Greedy outputs do not depend on the order; waiting does.
    texts = {name: [r["text"] for r in run["results"]] for name, run in runs.items()}
    assert texts["fcfs"] == texts["priority"] == texts["shortest_first"]
    fcfs, prio = runs["fcfs"]["results"], runs["priority"]["results"]
    assert fcfs[0]["queue_ms"] < prio[0]["queue_ms"] and prio[3]["queue_ms"] < fcfs[3]["queue_ms"]
    bad = httpx.post(f"{server}/optimization/batch_schedule", json={"algorithm": "random", "requests": requests}, timeout=60)
    assert bad.status_code == 400 and "algorithm" in bad.json()["error"]["message"]


def test_serving_policy_can_be_set_for_all_traffic(server):
    assert httpx.get(f"{server}/optimization/scheduling_policy", timeout=60).json()["algorithm"] == "fcfs"
    assert httpx.post(f"{server}/optimization/scheduling_policy", json={"algorithm": "priority"}, timeout=60).json()["algorithm"] == "priority"
    assert httpx.post(f"{server}/generate", json={"prompt": "Hi", "max_tokens": 2}, timeout=60).status_code == 200
    assert httpx.post(f"{server}/optimization/scheduling_policy", json={"algorithm": "fcfs"}, timeout=60).status_code == 200


def test_latency_stats_add_up_to_the_request_time(server):
    assert httpx.get(f"{server}/debug/latency_stats", timeout=60).json()["enabled"] is False
    assert httpx.post(f"{server}/debug/latency_stats/enable", timeout=60).json()["enabled"] is True
    httpx.post(f"{server}/debug/latency_stats/reset", timeout=60)
    out = httpx.post(
        f"{server}/generate",
        json={"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "ignore_eos": True},
        timeout=60,  # the timers slow every step down; httpx's default 5 s is too tight on a loaded machine
    ).json()
    stats = httpx.get(f"{server}/debug/latency_stats", timeout=60).json()
    stages = stats["stages"]
    for stage in ("tokenize", "queue", "embed", "attention", "mlp", "lm_head", "sample", "detokenize"):
        assert stages[stage]["count"] > 0, stage
    assert stages["attention"]["count"] == stages["mlp"]["count"] == 30 * 8  # 30 layers x 8 steps
    assert stages["sample"]["count"] == 8 and stages["queue"]["count"] == 1
    # Every step's time is split into stages, so the stages (without tokenize, timed before arrival, and
    # queue) cover the request from its first step to its end: within 10% (the gaps between steps).
    timed = stats["total_ms"] - stages["tokenize"]["total_ms"]
    measured = out["timings"]["total_ms"] - out["timings"]["queue_ms"]
    assert abs(timed - measured) <= 0.10 * measured, (timed, measured)
    assert stats["attention_ms"] == stages["attention"]["total_ms"] and "perf_counter" in stats["timed_with"]
    assert httpx.post(f"{server}/debug/latency_stats/disable", timeout=60).json()["enabled"] is False
    httpx.post(f"{server}/debug/latency_stats/reset", timeout=60)
    httpx.post(f"{server}/generate", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert httpx.get(f"{server}/debug/latency_stats", timeout=60).json()["stages"]["attention"]["count"] == 0  # timers gone


def test_latency_stats_and_profiler_name_each_steps_executor(server):
    """Every step is planned (engine/step_plan.py): the latency report counts the executor its timed steps
    ran (the eager one: module hooks fire only there) and shows the last plan; a profiling session counts
    the executors of the steps it saw, and its trace names each one inside glassbox::forward."""
    httpx.post(f"{server}/debug/latency_stats/enable", timeout=60)
    httpx.post(f"{server}/debug/latency_stats/reset", timeout=60)
    body = {"prompt": "The capital of France is", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    httpx.post(f"{server}/generate", json=body, timeout=60)
    stats = httpx.get(f"{server}/debug/latency_stats", timeout=60).json()
    httpx.post(f"{server}/debug/latency_stats/disable", timeout=60)
    assert stats["steps_by_executor"] == {"eager": 5}  # one prefill and four decodes, all timed
    assert stats["last_plan"].startswith("step eager (latency timers on): decode, 1 seqs")

    httpx.post(f"{server}/debug/profiling/start", json={}, timeout=60)
    httpx.post(f"{server}/generate", json=body, timeout=60)
    stopped = httpx.post(f"{server}/debug/profiling/stop", timeout=60).json()
    executors = stopped["steps_by_executor"]
    assert sum(executors.values()) == stopped["steps"] >= 5
    trace = httpx.get(f"{server}{stopped['trace_url']}", timeout=60).json()
    events = {event.get("name") for event in trace["traceEvents"]}
    assert {f"glassbox::executor[{name}]" for name in executors} <= events


@pytest.mark.parametrize("split_dim, gather", [(0, "concat"), (1, "sum")])
def test_sharded_matmul_equals_unsplit(server, split_dim, gather):
    body = {"weight": "model.layers.0.mlp.down_proj.weight", "split_dim": split_dim, "num_splits": 4}
    split = httpx.post(f"{server}/parallel/tensor_split", json=body, timeout=60).json()
    assert split["shape"] == [576, 1536] and len(split["shards"]) == 4
    assert sum(s["shape"][split_dim] for s in split["shards"]) == split["shape"][split_dim]
    result = httpx.post(f"{server}/parallel/execute", json={"splits": split["split_id"], "other_columns": 32}, timeout=60).json()
    assert result["gather"] == gather and result["output_shape"] == [576, 32]
    assert result["max_abs_error"] <= 1e-5 and len(result["shard_ms"]) == 4
    random_split = httpx.post(f"{server}/parallel/tensor_split", json={"tensor_shape": [64, 48], "num_splits": 3}, timeout=60).json()
    assert [s["shape"] for s in random_split["shards"]] == [[22, 48], [21, 48], [21, 48]]


def test_tensor_split_bad_input(server):
    assert httpx.post(f"{server}/parallel/tensor_split", json={"weight": "nope", "num_splits": 2}, timeout=60).status_code == 400
    assert httpx.post(f"{server}/parallel/tensor_split", json={"tensor_shape": [4, 4], "split_dim": 5}, timeout=60).status_code == 400
    assert httpx.post(f"{server}/parallel/execute", json={"splits": "0123456789abcdef"}, timeout=60).status_code == 404


def test_attention_scores_equal_transformers(server):
    import torch
    from transformers import AutoModelForCausalLM

    from glassbox.models.loader import default_model_path

    text = "The history of the Roman Empire is long and complicated."
    one = httpx.post(f"{server}/debug/attention_scores", json={"prompt": text, "layer_idx": 3, "head_idx": 5}, timeout=60).json()
    layer = httpx.post(f"{server}/debug/attention_scores", json={"prompt": text, "layer_idx": 3}, timeout=60).json()
    path = default_model_path()
    reference = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    )
    with torch.no_grad():
        attentions = reference(torch.tensor([one["token_ids"]]), output_attentions=True).attentions
    expected = attentions[3][0]  # [heads, n, n]
    # (2e-3: the server's default int12 activations — 2^-11 of each block's max — against float32's; 4e-4 seen,
    # 7.5e-5 with int16's 2^-15)
    assert (torch.tensor(one["attention_matrix"]) - expected[5]).abs().max() < 2e-3
    assert len(layer["heads"]) == 9
    assert (torch.tensor([h["attention_matrix"] for h in layer["heads"]]) - expected).abs().max() < 2e-3
    n = len(one["tokens"])
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    assert one["sparsity_ratio"] == pytest.approx(((expected[5] < 0.01) & causal).sum().item() / causal.sum().item())
    assert 0 < one["entropy"] < float(torch.log(torch.tensor(float(n)))) and 1 <= one["k_for_90pct_mass"] <= n
    assert one["tokens"][0] == "The" and one["threshold"] == 0.01
    summary = httpx.post(f"{server}/debug/attention_scores", json={"prompt": text}, timeout=60).json()
    assert len(summary["layers"]) == 30 and "attention_matrix" not in summary["layers"][0]["heads"][0]
    bad = httpx.post(f"{server}/debug/attention_scores", json={"prompt": text, "layer_idx": 30}, timeout=60)
    assert bad.status_code == 400 and "[0, 29]" in bad.json()["error"]["message"]
    bad = httpx.post(f"{server}/debug/attention_scores", json={"prompt": text, "layer_idx": 0, "head_idx": 9}, timeout=60)
    assert bad.status_code == 400 and "[0, 8]" in bad.json()["error"]["message"]


def test_attention_heatmap_png(server):
    body = {"prompt": "The Roman Empire began", "layer_idx": 2, "head_idx": 0, "format": "png"}
    response = httpx.post(f"{server}/debug/attention_scores", json=body, timeout=60)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.content.startswith(b"\x89PNG\r\n\x1a\n") and len(response.content) > 5000
    no_head = httpx.post(f"{server}/debug/attention_scores", json={"prompt": "x", "layer_idx": 2, "format": "png"}, timeout=60)
    assert no_head.status_code == 400 and "head_idx" in no_head.json()["error"]["message"]


def test_pipeline_chain_reproduces_the_full_forward(server):
    import torch

    from glassbox.layers.attention import AttentionMetadata

    text = "The history of the Roman Empire"
    first = httpx.post(f"{server}/pipeline/step_execute", json={"step": "embed", "prompt": text}, timeout=60).json()
    assert first["shape"] == [len(first["token_ids"]), 576] and first["dtype"] == "float32"
    handle = first["handle"]
    for layer in range(30):
        if layer % 2:  # whole layers and attention+mlp halves chain alike
            handle = httpx.post(f"{server}/pipeline/step_execute", json={"step": "layer", "layer_idx": layer, "input": handle}, timeout=60).json()["handle"]
        else:
            for step in ("attention", "mlp"):
                handle = httpx.post(f"{server}/pipeline/step_execute", json={"step": step, "layer_idx": layer, "input": handle}, timeout=60).json()["handle"]
    normed = httpx.post(f"{server}/pipeline/step_execute", json={"step": "final_norm", "input": handle}, timeout=60).json()
    body = {"step": "lm_head", "input": normed["handle"], "return_intermediate": True}
    too_big = httpx.post(f"{server}/pipeline/step_execute", json=body, timeout=60)
    assert too_big.status_code == 400 and "cap" in too_big.json()["error"]["message"]  # 6 x 49152 values
    logits_stats = httpx.post(f"{server}/pipeline/step_execute", json={**body, "return_intermediate": False}, timeout=60).json()

    loaded = load_model(None)
    ids = torch.tensor(first["token_ids"])
    with torch.no_grad():
        expected = loaded.model.compute_logits(loaded.model(ids, torch.arange(len(ids)), AttentionMetadata.for_prompts([len(ids)])))
    assert logits_stats["shape"] == list(expected.shape)
    # (the server's int12 activations against the float32 model: 9e-4 of the max seen)
    assert logits_stats["stats"]["max"] == pytest.approx(expected.max().item(), rel=3e-3)
    assert logits_stats["stats"]["mean"] == pytest.approx(expected.mean().item(), abs=2e-2)
    # The values themselves, on a short chain: the first layer's output matches the model's own hooks.
    one = httpx.post(f"{server}/pipeline/schedule", json={"input_ids": [1, 2, 3], "return_intermediate": True,
                     "steps": [{"step": "embed"}, {"step": "layer", "layer_idx": 0}]}, timeout=60).json()
    assert [s["step"] for s in one["steps"]] == ["embed", "layer"] and one["total_ms"] > 0
    captured = {}
    hook = loaded.model.model.layers[0].register_forward_hook(lambda m, a, out: captured.setdefault("out", out))
    with torch.no_grad():
        loaded.model(torch.tensor([1, 2, 3]), torch.arange(3), AttentionMetadata.for_prompts([3]))
    hook.remove()
    # (the server's int12 activations: each block rounded to 2^-11 of its max; 3.5e-5 of the largest value seen
    # with int16's 2^-15)
    assert (torch.tensor(one["steps"][1]["values"]) - captured["out"]).abs().max() < 1e-3 * captured["out"].abs().max()
    bad = httpx.post(f"{server}/pipeline/step_execute", json={"step": "layer", "layer_idx": 30, "prompt": "x"}, timeout=60)
    assert bad.status_code == 400 and "[0, 29]" in bad.json()["error"]["message"]
