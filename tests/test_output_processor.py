"""The output processor's work per step stays flat as an output grows (incremental detokenization, stop
strings searched in the new tail, streamed outputs that carry only what the step added), counted, not
timed; and the step plan says which executor ran."""

from __future__ import annotations

import dataclasses

import pytest

from glassbox import SamplingParams
from glassbox.config import EngineConfig
from glassbox.engine.llm_engine import LLMEngine
from glassbox.models.loader import load_model

NEW_TOKENS = 4000


@pytest.fixture(scope="module")
def long_context_engine(tiny_model_dir) -> LLMEngine:
    """The tiny random Llama with a context long enough for 4,000 new tokens (RoPE has no length limit)."""
    loaded = load_model(tiny_model_dir("llama"))
    loaded = dataclasses.replace(loaded, config=dataclasses.replace(loaded.config, max_position_embeddings=4200))
    return LLMEngine(loaded, EngineConfig(num_kv_blocks=4200 // 16 + 2, enable_prefix_caching=False))


def test_output_work_per_step_does_not_grow_with_the_output(long_context_engine):
    """A 4,000-token streamed generation with a stop string that never matches: the work of the last 100
    steps' output processing (ids decoded, items put into outputs) is within 2x of the first 100's. Before
    incremental detokenization and delta outputs, step n decoded and copied O(n) items (~40x here). The
    streamed pieces add up to the final text, which equals a one-shot decode of the final ids."""
    engine = long_context_engine
    processor = engine.output_processor
    params = SamplingParams(
        temperature=1.0, seed=3, max_tokens=NEW_TOKENS, ignore_eos=True, stop=["never appears \u2603"],
        output_kind="delta",
    )
    engine.add_request([1, 2, 3], params)
    work, pieces, final = [], [], None
    while engine.has_unfinished_requests():
        before = sum(processor.counters.values())
        for out in engine.step():
            pieces.append(out.new_text)
            final = out
        work.append(sum(processor.counters.values()) - before)
    assert final.finished and len(final.token_ids) == NEW_TOKENS
    decode_steps = work[-NEW_TOKENS:]  # one step per token after the prompt's
    first, last = sum(decode_steps[:100]), sum(decode_steps[-101:-1])  # the very last step reports the whole result
    assert first > 0 and last <= 2 * first, (first, last)
    assert "".join(pieces) == final.text == engine.tokenizer.decode(final.token_ids)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_the_step_plan_names_its_executor(long_context_engine):
    """Every step is planned: the plan says which executor ran it, and the engine counts them."""
    engine = long_context_engine
    counts_before = dict(engine.executor_counts)
    engine.add_request([5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    plan = engine.last_plan
    # The default model on a CPU: its quantized layers on the native kernels where they are built.
    expected = "native_stack" if "native_stack" in engine.runner.executors else "eager"
    assert plan.executor == expected and plan.kind == "decode" and plan.num_seqs == 1
    assert expected in str(plan) and plan.label == f"glassbox::executor[{expected}]"
    assert engine.executor_counts[expected] - counts_before.get(expected, 0) == 3  # prefill + 2 decodes
