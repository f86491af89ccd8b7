"""The engine on CUDA (skipped without a GPU; run on the lent device machine)."""

from __future__ import annotations

import pytest
import torch
from conftest import run_all

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
    cpu = run_all(LLMEngine(load_model(folder), EngineConfig(num_kv_blocks=100, block_size=4)), PROMPTS, params)
    gpu_engine = LLMEngine(load_model(folder, device="cuda"), EngineConfig(num_kv_blocks=100, block_size=4))
    gpu = run_all(gpu_engine, PROMPTS, params)
    assert [o.token_ids for o in gpu] == [o.token_ids for o in cpu]
    assert gpu_engine.block_manager.num_free_blocks == gpu_engine.block_manager.num_blocks


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
