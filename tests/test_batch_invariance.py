"""Batch invariance of the CPU default (Q4_1/Q8_0 weights, float32 activations) through the server: a
request's tokens and logprobs are the same bits alone and inside 32 concurrent streams.

Why it holds: every linear computes each row of its input in the same operations and order whatever the
number of rows (kernels/cpu/qlinear.c: ftile, ftile_row and ftile_pair give the same bits, tested in
test_quantized_linear.py), attention runs per sequence over its cached keys in block order, and RMSNorm,
the sampler and the logprobs are per row. The concurrent run also splits long prompts into chunks (32
prompts of ~70-110 tokens are over the 2,048-token step budget) and mixes prefills with decodes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from conftest import start_server, stop_server

TOPICS = ["rivers", "the moon", "bread", "old maps", "glass", "bees", "trains", "salt"]
PROBES = [0, 5, 17, 31]


def prompt(i: int) -> str:
    body = f"Write a careful, detailed account of {TOPICS[i % len(TOPICS)]} for reader number {i}. "
    return body * (3 + i % 3) + "Begin:"


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    proc, url = start_server()
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
