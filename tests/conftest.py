"""Shared fixtures: tiny random-weight models of every family, saved as Hugging Face folders with
transformers' own config classes, and a conversion cache private to the test session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Before glassbox is imported anywhere: keep the GGUF conversion cache out of the user's home.
os.environ.setdefault("GLASSBOX_CACHE", tempfile.mkdtemp(prefix="glassbox-test-cache-"))

import pytest
import torch

VOCAB = 320
CORPUS = [
    "The history of the Roman Empire is long and complicated.",
    "Attention is all you need, said the paper, and the field listened.",
    "A paged KV cache stores keys and values in fixed-size blocks.",
    "Prefix caching shares blocks between requests with the same prompt.",
] * 20


def _tiny_configs() -> dict[str, object]:
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
    )
    return {
        "llama": LlamaConfig(**common, tie_word_embeddings=False),
        "llama3_rope": LlamaConfig(
            **common,
            head_dim=16,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
        "mistral": MistralConfig(**common, sliding_window=5),
        "qwen2": Qwen2Config(**common, tie_word_embeddings=True),
        "qwen3": Qwen3Config(**common, head_dim=32),
        "gpt2": GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256),
    }


FAMILIES = list(_tiny_configs())


def _save_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 20, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')


def _randomize(model: torch.nn.Module) -> None:
    """Weights large enough that a wrong wiring shows in the logits (biases and norms included)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * 0.1
            param.copy_(1.0 + noise if ("norm" in name or "ln_" in name) and param.ndim == 1 and "bias" not in name else noise)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """family -> folder with config.json, model.safetensors and a tokenizer (built once per session)."""
    from transformers import AutoModelForCausalLM

    folders: dict[str, Path] = {}
    configs = _tiny_configs()

    def get(family: str) -> Path:
        if family not in folders:
            folder = tmp_path_factory.mktemp(family)
            torch.manual_seed(0)
            config = configs[family]
            config._attn_implementation = "eager"
            model = AutoModelForCausalLM.from_config(config)
            _randomize(model)
            model.save_pretrained(folder)
            _save_tokenizer(folder)
            folders[family] = folder
        return folders[family]

    return get


def load_reference(folder: Path) -> torch.nn.Module:
    """transformers' own model of the folder, float32, eager attention."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def run_all(engine, prompts: list, params) -> list:
    """Run prompts (with one SamplingParams, or one each) through an LLMEngine to the end; outputs in order."""
    params = params if isinstance(params, list) else [params] * len(prompts)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[i] for i in ids]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*args: str) -> tuple[subprocess.Popen, str]:
    """`glassbox serve` in a subprocess on a free port; returns once /health answers 200."""
    import httpx

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "glassbox.cli", "serve", "--port", str(port), "--kv-cache-memory", "0.25", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ.copy(),
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start in time")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
