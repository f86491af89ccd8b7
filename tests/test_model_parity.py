"""Our models compute what transformers computes: float32 logits within 1e-4 of the eager reference,
for a batch of prompts of different lengths, in one full forward and step by step over the paged KV cache."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAMILIES, VOCAB, load_reference

from glassbox.engine.kv_cache import KVCache
from glassbox.engine.step_metadata import SeqChunk, build_step_metadata
from glassbox.layers.attention import AttentionMetadata
from glassbox.models.loader import load_model
from glassbox.models.registry import FAMILIES as REGISTERED_FAMILIES
from glassbox.models.registry import model_class
from glassbox.research.pipeline import Activation, run_step

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


GGUF_FAMILIES = ["llama", "qwen2", "qwen3", "gpt2"]


def _write_gguf(folder: Path, path: Path) -> None:
    """The tiny Hugging Face model in `folder` as a float32 GGUF in llama.cpp's layout, written with gguf-py's
    own name table (not ours): Q/K rows permuted in "llama" files, GPT-2's Conv1D weights transposed, the
    byte-level BPE tokenizer as a "gpt2" vocabulary."""
    import gguf
    from safetensors.numpy import load_file

    hf = json.loads((folder / "config.json").read_text())
    arch = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gpt2": "gpt2"}[hf["model_type"]]
    gpt2 = arch == "gpt2"
    num_layers = hf["n_layer"] if gpt2 else hf["num_hidden_layers"]
    names = gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), num_layers)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(num_layers)
    if gpt2:
        writer.add_context_length(hf["n_positions"])
        writer.add_embedding_length(hf["n_embd"])
        writer.add_feed_forward_length(4 * hf["n_embd"])
        writer.add_head_count(hf["n_head"])
        writer.add_layer_norm_eps(hf["layer_norm_epsilon"])
    else:
        writer.add_context_length(hf["max_position_embeddings"])
        writer.add_embedding_length(hf["hidden_size"])
        writer.add_feed_forward_length(hf["intermediate_size"])
        writer.add_head_count(hf["num_attention_heads"])
        writer.add_head_count_kv(hf["num_key_value_heads"])
        writer.add_layer_norm_rms_eps(hf["rms_norm_eps"])
        writer.add_rope_freq_base((hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        if hf.get("head_dim"):
            writer.add_key_length(hf["head_dim"])
            writer.add_value_length(hf["head_dim"])
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]
    tokens = sorted(vocab["vocab"], key=vocab["vocab"].get)
    tokens += [f"[PAD{i}]" for i in range(len(tokens), hf["vocab_size"])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t == "<|endoftext|>" else 5 if t.startswith("[PAD") else 1 for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in vocab["merges"]])
    writer.add_eos_token_id(vocab["vocab"]["<|endoftext|>"])
    for key, array in load_file(str(folder / "model.safetensors")).items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):  # GPT-2's causal-mask buffers
            continue
        if arch == "llama" and key.endswith(("q_proj.weight", "k_proj.weight")):  # llama.cpp's `permute`
            heads = hf["num_attention_heads"] if "q_proj" in key else hf["num_key_value_heads"]
            rows, cols = array.shape
            array = array.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)
        if gpt2 and key.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            array = array.T
        writer.add_tensor(names.get_name(key, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("family", GGUF_FAMILIES)
@torch.inference_mode()
def test_gguf_of_every_family_matches_transformers(tiny_model_dir, models, family, tmp_path):
    """A family's GGUF (llama.cpp's names and layout) loads to the logits transformers computes from the
    Hugging Face folder: the family's GGUF name table, Q/K unpermute and Conv1D transpose are right."""
    path = tmp_path / f"{family}.gguf"
    _write_gguf(tiny_model_dir(family), path)
    loaded = load_model(path, progress=False)
    _, reference = models(family)
    prompt = _prompts()[-1]
    meta = AttentionMetadata.for_prompts([len(prompt)])
    logits = loaded.model.compute_logits(loaded.model(torch.tensor(prompt), torch.arange(len(prompt)), meta))
    assert (logits - _reference_logits(reference, prompt)).abs().max().item() < TOLERANCE
    assert loaded.config.architecture == family


@pytest.mark.parametrize("family", FAMILIES)
@torch.inference_mode()
def test_parts_compose_to_the_forward(models, family):
    """embed -> each layer's attention_residual and mlp_residual -> final_norm is the forward, bit for bit;
    the pipeline's steps (research/pipeline.py) chained give the same logits."""
    loaded, _ = models(family)
    model = loaded.model
    prompt = _prompts()[-1]
    ids, positions = torch.tensor(prompt), torch.arange(len(prompt))
    meta = AttentionMetadata.for_prompts([len(prompt)])
    x, layer_args = model.embed(ids, positions)
    assert x.shape == (len(prompt), loaded.config.hidden_size)
    assert len(model.layers) == loaded.config.num_hidden_layers
    for layer in model.layers:
        x = layer.mlp_residual(layer.attention_residual(x, layer_args, meta))
    assert torch.equal(model.final_norm(x), model(ids, positions, meta))
    assert model.embedding.weight.shape == (loaded.config.vocab_size, loaded.config.hidden_size)

    activation = Activation(None, prompt)
    steps = [("embed", None)] + [(step, i) for i in range(len(model.layers)) for step in ("attention", "mlp")]
    for step, layer_idx in steps + [("final_norm", None), ("lm_head", None)]:
        activation = Activation(run_step(model, step, layer_idx, activation), prompt)
    assert torch.equal(activation.tensor, model.compute_logits(model(ids, positions, meta)))


def test_every_family_class_points_to_its_checkpoint_format():
    """The registry's format names the family's class, and the class names the same format back."""
    for architecture, checkpoint_format in REGISTERED_FAMILIES.items():
        cls = model_class(architecture)
        assert cls.checkpoint_format is checkpoint_format and checkpoint_format.architecture == architecture
        assert cls.packed_modules_mapping == checkpoint_format.packed_modules_mapping
