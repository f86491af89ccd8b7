"""The engine on CUDA: Triton attention, CUDA graphs for decode, bfloat16 by default, the KV pool sized from
free memory, research hooks on the GPU path (skipped without a GPU; run on the lent device machine)."""

from __future__ import annotations

import pytest
import torch
from conftest import async_scheduling_requests, async_scheduling_scenario, record_launches, run_all

from glassbox import SamplingParams
from glassbox.config import EngineConfig
from glassbox.engine.llm_engine import LLMEngine
from glassbox.layers.attention import AttentionMetadata
from glassbox.models.loader import load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

PROMPTS = [[5, 6, 7, 8], [9] * 20, list(range(40, 90)), [1]]


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_cuda_float32_engine_matches_cpu(tiny_model_dir, family):
    torch.backends.cuda.matmul.allow_tf32 = False
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    folder = tiny_model_dir(family)
    cpu = run_all(LLMEngine(load_model(folder), EngineConfig(num_kv_blocks=100, block_size=4, quantization="none")), PROMPTS, params)
    gpu_engine = LLMEngine(load_model(folder, dtype="float32", device="cuda"), EngineConfig(num_kv_blocks=100, block_size=4))
    assert gpu_engine.runner.graphs is not None
    gpu = run_all(gpu_engine, PROMPTS, params)
    assert [o.token_ids for o in gpu] == [o.token_ids for o in cpu]
    assert gpu_engine.block_manager.num_free_blocks == gpu_engine.block_manager.num_blocks


def test_fp8_kv_cache_on_cuda_gives_the_cpu_tokens(tiny_model_dir):
    """kv_cache_dtype="fp8" through the Triton kernels and CUDA graphs: the CPU's fp8 engine's greedy tokens."""
    torch.backends.cuda.matmul.allow_tf32 = False
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    folder = tiny_model_dir("llama")
    config = EngineConfig(num_kv_blocks=100, block_size=4, kv_cache_dtype="fp8", quantization="none")
    cpu = run_all(LLMEngine(load_model(folder), config), PROMPTS, params)
    gpu_engine = LLMEngine(load_model(folder, dtype="float32", device="cuda"), config)
    assert gpu_engine.kv_cache.dtype == torch.float8_e4m3fn and gpu_engine.runner.graphs is not None
    assert [o.token_ids for o in run_all(gpu_engine, PROMPTS, params)] == [o.token_ids for o in cpu]


@torch.inference_mode()
def test_cuda_bfloat16_logits_close_to_float32(tiny_model_dir):
    folder = tiny_model_dir("llama")
    reference = load_model(folder)
    fast = load_model(folder, dtype="bfloat16", device="cuda")
    ids = torch.tensor(PROMPTS[2])
    meta = AttentionMetadata.for_prompts([len(ids)])
    expected = reference.model.compute_logits(reference.model(ids, torch.arange(len(ids)), meta))
    meta_gpu = AttentionMetadata.for_prompts([len(ids)], device="cuda")
    got = fast.model.compute_logits(fast.model(ids.cuda(), torch.arange(len(ids), device="cuda"), meta_gpu))
    assert (got.float().cpu() - expected).abs().max() < 0.05 * expected.abs().max()


def test_cuda_memory_usage_and_latency_stats(tiny_model_dir):
    from glassbox.research.latency import LatencyStats
    from glassbox.research.memory import memory_usage, weight_bytes

    engine = LLMEngine(load_model(tiny_model_dir("llama"), device="cuda"), EngineConfig(num_kv_blocks=100, block_size=4))
    assert engine.loaded.dtype == torch.bfloat16  # the CUDA default
    stats = LatencyStats()
    stats.enable(engine)
    run_all(engine, PROMPTS, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    report = stats.report()
    assert report["stages"]["attention"]["count"] == 2 * 4 and "synchronize" in report["timed_with"]
    memory = memory_usage(engine)
    assert memory["model_weights_mb"] == weight_bytes(engine.loaded.model) / 2**20
    assert memory["kv_cache_mb"]["allocated"] == engine.kv_cache.nbytes / 2**20
    assert memory["peak_memory_mb"] >= memory["model_weights_mb"] + memory["kv_cache_mb"]["allocated"]
    assert "torch.cuda.memory_stats" in memory["how"]


def test_cuda_graph_steps_equal_eager_steps(tiny_model_dir):
    """Batches of every size up to past a bucket edge: the replayed graphs give the eager path's tokens."""
    torch.backends.cuda.matmul.allow_tf32 = False
    folder = tiny_model_dir("qwen3")
    prompts = [list(range(3 + i, 10 + 3 * i)) for i in range(19)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    config = dict(num_kv_blocks=400, block_size=16)
    graphs = run_all(LLMEngine(load_model(folder, dtype="float32", device="cuda"), EngineConfig(**config)), prompts, params)
    eager_engine = LLMEngine(load_model(folder, dtype="float32", device="cuda"), EngineConfig(**config, enforce_eager=True))
    assert eager_engine.runner.graphs is None
    eager = run_all(eager_engine, prompts, params)
    assert [o.token_ids for o in graphs] == [o.token_ids for o in eager]


def test_long_prefill_steps_run_the_compiled_layers(tiny_model_dir):
    """A prefill step of 1,200 tokens takes the compiled layers (COMPILED_MIN_TOKENS) and gives the plain
    eager engine's tokens."""
    from glassbox.engine import model_runner

    torch.backends.cuda.matmul.allow_tf32 = False
    folder = tiny_model_dir("qwen3")
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 300, (200,), generator=generator).tolist() for _ in range(6)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    config = dict(num_kv_blocks=400, block_size=16)
    engine = LLMEngine(load_model(folder, dtype="float32", device="cuda"), EngineConfig(**config))
    steps = []
    execute = engine.runner.execute
    engine.runner.execute = lambda plan, batch, *rest: (steps.append((batch.num_tokens, plan)), execute(plan, batch, *rest))[1]
    fast = run_all(engine, prompts, params)
    assert steps[0][0] == 1200 >= model_runner.COMPILED_MIN_TOKENS and steps[0][1].executor == "compiled"
    plain = run_all(LLMEngine(load_model(folder, dtype="float32", device="cuda"), EngineConfig(**config, enforce_eager=True)),
                    prompts, params)  # fmt: skip
    assert [o.token_ids for o in fast] == [o.token_ids for o in plain]


def test_bfloat16_batched_equals_alone_in_the_batch_invariant_mode(tiny_model_dir):
    """bf16 + graphs, --batch-invariant: 24 requests together give each one's tokens and logprobs alone,
    bit for bit (the default mode is not batch invariant on realistic shapes; those shapes are held to this
    mode in tests/test_gpu_batch_invariant.py)."""
    config = EngineConfig(num_kv_blocks=600, block_size=16, batch_invariant=True)
    engine = LLMEngine(load_model(tiny_model_dir("llama"), device="cuda"), config)
    prompts = [[(7 * i + j) % 250 + 1 for j in range(5 + 3 * i)] for i in range(24)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    together = run_all(engine, prompts, params)
    alone = [run_all(engine, [p], params)[0] for p in prompts]
    assert [(o.token_ids, o.logprobs) for o in together] == [(o.token_ids, o.logprobs) for o in alone]
    assert engine.block_manager.num_used_blocks == 0


def test_kv_pool_sized_from_free_memory(tiny_model_dir):
    engine = LLMEngine(load_model(tiny_model_dir("llama"), device="cuda"), EngineConfig(max_num_seqs=8))
    free, total = torch.cuda.mem_get_info()  # after the pool was allocated
    assert engine.kv_cache.nbytes > 0.5 * (total * 0.9 - (total - free - engine.kv_cache.nbytes))
    assert total - free <= 0.9 * total + (64 << 20)  # within the utilization (plus allocator rounding)
    del engine
    torch.cuda.empty_cache()


def test_masks_and_attention_scores_on_the_gpu_path(tiny_model_dir):
    """Masked sequences recompute their rows on the readable path inside the Triton backend; plain ones
    in the same batch are untouched. Attention scores equal the CPU's."""
    from glassbox.layers.sparsity import parse_sparsity
    from glassbox.research.attention import attention_scores

    torch.backends.cuda.matmul.allow_tf32 = False
    folder = tiny_model_dir("llama")
    cpu = LLMEngine(load_model(folder), EngineConfig(num_kv_blocks=200, block_size=4, quantization="none"))
    gpu = LLMEngine(load_model(folder, dtype="float32", device="cuda"), EngineConfig(num_kv_blocks=200, block_size=4))
    mask = parse_sparsity({"method": "top_k", "k": 3})
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)

    def run(engine, masked):
        ids = [engine.add_request(p, params, sparsity=mask if m else None) for p, m in zip(PROMPTS, masked)]
        done = {}
        while engine.has_unfinished_requests():
            done.update({o.request_id: o for o in engine.step() if o.finished})
        return [done[i] for i in ids]

    masked = [True, False, True, False]
    on_gpu, on_cpu = run(gpu, masked), run(cpu, masked)
    assert [o.token_ids for o in on_gpu] == [o.token_ids for o in on_cpu]
    plain = run(gpu, [False] * 4)
    assert [o.token_ids for o in on_gpu][1::2] == [o.token_ids for o in plain][1::2]
    assert on_gpu[0].sparsity["density"] == pytest.approx(on_cpu[0].sparsity["density"])
    scores_gpu = attention_scores(gpu, PROMPTS[2], 1, None, 0.01)
    scores_cpu = attention_scores(cpu, PROMPTS[2], 1, None, 0.01)
    for a, b in zip(scores_gpu["heads"], scores_cpu["heads"]):
        assert (torch.tensor(a["attention_matrix"]) - torch.tensor(b["attention_matrix"])).abs().max() < 1e-4


def test_overlapped_decode_gives_the_cpu_tokens(tiny_model_dir):
    """Async scheduling (on by default here) with CUDA graphs: steps launched from the previous step's tokens
    on the device give the CPU engine's tokens, finish reasons and prefix-cache hits (`async_scheduling_scenario`:
    late stop tokens, rows that need the host, an arrival and an abort while a step is in flight)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    folder = tiny_model_dir("llama")
    config = EngineConfig(num_kv_blocks=300, block_size=4, quantization="none")
    prompts, params = async_scheduling_requests(LLMEngine(load_model(folder), config))
    expected, _ = async_scheduling_scenario(LLMEngine(load_model(folder), config), prompts, params)
    engine = LLMEngine(load_model(folder, dtype="float32", device="cuda"), config)
    assert engine.async_scheduling and engine.runner.graphs is not None
    launches = record_launches(engine)
    results, in_flight = async_scheduling_scenario(engine, prompts, params)
    assert results == expected
    assert in_flight == [True, True]
    assert sum(previous is not None for previous in launches) > 20


def test_sampled_decode_overlaps_and_seeds_ignore_the_batch(tiny_model_dir):
    """Temperature / top-k / top-p rows are drawn on the device, so their steps overlap too; a seeded request
    gives the same tokens alone and in a busy batch (float32: bfloat16 logits move with the batch size)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    folder = tiny_model_dir("llama")
    engine = LLMEngine(load_model(folder, dtype="float32", device="cuda"), EngineConfig(num_kv_blocks=600, block_size=4))
    seeded = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, seed=7, max_tokens=24, ignore_eos=True)
    alone = run_all(engine, [[5, 6, 7]], seeded)[0]
    launches = record_launches(engine)
    busy = [SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True) for _ in range(15)]
    together = run_all(engine, [[5, 6, 7]] + [[i, i + 1] for i in range(15)], [seeded, *busy])
    assert together[0].token_ids == alone.token_ids
    assert sum(previous is not None for previous in launches) > 10
    assert engine.block_manager.num_used_blocks == 0
