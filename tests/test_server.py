"""The real server (uvicorn in a subprocess on a free port), called over HTTP."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import pytest
from conftest import start_server, stop_server

from glassbox.client import Client, ClientError

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    proc, url = start_server()
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server) -> Iterator[Client]:
    with Client(server) as c:
        yield c


def kv_usage(url: str) -> tuple[float, float]:
    text = httpx.get(f"{url}/metrics", timeout=60).text
    values = {}
    for line in text.splitlines():
        if line.startswith(("glassbox:kv_cache_usage_perc ", "glassbox:num_requests_running ")):
            name, value = line.split()
            values[name] = float(value)
    return values["glassbox:kv_cache_usage_perc"], values["glassbox:num_requests_running"]


def test_health_model_info_and_version(client, server):
    assert client.health()
    info = client.model_info()
    assert info["architecture"] == "llama" and info["num_layers"] == 30 and info["num_kv_heads"] == 3
    assert info["vocab_size"] == 49152 and info["context_length"] == 8192 and info["kv_block_size"] == 16
    assert info["num_parameters"] == 134_515_008 and info["dtype"] == "float32"
    from glassbox.kernels import cpu_native

    # The CPU default as it runs: the GGUF's blocks times int12 block activations where the C kernels do
    expected = ("q4_1+q8_0", "int12") if cpu_native.available() else ("column_major", "float32")
    assert (info["weight_format"], info["activations"]) == expected
    version = httpx.get(f"{server}/version", timeout=60)
    assert version.json()["version"]
    assert info["batch_invariant"] is False and version.headers["x-glassbox-batch-invariant"] == "false"


def test_generate_matches_the_engine_alone(client):
    from glassbox import LLM, SamplingParams

    llm = LLM(kv_cache_memory=64 << 20)  # the offline API in this process: the same engine, no server
    loaded = llm.engine.loaded
    prompt = "The capital of France is"
    expected = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].token_ids
    out = client.generate(prompt, max_tokens=12, temperature=0, ignore_eos=True)
    assert out["token_ids"] == expected and out["text"] == loaded.tokenizer.decode(expected)
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17}
    assert out["finish_reason"] == "length"
    assert out["timings"]["ttft_ms"] > 0 and out["timings"]["decode_ms_per_token"] > 0


def test_curl_style_bodies_without_json_content_type(server):
    body = json.dumps({"prompt": "Hello", "max_tokens": 3, "temperature": 0})
    form = httpx.post(f"{server}/generate", content=body, headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=60)
    bare = httpx.post(f"{server}/generate", content=body, headers={}, timeout=60)
    assert form.status_code == bare.status_code == 200
    assert form.json()["text"] == bare.json()["text"]


def test_stream_equals_non_stream(client):
    params = dict(max_tokens=16, temperature=0, ignore_eos=True)
    whole = client.generate("Once upon a time", **params)
    events = list(client.stream("Once upon a time", **params))
    assert "".join(e["text"] for e in events) == whole["text"]
    assert [t for e in events for t in e["token_ids"]] == whole["token_ids"]
    assert events[-1]["finished"] and events[-1]["result"]["usage"]["completion_tokens"] == 16


def test_batch_generate_in_order(client):
    prompts = ["One, two,", "The sky is", "def add(a, b):"]
    batch = client.batch_generate(prompts, max_tokens=8, temperature=0)
    single = [client.generate(p, max_tokens=8, temperature=0) for p in prompts]
    assert [b["text"] for b in batch] == [s["text"] for s in single]


def test_tokenize_and_detokenize(client):
    out = client.tokenize("Hello world", with_pieces=True)
    assert out["tokens"] == [19556, 905] and out["pieces"] == ["Hello", "Ġworld"] and out["count"] == 2
    assert client.detokenize(out["tokens"]) == "Hello world"


@pytest.mark.parametrize(
    "path, body, status, field",
    [
        ("/generate", {"max_tokens": 5}, 400, "prompt"),
        ("/generate", {"prompt": 5}, 400, "prompt"),
        ("/generate", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ("/generate", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
        ("/generate", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
        ("/generate", {"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
        ("/generate", {"prompt": "hi", "max_tokens": 9000}, 400, "context length"),
        ("/generate", {"prompt": "hi", "bogus": 1}, 400, "bogus"),
        ("/generate", {"prompt": ""}, 400, "prompt"),
        ("/generate", {"prompt": [1, 99999999]}, 400, "token ids"),
        ("/generate", {"prompt": "hi", "stream": True, "max_tokens": 9000}, 400, "context length"),
        ("/tokenize", {}, 400, "text"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
        ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ],
)
def test_bad_input_is_a_clear_4xx(server, path, body, status, field):
    response = httpx.post(f"{server}{path}", json=body, timeout=60)
    assert response.status_code == status
    assert field in response.json()["error"]["message"]


def test_bad_json_and_oversized_body(server):
    assert httpx.post(f"{server}/generate", content=b"{not json", timeout=60).status_code == 400
    huge = b'{"prompt": "' + b"a" * (5 << 20) + b'"}'
    assert httpx.post(f"{server}/generate", content=huge, timeout=60).status_code == 413
    assert httpx.get(f"{server}/health", timeout=60).status_code == 200  # and the engine is still alive


def test_openai_client(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == [MODEL]
    completion = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0)
    assert completion.choices[0].text.startswith(" Paris") and completion.usage.completion_tokens == 6
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=16, temperature=0
    )
    assert "Paris" in chat.choices[0].message.content and chat.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    streamed = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text
    two = client.completions.create(model=MODEL, prompt="Once", max_tokens=8, temperature=1.0, seed=5, n=2, logprobs=2)
    again = client.completions.create(model=MODEL, prompt="Once", max_tokens=8, temperature=1.0, seed=5, n=2, logprobs=2)
    assert [c.text for c in two.choices] == [c.text for c in again.choices]
    assert len(two.choices[0].logprobs.token_logprobs) == len(two.choices[0].logprobs.tokens) > 0


def test_disconnect_mid_stream_frees_the_kv_cache(server):
    with httpx.Client(base_url=server, timeout=60) as http:
        with http.stream("POST", "/generate", json={"prompt": "Tell me a long story", "max_tokens": 2000, "ignore_eos": True, "stream": True}) as response:
            received = 0
            for line in response.iter_lines():
                if line.startswith("data: "):
                    received += 1
                if received == 3:
                    # (checked inside the loop: leaving iter_lines closes the response)
                    usage, running = kv_usage(server)
                    assert usage > 0 and running == 1
                    break
    deadline = time.time() + 30
    while time.time() < deadline and kv_usage(server) != (0.0, 0.0):
        time.sleep(0.1)
    assert kv_usage(server) == (0.0, 0.0)


def test_64_concurrent_streams_equal_alone(server, client):
    prompts = [f"Item {i}: the best thing about the number {i} is" for i in range(64)]

    async def stream_one(http: httpx.AsyncClient, prompt: str) -> str:
        text = ""
        body = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "stream": True}
        async with http.stream("POST", "/generate", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text += json.loads(line[6:])["text"]
        return text

    async def all_at_once() -> list[str]:
        async with httpx.AsyncClient(base_url=server, timeout=300) as http:
            return await asyncio.gather(*(stream_one(http, p) for p in prompts))

    concurrent = asyncio.run(all_at_once())
    alone = [client.generate(p, max_tokens=6, temperature=0)["text"] for p in prompts]
    assert concurrent == alone
    assert kv_usage(server) == (0.0, 0.0)


def test_metrics_names(server):
    text = httpx.get(f"{server}/metrics", timeout=60).text
    for name in (
        "glassbox:num_requests_running",
        "glassbox:num_requests_waiting",
        "glassbox:kv_cache_usage_perc",
        "glassbox:prefix_cache_queries_total",
        "glassbox:prefix_cache_hits_total",
        "glassbox:prompt_tokens_total",
        "glassbox:generation_tokens_total",
        "glassbox:time_to_first_token_seconds_bucket",
        "glassbox:inter_token_latency_seconds_bucket",
        "glassbox:e2e_request_latency_seconds_bucket",
    ):
        assert name in text


def test_api_key(tiny_model_dir):
    proc, url = start_server("--model", str(tiny_model_dir("llama")), "--api-key", "s3cret")
    try:
        assert httpx.get(f"{url}/health", timeout=60).status_code == 200  # open: load balancers probe it
        assert httpx.post(f"{url}/generate", json={"prompt": "hi", "max_tokens": 2}, timeout=60).status_code == 401
        assert httpx.get(f"{url}/model_info", headers={"Authorization": "Bearer wrong"}, timeout=60).status_code == 401
        with Client(url, api_key="s3cret") as c:
            assert len(c.generate("hi", max_tokens=2, temperature=0, ignore_eos=True)["token_ids"]) == 2
        with pytest.raises(ClientError) as error, Client(url) as c:
            c.model_info()
        assert error.value.status == 401
    finally:
        stop_server(proc)
