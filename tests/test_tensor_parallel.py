"""Tensor parallelism over real ranks (issue 18): two gloo ranks on this CPU give what one rank gives.

Each test starts its own engine (rank 0 here, one worker process) and shuts it down: one tensor-parallel
engine per process at a time. Float weights on both sides (quantization="none") where logits are held to
1e-4: the comparison is of the parallel split; the CPU default's blocks on both sides in one test.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from glassbox import LLM, SamplingParams
from glassbox.engine.llm_engine import EngineFatalError
from glassbox.errors import FieldError, UnsupportedModelError
from glassbox.layers.attention import AttentionMetadata
from glassbox.layers.parallel import shard_range
from glassbox.layers.sparsity import SlidingWindow
from glassbox.research.attention import attention_scores

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at",
    "My favourite book is",
    "To make a cup of tea, first",
    "The largest planet in the solar system",
    "In 1492, Columbus",
    "Photosynthesis is the process by which",
    "The quick brown fox",
    "A haiku about autumn:",
    "import numpy as np\n",
    "The meaning of life is",
    "Dear Sir or Madam,",
    "Translate to French: good morning",
]
GREEDY = SamplingParams(temperature=0, max_tokens=12)


def _logits(llm: LLM, token_ids: list[int]) -> torch.Tensor:
    """float32 logits [T, vocab] of a cache-less forward over one prompt, through the engine's runner."""
    runner = llm.engine.runner
    n = len(token_ids)
    with torch.inference_mode():
        hidden = runner.run_forward(torch.tensor(token_ids), torch.arange(n), AttentionMetadata.for_prompts([n]))
        return runner.compute_logits(hidden).float()


def _workers(llm: LLM) -> list:
    return llm.engine.runner.group.processes


def test_shard_range_splits_unevenly_and_covers_everything():
    assert [shard_range(3, r, 2) for r in range(2)] == [(0, 2), (2, 3)]
    assert [shard_range(1536, r, 2) for r in range(2)] == [(0, 768), (768, 1536)]
    assert [shard_range(10, r, 4) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]


def test_default_model_two_ranks_equal_one_rank():
    """16 prompts, greedy, token for token; one step's float32 logits within 1e-4; attention probabilities
    gathered from the ranks (layer 3: rank 0 holds heads 0-5, rank 1 heads 6-8) within 1e-5."""
    one = LLM(quantization="none", kv_cache_memory=64 << 20)
    expected = [out.token_ids for out in one.generate(PROMPTS, GREEDY)]
    prompt_ids = one.tokenizer.encode(PROMPTS[1])
    logits_one = _logits(one, prompt_ids)
    scores_one = attention_scores(one.engine, prompt_ids, 3, None, 0.01)
    with LLM(quantization="none", kv_cache_memory=64 << 20, tensor_parallel_size=2) as two:
        assert two.engine.last_plan is None
        got = [out.token_ids for out in two.generate(PROMPTS, GREEDY)]
        assert two.engine.last_plan.executor == "tensor_parallel"
        logits_two = _logits(two, prompt_ids)
        scores_two = attention_scores(two.engine, prompt_ids, 3, None, 0.01)
        workers = _workers(two)
        assert all(p.poll() is None for p in workers)
    assert got == expected
    assert (logits_two - logits_one).abs().max().item() < 1e-4
    assert len(scores_two["heads"]) == len(scores_one["heads"]) == 9
    for head_one, head_two in zip(scores_one["heads"], scores_two["heads"]):
        difference = torch.tensor(head_two["attention_matrix"]) - torch.tensor(head_one["attention_matrix"])
        assert difference.abs().max().item() < 1e-5
    assert all(p.poll() == 0 for p in workers)  # stopped when asked, exit code 0


def test_default_model_quantized_two_ranks_equal_one_rank():
    """The CPU default (quantization "auto": the GGUF's Q4_1 blocks) on both sides: each rank's slices keep
    their blocks (boundaries at multiples of 32) and run the per-layer native kernel; one rank runs the
    native stack. Greedy outputs equal token for token; one step's logits within 0.15 (the default's int12
    activations: another order of the ranks' partial sums can move a value across a rounding step of 2^-11
    of its block's max; 0.06 seen, 3.9e-3 with int16's 2^-15). The cache in float32: the default's bfloat16
    would round such a difference in a key to a whole bfloat16 step (2^-8) and tip a near tie."""
    one = LLM(kv_cache_memory=64 << 20, kv_cache_dtype="float32")
    assert one.engine.last_plan is None and "native_stack" in one.engine.runner.executors
    expected = [out.token_ids for out in one.generate(PROMPTS, GREEDY)]
    prompt_ids = one.tokenizer.encode(PROMPTS[3])
    logits_one = _logits(one, prompt_ids)
    with LLM(kv_cache_memory=64 << 20, kv_cache_dtype="float32", tensor_parallel_size=2) as two:
        from glassbox.engine.optimize import weight_format

        assert weight_format(two.engine.loaded.model) == weight_format(one.engine.loaded.model)
        got = [out.token_ids for out in two.generate(PROMPTS, GREEDY)]
        logits_two = _logits(two, prompt_ids)
    assert got == expected
    assert (logits_two - logits_one).abs().max().item() < 0.15


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
def test_tiny_families_two_ranks_equal_one_rank(tiny_model_dir, family):
    """Qwen2 (q/k/v biases, tied head), Qwen3 (q/k norms), Llama (untied head): greedy outputs and logits."""
    folder = str(tiny_model_dir(family))
    prompts = [[5, 17, 42, 99, 3], [250, 8, 8, 1], list(range(30, 60))]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    one = LLM(folder, quantization="none", kv_cache_memory=8 << 20)
    expected = [out.token_ids for out in one.generate(prompts, params)]
    logits_one = _logits(one, prompts[2])
    with LLM(folder, quantization="none", kv_cache_memory=8 << 20, tensor_parallel_size=2) as two:
        got = [out.token_ids for out in two.generate(prompts, params)]
        logits_two = _logits(two, prompts[2])
    assert got == expected
    assert (logits_two - logits_one).abs().max().item() < 1e-4


def test_dead_worker_fails_the_engine_instead_of_hanging(tiny_model_dir):
    folder = str(tiny_model_dir("qwen2"))
    with LLM(folder, kv_cache_memory=8 << 20, tensor_parallel_size=2) as two:
        worker = _workers(two)[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(10)
        with pytest.raises(EngineFatalError, match="rank 1 exited"):
            two.engine.check_alive()
        start = time.monotonic()
        with pytest.raises(EngineFatalError):
            two.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4))
        assert time.monotonic() - start < 10


def test_a_collective_outside_a_sent_step_raises_instead_of_waiting(tiny_model_dir):
    """A research tool calling the sharded model directly on rank 0 would wait for ever for the workers."""
    with LLM(str(tiny_model_dir("qwen3")), kv_cache_memory=8 << 20, tensor_parallel_size=2) as two:
        with pytest.raises(RuntimeError, match="outside a step"), torch.inference_mode():
            two.engine.loaded.model(torch.tensor([1, 2]), torch.arange(2), AttentionMetadata.for_prompts([2]))
        assert len(two.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3))[0].token_ids) == 3


def test_what_tensor_parallelism_refuses(tiny_model_dir):
    folder = str(tiny_model_dir("qwen2"))  # 2 KV heads
    with pytest.raises(UnsupportedModelError, match="at most that many ranks"):
        LLM(folder, tensor_parallel_size=3)
    with pytest.raises(UnsupportedModelError, match="Llama-family"):
        LLM(str(tiny_model_dir("gpt2")), tensor_parallel_size=2)
    with pytest.raises(ValueError, match="tensor_parallel_size must be at least 1"):
        LLM(folder, tensor_parallel_size=0)
    with LLM(folder, kv_cache_memory=8 << 20, tensor_parallel_size=2) as two:
        with pytest.raises(FieldError, match="sparsity"):
            two.engine.add_request([1, 2, 3], sparsity=SlidingWindow(window=2, sink_tokens=1))


def test_a_worker_dying_while_idle_kills_the_serving_loop(tiny_model_dir):
    """The async loop checks the ranks between waits: /health (which reads `is_alive`) turns 503 without a
    request arriving, and the error names the rank."""
    from glassbox.config import EngineConfig
    from glassbox.engine.async_engine import AsyncLLMEngine
    from glassbox.engine.llm_engine import LLMEngine
    from glassbox.models.loader import load_model

    loaded = load_model(str(tiny_model_dir("qwen3")))
    engine = AsyncLLMEngine(lambda: LLMEngine(loaded, EngineConfig(kv_cache_memory=8 << 20, tensor_parallel_size=2)), idle_wait_s=0.1)
    engine.start()
    try:
        assert engine.is_alive
        worker = engine.engine.runner.group.processes[0]
        worker.kill()
        deadline = time.monotonic() + 10
        while engine.is_alive and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not engine.is_alive and "rank 1 exited" in str(engine.error)
    finally:
        engine.shutdown()
    assert worker.poll() is not None


def test_parallel_research_on_real_ranks(tiny_model_dir):
    """/parallel/*'s work on the ranks: shards placed on rank i mod 2, multiplied there, met on rank 0 through
    a gloo reduce (split along the contracted dimension) or gather; weights read by name are the whole
    model's, put back together from the ranks."""
    from glassbox.research.parallel_ranks import execute_on_ranks, split_on_ranks

    folder = str(tiny_model_dir("qwen2"))
    one = LLM(folder, quantization="none", kv_cache_memory=8 << 20)
    whole = dict(one.engine.loaded.model.named_parameters())
    with LLM(folder, quantization="none", kv_cache_memory=8 << 20, tensor_parallel_size=2) as two:
        engine = two.engine
        for name in ("model.layers.1.self_attn.qkv_proj.weight", "model.layers.1.self_attn.qkv_proj.bias",
                     "model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.gate_up_proj.weight",
                     "model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):  # fmt: skip
            parts = split_on_ranks(engine, name, None, 0, 2, 0, 1 << 22)
            assert torch.equal(parts.full, whole[name]), name
        concat = split_on_ranks(engine, None, [4, 16, 24], 0, 2, 7, 1 << 22)
        report = execute_on_ranks(engine, concat, 8, 3, True, 1 << 22)
        assert report["gather"] == "concat" and report["workers"] == "2 ranks (gloo)"
        assert [r["shards"] for r in report["ranks"]] == [[0], [1]] and report["output_shape"] == [4, 16, 8]
        assert all(r["compute_ms"] > 0 and r["comm_bytes"] > 0 for r in report["ranks"])
        assert report["max_abs_error"] < 1e-4
        summed = split_on_ranks(engine, "model.layers.0.mlp.down_proj.weight", None, -1, 3, 0, 1 << 22)
        report = execute_on_ranks(engine, summed, 16, 0, True, 1 << 22)
        assert report["gather"] == "sum" and [r["shards"] for r in report["ranks"]] == [[0, 2], [1]]
        assert report["max_abs_error"] < 1e-4 and report["output_shape"] == [64, 16]
        alone = execute_on_ranks(engine, summed, 16, 0, False, 1 << 22)
        assert "max_abs_error" not in alone and len(alone["shard_ms"]) == 3
        # the ranks are still in step: serving goes on
        assert len(two.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3))[0].token_ids) == 3


def test_overlap_schedule_needs_ranks_and_gives_the_serial_outputs(tiny_model_dir):
    from glassbox.research.overlap import overlap_schedule
    from glassbox.research.pipeline import Activation

    folder = str(tiny_model_dir("qwen3"))
    steps = [("embed", None), ("layer", 0), ("layer", 1), ("final_norm", None)]
    one = LLM(folder, kv_cache_memory=8 << 20)
    with pytest.raises(FieldError, match="overlap_comm"):
        overlap_schedule(one.engine, steps, Activation(None, [1, 2, 3]), 2)
    with LLM(folder, kv_cache_memory=8 << 20, tensor_parallel_size=2) as two:
        with pytest.raises(ValueError, match="layer_idx"):
            overlap_schedule(two.engine, [("embed", None), ("layer", 9)], Activation(None, [1, 2, 3]), 2)
        report = overlap_schedule(two.engine, steps, Activation(None, list(range(1, 40))), 3)
        assert report["max_abs_diff"] == 0.0 and report["output_shape"] == [39, 64]
        assert [r["rank"] for r in report["ranks"]] == [0, 1] and report["serial_comm_ms"] > 0
        assert report["serial_ms"] > 0 and report["overlapped_ms"] > 0
        assert len(two.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3))[0].token_ids) == 3
