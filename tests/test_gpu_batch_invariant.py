"""Batch-invariant mode on CUDA (issue 21), bfloat16, on Llama-3.2-1B and Qwen3-0.6B shapes with random
weights: 16 prompts each alone, all together, inside batches of 3, 7 and 32 beside other prompts, and with a
64-token step budget (prompts chunked, decodes beside prefill chunks): the same logprobs (sampled tokens and
prompt positions) bit for bit, the same 64 greedy tokens (CUDA graphs and decode steps launched ahead), the
same seeded samples. Skipped without CUDA; run on the lent device machine:

    PYTHONPATH=$PWD python -m pytest tests/test_gpu_batch_invariant.py -q
"""

from __future__ import annotations

import gc
import random
from pathlib import Path

import pytest
import torch
from conftest import run_all

from glassbox import SamplingParams
from glassbox.config import EngineConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SHAPES = {
    "llama-1b": {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": True,
                 "max_position_embeddings": 8192, "rope_theta": 500000.0},
    "qwen3-0.6b": {"vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": True,
                   "max_position_embeddings": 40960, "rope_theta": 1e6, "rms_norm_eps": 1e-6},
}  # fmt: skip
NEW_TOKENS = 64
rng = random.Random(21)
PROMPTS = [[rng.randint(1, 30000) for _ in range(rng.randint(20, 300))] for _ in range(16)]
FILLERS = [[rng.randint(1, 30000) for _ in range(rng.randint(5, 400))] for _ in range(32)]


def random_model_folder(name: str, folder: Path) -> Path:
    """A Hugging Face folder of the shape with random weights (transformers' init) and a word-level tokenizer."""
    import transformers
    from tokenizers import Tokenizer, models

    qwen = name.startswith("qwen3")
    config = (transformers.Qwen3Config if qwen else transformers.LlamaConfig)(**SHAPES[name])
    model_class = transformers.Qwen3ForCausalLM if qwen else transformers.LlamaForCausalLM
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = model_class(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    vocab = {f"t{i}": i for i in range(SHAPES[name]["vocab_size"])}
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module", params=list(SHAPES))
def engines(request, tmp_path_factory):
    """(engine with the default 2,048-token budget, engine with a 64-token budget) over one loaded model."""
    from glassbox.engine.llm_engine import LLMEngine
    from glassbox.layers.batch_invariant import is_batch_invariant
    from glassbox.models.loader import load_model

    folder = random_model_folder(request.param, tmp_path_factory.mktemp(request.param))
    loaded = load_model(folder, dtype="bfloat16", device="cuda")

    def engine(budget: int) -> LLMEngine:
        config = EngineConfig(batch_invariant=True, kv_cache_memory=3 << 30, max_num_seqs=64,
                              max_num_batched_tokens=budget, enable_prefix_caching=False)
        return LLMEngine(loaded, config)

    whole, chunked = engine(2048), engine(64)
    assert is_batch_invariant(loaded.model), "the engine did not apply batch_invariant (engine/batch_invariant.py)"
    assert "compiled" not in whole.runner.executors and whole.runner.graphs is not None
    yield whole, chunked
    del whole, chunked, loaded
    gc.collect()
    torch.cuda.empty_cache()


def run(engine, prompts: list[list[int]], params: list[SamplingParams]) -> list[tuple]:
    return [(o.token_ids, o.logprobs, o.prompt_logprobs) for o in run_all(engine, prompts, params)]


def in_batches(engine, size: int, params: list[SamplingParams], filler_params: SamplingParams) -> list[tuple]:
    """Each probe inside a batch of `size` sequences: ceil(size / 2) probes (at most) and fillers."""
    probes_per_batch = max(1, min(16, size // 2))
    results = []
    for start in range(0, len(PROMPTS), probes_per_batch):
        probes = list(range(start, min(start + probes_per_batch, len(PROMPTS))))
        fillers = FILLERS[: size - len(probes)]
        prompts = [PROMPTS[i] for i in probes] + fillers
        got = run(engine, prompts, [params[i] for i in probes] + [filler_params] * len(fillers))
        results.extend(got[: len(probes)])
    return results


def check_everywhere(engines, params: list[SamplingParams], filler_params: SamplingParams) -> list[tuple]:
    whole, chunked = engines
    alone = [run(whole, [p], [sp])[0] for p, sp in zip(PROMPTS, params)]
    runs = {"together": run(whole, PROMPTS, params), "chunked_64": run(chunked, PROMPTS, params)}
    for size in (3, 7, 32):
        runs[f"batch_{size}"] = in_batches(whole, size, params, filler_params)
    for name, got in runs.items():
        differ = [i for i in range(len(PROMPTS)) if got[i] != alone[i]]
        assert not differ, f"{name}: prompts {differ} differ from alone"
    assert all(len(tokens) == NEW_TOKENS for tokens, _, _ in alone)
    return alone


def test_greedy_logprobs_are_bit_identical(engines):
    """Logprobs of the 64 sampled tokens and of every prompt position (eager steps: logprobs are read on
    the host)."""
    params = [SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=2, prompt_logprobs=0)] * 16
    filler = SamplingParams(temperature=0, max_tokens=NEW_TOKENS // 2, ignore_eos=True, logprobs=1)
    alone = check_everywhere(engines, params, filler)
    assert all(len(prompt_logprobs) == len(p) for (_, _, prompt_logprobs), p in zip(alone, PROMPTS))


def test_greedy_tokens_are_identical_on_graphs_and_launched_ahead(engines):
    """Without logprobs, decode steps replay the CUDA graphs (padding rows up to each bucket) and are
    launched before the host reads the previous step: the same 64 tokens."""
    params = [SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)] * 16
    check_everywhere(engines, params, SamplingParams(temperature=0, max_tokens=NEW_TOKENS // 2, ignore_eos=True))


def test_seeded_samples_are_identical(engines):
    """Seeded sampling (temperature 0.8, top_p 0.95): each request draws from its own generator over logits
    that do not move, so its tokens and logprobs do not depend on the batch."""
    params = [SamplingParams(temperature=0.8, top_p=0.95, seed=100 + i, max_tokens=NEW_TOKENS, ignore_eos=True,
                             logprobs=0) for i in range(16)]  # fmt: skip
    filler = SamplingParams(temperature=0.8, top_p=0.95, seed=7, max_tokens=NEW_TOKENS // 2, ignore_eos=True)
    check_everywhere(engines, params, filler)
