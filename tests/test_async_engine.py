"""The async front: streams, concurrency, abort frees blocks, a dead engine is reported."""

from __future__ import annotations

import asyncio

import pytest
from conftest import run_all

from glassbox import SamplingParams
from glassbox.config import EngineConfig
from glassbox.engine.async_engine import AsyncLLMEngine, EngineDeadError
from glassbox.engine.llm_engine import LLMEngine
from glassbox.models.loader import load_model


@pytest.fixture()
def engine(tiny_model_dir):
    loaded = load_model(tiny_model_dir("llama"))
    async_engine = AsyncLLMEngine(LLMEngine(loaded, EngineConfig(num_kv_blocks=200, block_size=4)), idle_wait_s=0.05)
    yield async_engine.start()
    async_engine.shutdown()


async def collect(engine: AsyncLLMEngine, prompt, params):
    outputs = [out async for out in engine.generate(prompt, params)]
    return outputs


def greedy_alone(folder, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """Each prompt's greedy continuation from an engine over its own copy of the model, one request at a time."""
    alone = LLMEngine(load_model(folder), EngineConfig(num_kv_blocks=200, block_size=4))
    return [run_all(alone, [prompt], params)[0].token_ids for prompt in prompts]


def test_concurrent_streams_match_greedy_alone(engine, tiny_model_dir):
    prompts = [[5, 6, 7], [9] * 20, list(range(40, 70)), [1]]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    alone = greedy_alone(tiny_model_dir("llama"), prompts, params)

    async def main():
        return await asyncio.gather(*(collect(engine, p, params) for p in prompts))

    results = asyncio.run(main())
    for expected, outputs in zip(alone, results):
        assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
        streamed = [t for o in outputs for t in o.new_token_ids]
        assert streamed == outputs[-1].token_ids == expected
        assert "".join(o.new_text for o in outputs) == outputs[-1].text
    assert engine.engine.block_manager.num_free_blocks == engine.engine.block_manager.num_blocks


def test_leaving_a_stream_aborts_and_frees_blocks(engine):
    async def main():
        stream = engine.generate([3, 4, 5], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
        async for out in stream:
            if len(out.token_ids) == 3:
                break
        await stream.aclose()
        for _ in range(100):
            stats = await engine.call(lambda e: e.stats())
            if stats["num_running"] == 0:
                return stats
            await asyncio.sleep(0.01)
        return stats

    stats = asyncio.run(main())
    assert stats["num_running"] == 0 and stats["num_free_blocks"] == stats["num_blocks"]


def test_bad_request_raises_in_the_caller_and_engine_lives_on(engine):
    async def main():
        with pytest.raises(ValueError, match="context length"):
            await collect(engine, [1] * 300, SamplingParams(max_tokens=10))
        return await collect(engine, [1, 2], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))

    assert len(asyncio.run(main())[-1].token_ids) == 2
    assert engine.is_alive


def test_a_failing_step_marks_the_engine_dead(engine):
    def broken_step():
        raise RuntimeError("boom")

    engine.engine.step = broken_step

    async def main():
        with pytest.raises(EngineDeadError, match="boom"):
            await collect(engine, [1, 2], SamplingParams(max_tokens=2))

    asyncio.run(main())
    assert not engine.is_alive


def test_a_request_made_once_is_the_one_streamed(engine):
    """make_request tokenizes and checks in the caller; stream runs that very object (no second tokenizing)."""
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    state = engine.make_request("Attention is all you need", params)
    prompt_ids = engine.engine.tokenizer.encode("Attention is all you need")
    assert state.seq.prompt_token_ids == prompt_ids

    async def main():
        return [out async for out in engine.stream(state)]

    outputs = asyncio.run(main())
    assert outputs[-1].finished and outputs[-1].request_id == state.seq.request_id
    assert outputs[-1].prompt_token_ids == prompt_ids and len(outputs[-1].token_ids) == 4
    with pytest.raises(ValueError, match="context length"):
        engine.make_request([1] * 300, params)  # raises in the caller, before anything is queued


def test_calls_wait_while_new_requests_wait_for_their_first_step(engine):
    """A research call queued with new requests runs after the step that takes them in: a request's first
    token never waits behind a call (while requests run, one call between two steps)."""
    saw_waiting = []
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)

    async def main():
        background = asyncio.create_task(collect(engine, [3] * 8, params))
        await asyncio.sleep(0.05)  # the engine is busy stepping
        for i in range(12):
            calls = [engine.call(lambda e: saw_waiting.append(e.has_waiting_requests())) for _ in range(3)]
            await asyncio.gather(collect(engine, [7, i + 1], SamplingParams(temperature=0, max_tokens=2)), *calls)
        await background

    asyncio.run(main())
    assert len(saw_waiting) == 36 and not any(saw_waiting)


def test_serving_waits_while_an_op_or_a_new_request_is_not_taken_in(tiny_model_dir):
    """What research slices ask between two layers (research/step_slices.py): True from the moment a
    serving op is queued until the loop runs it, and while a request waits for its first step."""
    llm = LLMEngine(load_model(tiny_model_dir("llama")), EngineConfig(num_kv_blocks=50, block_size=4))
    async_engine = AsyncLLMEngine(llm)  # not started: what is queued stays queued
    assert not async_engine.serving_waits()
    async_engine.abort("nobody")  # an op, queued for the loop
    assert async_engine.serving_waits()
    async_engine._ops.get()()  # the loop runs it
    assert not async_engine.serving_waits()
    llm.add_request([3, 4, 5], SamplingParams(temperature=0, max_tokens=2))
    assert async_engine.serving_waits()  # taken in, not yet scheduled
    llm.step()
    assert not async_engine.serving_waits()  # running: its decode steps are not what a slice waits for
