"""Batch invariance of the CPU default (Q4_1/Q8_0 weights, int12 block activations) through the server, served
with --batch-invariant (which /model_info reports): a request's tokens and logprobs are the same bits alone
and inside 32 concurrent streams; and through the engine, a prompt chunked by a 64-token step budget gives
the same prompt logprobs, tokens and logprobs as the whole prompt in one step.

Why it holds: every linear computes each row of its input in the same operations and order whatever the
number of rows (kernels/cpu/qlinear.c: ftile, ftile_row and ftile_pair give the same bits, tested in
test_quantized_linear.py), attention runs per sequence over its cached keys in block order, and RMSNorm,
the sampler and the logprobs are per row. The concurrent run also splits long prompts into chunks (32
prompts of ~70-110 tokens are over the 2,048-token step budget) and mixes prefills with decodes. On the CPU
the mode changes no kernel (engine/batch_invariant.py): it refuses what would not hold (float32 weights on
MKL) and says which mode produced the numbers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from conftest import run_all, start_server, stop_server

from glassbox import SamplingParams
from glassbox.config import EngineConfig

TOPICS = ["rivers", "the moon", "bread", "old maps", "glass", "bees", "trains", "salt"]
PROBES = [0, 5, 17, 31]


def prompt(i: int) -> str:
    body = f"Write a careful, detailed account of {TOPICS[i % len(TOPICS)]} for reader number {i}. "
    return body * (3 + i % 3) + "Begin:"


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    proc, url = start_server("--batch-invariant")
    yield url
    stop_server(proc)


def body(i: int, seeded: bool) -> dict:
    sampling = {"temperature": 0.8, "top_p": 0.95, "seed": 1000 + i} if seeded else {"temperature": 0}
    return {"prompt": prompt(i), "max_tokens": 24, "ignore_eos": True, "logprobs": 2, **sampling}


def result(response: httpx.Response) -> tuple[list[int], list]:
    assert response.status_code == 200, response.text
    data = response.json()
    return data["token_ids"], data["logprobs"]


@pytest.mark.parametrize("seeded", [False, True], ids=["greedy", "seeded"])
def test_alone_equals_inside_32_concurrent_streams(url, seeded):
    alone = {i: result(httpx.post(f"{url}/generate", json=body(i, seeded), timeout=120)) for i in PROBES}

    async def together() -> list[tuple[list[int], list]]:
        async with httpx.AsyncClient(base_url=url, timeout=300) as http:
            responses = await asyncio.gather(*(http.post("/generate", json=body(i, seeded)) for i in range(32)))
        return [result(r) for r in responses]

    batched = asyncio.run(together())
    for i in PROBES:
        tokens, logprobs = batched[i]
        assert tokens == alone[i][0], f"prompt {i}: tokens differ"
        assert logprobs == alone[i][1], f"prompt {i}: logprobs differ"  # the same floats, not within a tolerance
    assert httpx.get(f"{url}/health", timeout=60).status_code == 200


def test_model_info_says_batch_invariant(url):
    assert httpx.get(f"{url}/model_info", timeout=60).json()["batch_invariant"] is True
    # and every response, a research endpoint's figures included
    assert httpx.get(f"{url}/debug/memory_usage", timeout=60).headers["x-glassbox-batch-invariant"] == "true"


def test_chunked_prefill_of_64_equals_the_whole_prompt():
    """The default model on the native kernels: prompts of 100-200 tokens in one step each, or in chunks of a
    64-token step budget shared with the other prompts' chunks and decodes; prompt logprobs (every prompt
    position), sampled tokens and their logprobs, greedy and seeded: the same floats."""
    from glassbox.engine.llm_engine import LLMEngine
    from glassbox.models.loader import load_model

    loaded = load_model(None, progress=False)
    prompts = [loaded.tokenizer.encode(prompt(i) + " " + prompt(i + 3)) for i in range(6)]
    assert all(len(p) > 64 for p in prompts)
    params = [
        SamplingParams(max_tokens=12, ignore_eos=True, logprobs=2, prompt_logprobs=1,
                       **({"temperature": 0.8, "top_p": 0.95, "seed": 7 + i} if i % 2 else {"temperature": 0}))
        for i in range(len(prompts))
    ]  # fmt: skip

    def run(budget: int, batch: list[int]) -> list[tuple]:
        engine = LLMEngine(loaded, EngineConfig(batch_invariant=True, max_num_batched_tokens=budget,
                                                kv_cache_memory=1 << 28, enable_prefix_caching=False))
        outputs = run_all(engine, [prompts[i] for i in batch], [params[i] for i in batch])
        return [(o.token_ids, o.logprobs, o.prompt_logprobs) for o in outputs]

    whole = [run(2048, [i])[0] for i in range(len(prompts))]
    chunked = run(64, list(range(len(prompts))))
    assert chunked == whole
    assert all(len(prompt_logprobs) == len(p) for (_, _, prompt_logprobs), p in zip(whole, prompts))


def test_float32_weights_on_the_cpu_are_refused(tiny_model_dir):
    """quantization="none" multiplies with MKL, whose one-row products differ from batched rows: the mode
    says so instead of promising what it cannot hold."""
    from glassbox.engine.batch_invariant import BatchInvariantUnsupported, apply_batch_invariant
    from glassbox.engine.optimize import optimize_model
    from glassbox.models.loader import load_model

    loaded = load_model(tiny_model_dir("llama"))
    optimize_model(loaded.model, "none")
    with pytest.raises(BatchInvariantUnsupported, match="native block-quantized kernels"):
        apply_batch_invariant(loaded.model, loaded.device)
