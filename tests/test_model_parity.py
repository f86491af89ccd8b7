"""Our models compute what transformers computes: float32 logits within 1e-4 of the eager reference,
for a batch of prompts of different lengths, in one full forward and step by step over the paged KV cache."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import FAMILIES, VOCAB, load_reference

from glassbox.engine.kv_cache import KVCache
from glassbox.engine.step_metadata import SeqChunk, build_step_metadata
from glassbox.layers.attention import AttentionMetadata
from glassbox.models.loader import load_model

TOLERANCE = 1e-4
PROMPT_LENGTHS = [1, 7, 19, 33]


def _prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(n)] for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    cache = {}

    def get(family):
        if family not in cache:
            folder = tiny_model_dir(family)
            cache[family] = (load_model(folder), load_reference(folder))
        return cache[family]

    return get


@torch.inference_mode()
def _reference_logits(reference, prompt: list[int]) -> torch.Tensor:
    return reference(input_ids=torch.tensor([prompt])).logits[0]


@pytest.mark.parametrize("family", FAMILIES)
@torch.inference_mode()
def test_full_forward_batch_matches_transformers(models, family):
    loaded, reference = models(family)
    prompts = _prompts()
    input_ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.cat([torch.arange(len(p)) for p in prompts])
    meta = AttentionMetadata.for_prompts([len(p) for p in prompts])
    logits = loaded.model.compute_logits(loaded.model(input_ids, positions, meta))
    start = 0
    for prompt in prompts:
        expected = _reference_logits(reference, prompt)
        ours = logits[start : start + len(prompt)]
        start += len(prompt)
        assert expected.abs().max() > 0.5, "reference logits too small for the comparison to mean anything"
        assert (ours - expected).abs().max().item() < TOLERANCE


@pytest.mark.parametrize("family", FAMILIES)
@torch.inference_mode()
def test_step_by_step_with_paged_cache_matches_transformers(models, family):
    """Prefill part of each prompt, then feed the rest one token per step, all sequences in one batch.
    Blocks of 4 tokens, handed out in shuffled order so that no sequence's blocks are contiguous."""
    loaded, reference = models(family)
    prompts = _prompts(seed=1)
    block_size = 4
    blocks_needed = [-(-len(p) // block_size) for p in prompts]
    num_blocks = sum(blocks_needed) + 3
    free = list(range(num_blocks))
    random.Random(2).shuffle(free)
    tables = [[free.pop() for _ in range(n)] for n in blocks_needed]
    cache = KVCache(loaded.config, num_blocks, block_size, torch.float32, torch.device("cpu"))
    cache.bind(loaded.model)

    prefill = [max(1, len(p) // 2) for p in prompts]
    done = [0] * len(prompts)
    ours: list[list[torch.Tensor]] = [[] for _ in prompts]
    step_sizes = prefill
    while any(done[i] < len(p) for i, p in enumerate(prompts)):
        active = [i for i, p in enumerate(prompts) if done[i] < len(p)]
        chunks = [SeqChunk(tables[i], done[i], min(step_sizes[i], len(prompts[i]) - done[i])) for i in active]
        positions, meta = build_step_metadata(chunks, block_size)
        input_ids = torch.tensor([t for i, c in zip(active, chunks) for t in prompts[i][c.start : c.start + c.num_new]])
        logits = loaded.model.compute_logits(loaded.model(input_ids, positions, meta))
        offset = 0
        for i, chunk in zip(active, chunks):
            ours[i].append(logits[offset : offset + chunk.num_new])
            offset += chunk.num_new
            done[i] += chunk.num_new
        step_sizes = [1] * len(prompts)

    for i, prompt in enumerate(prompts):
        expected = _reference_logits(reference, prompt)
        assert (torch.cat(ours[i]) - expected).abs().max().item() < TOLERANCE


def test_mistral_sliding_window_is_read_from_config(models):
    """The Mistral fixture's prompts are longer than its window, so its parity tests cover the window."""
    loaded, _ = models("mistral")
    assert loaded.config.layer_windows == [5, 5]
