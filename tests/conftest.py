"""Shared fixtures: tiny random-weight models of every family, saved as Hugging Face folders with
transformers' own config classes, and a conversion cache private to the test session."""

from __future__ import annotations

import atexit
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Before glassbox is imported anywhere: keep the GGUF conversion cache out of the user's home, and remove
# it when the session ends (a converted default model is ~0.5 GB: one left per run filled the disk).
if "GLASSBOX_CACHE" not in os.environ:
    os.environ["GLASSBOX_CACHE"] = tempfile.mkdtemp(prefix="glassbox-test-cache-")
    atexit.register(shutil.rmtree, os.environ["GLASSBOX_CACHE"], ignore_errors=True)

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


def record_launches(engine) -> list:
    """Wrap engine.runner.launch_decode from outside: the list gets each launch's `previous` step (None: a
    launch that did not overlap one)."""
    launches = []
    launch = engine.runner.launch_decode

    def recorded(plan, batch, requests, input_ids=None, previous=None):
        launches.append(previous)
        return launch(plan, batch, requests, input_ids, previous)

    engine.runner.launch_decode = recorded
    return launches


def async_scheduling_requests(engine) -> tuple[list, list]:
    """Eight prompts and their params for `async_scheduling_scenario`: greedy, different lengths; some stop on
    a token first sampled after their 10th (found by a plain run on `engine`, which is then spent), one asks
    for logprobs, one has min_tokens with a stop token (both need the host at every step)."""
    from dataclasses import replace

    from glassbox import SamplingParams

    rng = random.Random(11)
    prompts = [[rng.randrange(300) for _ in range(rng.randint(5, 20))] for _ in range(8)]
    params = [SamplingParams(temperature=0, max_tokens=6 + 3 * i, ignore_eos=True) for i in range(8)]
    unstopped = [o.token_ids for o in run_all(engine, prompts, params)]
    late = {i: [t for j, t in enumerate(out) if j >= 10 and t not in out[:j]] for i, out in enumerate(unstopped)}
    stopped = [i for i in (2, 3, 4, 6, 7) if late[i]]
    assert len(stopped) >= 2
    for i in stopped:
        params[i] = replace(params[i], stop_token_ids=[late[i][0]])
    params[5] = replace(params[5], stop_token_ids=[unstopped[5][2]], min_tokens=6)
    params[1] = replace(params[1], logprobs=2)
    return prompts, params


def async_scheduling_scenario(engine, prompts: list, params: list) -> tuple[list, list[bool]]:
    """Runs the first seven requests plus a long one, adds the eighth at step 12 and aborts the long one at
    step 16, then prompt + output of four of them again (prefix-cache hits on blocks committed by decode
    steps). Returns (tokens, finish reason, cached tokens) per request, and whether a step was in flight at
    steps 12 and 16; checks every block is free at the end."""
    from glassbox import SamplingParams

    ids = [engine.add_request(p, sp) for p, sp in zip(prompts[:7], params[:7])]
    doomed = engine.add_request(prompts[0][:3], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    done, in_flight = {}, []
    for step in range(500):
        if step in (12, 16):
            in_flight.append(engine._pending is not None)
        if step == 12:
            ids.append(engine.add_request(prompts[7], params[7]))
        if step == 16:
            assert engine.abort(doomed)
        done.update({o.request_id: o for o in engine.step() if o.finished})
        if not engine.has_unfinished_requests():
            break
    outputs = [done[i] for i in ids]
    outputs += run_all(engine, [p + o.token_ids for p, o in zip(prompts[4:], outputs[4:])], params[4:])
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert all(o.num_cached_tokens > 0 for o in outputs[-4:])
    return [(o.token_ids, o.finish_reason, o.num_cached_tokens) for o in outputs], in_flight


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
