"""The native CPU kernels (kernels/cpu/*.c) of every instruction set this CPU runs against their PyTorch
oracles, and the native quantized decoder layer (models/llama_native.py) against the plain forward it
replaces. The quantized GEMM's own tests are in test_quantized_linear.py; the ARM build's in
test_native_arm.py."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from conftest import run_all
from test_quantized_linear import X86_ISAS, packed, runnable

from glassbox import LLM, SamplingParams
from glassbox.config import EngineConfig
from glassbox.engine.llm_engine import LLMEngine
from glassbox.engine.optimize import weight_format
from glassbox.engine.step_metadata import SeqChunk, build_step_metadata
from glassbox.kernels import attention_torch, cpu_native
from glassbox.layers.norm import RMSNorm
from glassbox.layers.quantized_linear import QLinear
from glassbox.layers.rotary import RotaryEmbedding, apply_rotary
from glassbox.models import llama_native
from glassbox.models.loader import load_model

pytestmark = pytest.mark.skipif(not cpu_native.available(), reason="needs a C compiler")


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 128), (6, 2, 48)])
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("steps", ["decode", "mixed"])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("isa", X86_ISAS)
def test_paged_attention_is_the_torch_path(heads, kv_heads, head_dim, window, steps, cache_dtype, isa):
    """Rotary + KV store + paged attention in one call == apply_rotary, store_kv and attention_torch.attention:
    the cache bit for bit, the output to float32 rounding. Decode tokens with contexts of 1 token, at block
    boundaries and over several blocks in shuffled order; in "mixed" steps also whole prompts and prompt
    chunks after cached tokens (causal within the chunk), and a batch small enough to split kv heads.
    A bfloat16 cache holds what torch's rounding stores, read back widened. What each key received (the
    `observe` output, H2O's history) is the probabilities summed over each kv head's query heads."""
    runnable(isa)
    g = torch.Generator().manual_seed(heads * head_dim)
    block_size, num_blocks = 16, 40
    # (context length after the step, new tokens this step)
    seqs = [(1, 1), (16, 1), (17, 1), (33, 1), (100, 1)]
    if steps == "mixed":
        seqs = [(17, 17), (1, 1), (40, 8), (100, 1), (33, 3)]
    contexts = [c for c, _ in seqs]
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(cache_dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(cache_dtype)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    order = torch.randperm(num_blocks, generator=g)
    tables = torch.full((len(seqs), 7), -1, dtype=torch.int32)
    used = 0
    for i, n in enumerate(contexts):
        count = -(-n // block_size)
        tables[i, :count] = order[used : used + count]
        used += count
    positions = [p for c, new in seqs for p in range(c - new, c)]
    seq_of = [i for i, (_, new) in enumerate(seqs) for _ in range(new)]
    slots = torch.tensor([int(tables[i, p // block_size]) * block_size + p % block_size
                          for i, p in zip(seq_of, positions)])
    starts = [0]
    for _, new in seqs:
        starts.append(starts[-1] + new)
    tokens = len(positions)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g)
    cos, sin = RotaryEmbedding(head_dim, 10000.0)(torch.tensor(positions), torch.float32)
    scale = head_dim**-0.5
    received = torch.zeros(tokens, kv_heads, max(contexts))  # [rows, KV, width]: every token observes
    out = cpu_native.paged_attention(
        qkv, cos.view(tokens, head_dim), sin.view(tokens, head_dim), k_cache, v_cache, slots,
        torch.tensor(starts, dtype=torch.int32), tables, torch.tensor(contexts, dtype=torch.int32), heads, scale,
        window, isa, observe=(torch.arange(tokens, dtype=torch.int32), received),
    )  # fmt: skip

    qk = apply_rotary(qkv[:, : (heads + kv_heads) * head_dim].view(tokens, -1, head_dim), cos, sin)
    v = qkv[:, (heads + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim)
    attention_torch.store_kv(qk[:, heads:], v, expected_k, expected_v, slots)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    reference, probs = attention_torch.attention(
        qk[:, :heads].contiguous(), qk[:, heads:], v, expected_k, expected_v, tables, starts, contexts, scale, window,
        return_probs=True,
    )  # fmt: skip
    torch.testing.assert_close(out, reference.reshape(tokens, -1), rtol=1e-5, atol=1e-5)
    expected = torch.zeros_like(received)
    for i, p in enumerate(probs):  # [H, q_len, context] -> [q_len, KV, context], summed over each group
        q_len, context = p.shape[1:]
        expected[starts[i] : starts[i + 1], :, :context] = p.transpose(0, 1).reshape(q_len, kv_heads, -1, context).sum(2)
    torch.testing.assert_close(received, expected, rtol=1e-5, atol=1e-5)
    # A batch of fewer than 4 tokens splits its kv heads over tasks: the same numbers.
    received_few = torch.zeros(1, kv_heads, max(contexts))
    few = cpu_native.paged_attention(
        qkv[-1:], cos.view(tokens, head_dim)[-1:], sin.view(tokens, head_dim)[-1:], k_cache, v_cache, slots[-1:],
        torch.tensor([0, 1], dtype=torch.int32), tables[-1:], torch.tensor(contexts[-1:], dtype=torch.int32), heads,
        scale, window, isa, observe=(torch.zeros(1, dtype=torch.int32), received_few),
    )  # fmt: skip
    torch.testing.assert_close(few, reference.reshape(tokens, -1)[-1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(received_few, expected[-1:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", X86_ISAS)
def test_argmax_is_torch_argmax(isa):
    """Greedy sampling's argmax: torch's index for every row, ties (the first), NaN (the first NaN), rows
    of -inf, row tails shorter than a vector, and strided rows."""
    runnable(isa)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 49152 + 7, generator=g)
    x[1, 100], x[1, 50] = float("nan"), float("nan")
    x[2] = float("-inf")
    x[3, 7] = x[3, 9000] = x[3].max() + 1
    x[4] = 2.0
    x[5, -1] = 99.0
    for rows in (x, x[:, 3:], x[:1], x[:, :17]):
        assert torch.equal(cpu_native.argmax(rows, isa), rows.argmax(dim=-1))


@pytest.mark.parametrize("isa", X86_ISAS)
@pytest.mark.parametrize("activations", ["float32", "int8", "int16", "int12"])
@pytest.mark.parametrize("format", ["q4_1", "q8_0"])
def test_gemm_prologues_and_residual_are_the_torch_ops(isa, format, activations):
    """RMSNorm and SiLU·mul done on each row before it is quantized, the residual added after: the same
    numbers as running the PyTorch ops first (allowed to differ by float32 rounding, which can move a value
    across a rounding boundary of its block: by one step of d_x at most)."""
    runnable(isa)
    g = torch.Generator().manual_seed(5)
    hidden, inner, out = 576, 1536, 200
    norm = RMSNorm(hidden, eps=1e-5)
    norm.weight.data = torch.rand(hidden, generator=g) + 0.5
    proj_w, proj_b, down_w = (torch.randn(out, hidden, generator=g) * 0.05, torch.randn(out, generator=g),
                              torch.randn(out, inner, generator=g) * 0.05)  # fmt: skip
    proj = QLinear(proj_w, proj_b, format, activations, native=False)
    down = QLinear(down_w, None, format, activations, native=False)
    (proj_q, keep), (down_q, keep_too) = (packed(proj_w, proj.bias, format, isa, activations),
                                          packed(down_w, None, format, isa, activations))  # fmt: skip
    x = torch.randn(9, hidden, generator=g) * 3
    residual = torch.randn(9, out, generator=g)

    def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
        torch.testing.assert_close(actual, expected, rtol=2e-3, atol=2e-3 * expected.abs().max().item())

    close(cpu_native.qlinear(x, proj_q, out, prologue="rms_norm", norm_weight=norm.weight, eps=norm.eps, isa=isa),
          proj.reference(norm(x)))  # fmt: skip
    assert torch.equal(cpu_native.qlinear(x, proj_q, out, residual=residual, isa=isa),
                       residual + cpu_native.qlinear(x, proj_q, out, isa=isa))  # fmt: skip
    gate_up = torch.randn(9, 2 * inner, generator=g) * 3
    gate, up = gate_up.chunk(2, dim=-1)
    close(cpu_native.qlinear(gate_up, down_q, out, prologue="silu_mul", isa=isa), down.reference(F.silu(gate) * up))


@pytest.fixture(scope="module")
def auto_llm() -> LLM:
    """The default CPU mode: the default model's Q4_1 layers and Q8_0 head on the native kernels."""
    return LLM(quantization="auto", kv_cache_memory=64 << 20, enable_prefix_caching=False)


def mean_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """KL(p || q) of the two [rows, vocab] logits' distributions, averaged over rows."""
    p, q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@torch.inference_mode()
def test_native_layers_give_the_plain_forward_logits(auto_llm):
    """A prefill chunk then a decode step of the default model, on the native layers and on the plain
    forward from the same cache: the same next tokens, and distributions within quantization's own noise.

    Not equal to float32 rounding: the two paths' attention and prologues agree to ~1e-6 (tests above), but
    activations are then rounded to 255 levels per block of 32, so a 1-ulp difference can move a value
    across a rounding boundary by max|block| / 127, and over 30 layers such steps add up; a wrong mask or
    head gives a KL > 1."""
    runner = auto_llm.engine.runner
    assert "native_stack" in runner.executors
    model, kv_cache = runner.model, runner.kv_cache
    kv_cache.bind(model)
    ids = auto_llm.engine.tokenizer.encode("The history of the Roman Empire is long and complicated. It began with")
    table = list(range(1, 6))

    def logits(tokens: list[int], start: int, native: bool) -> torch.Tensor:
        positions, meta = build_step_metadata([SeqChunk(table, start, len(tokens))], kv_cache.block_size)
        forward = runner.executors["native_layers" if native else "eager"].forward
        return model.compute_logits(forward(torch.tensor(tokens), positions, meta))

    plain, native = (logits(ids[:-1], 0, native) for native in (False, True))
    assert mean_kl(plain, native) < 0.05
    assert torch.equal(plain[-1].argmax(), native[-1].argmax())
    saved = kv_cache.k.clone(), kv_cache.v.clone()
    decode_native = logits(ids[-1:], len(ids) - 1, True)
    kv_cache.k.copy_(saved[0])
    kv_cache.v.copy_(saved[1])
    decode_plain = logits(ids[-1:], len(ids) - 1, False)
    assert mean_kl(decode_plain, decode_native) < 0.05
    assert decode_native.argmax() == decode_plain.argmax()


def test_native_engine_batched_equals_alone_and_frees_every_block(auto_llm):
    """32 concurrent requests of different lengths on the native layers == each alone; blocks all freed."""
    prompts = [f"Chapter {i}: " + "the river and the city of Rome " * (i % 7) for i in range(32)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    together = [o.token_ids for o in auto_llm.generate(prompts, params)]
    assert together == [auto_llm.generate(p, params)[0].token_ids for p in prompts]
    manager = auto_llm.engine.block_manager
    assert manager.num_free_blocks == manager.num_blocks


@torch.inference_mode()
def test_native_stack_is_the_native_layers(auto_llm):
    """All layers in one native call (NativeStack) == the native layers called one by one from Python: the
    same kernels, bit for bit, over a prefill chunk and a decode step of a bfloat16 and a float32 cache.
    The layer-by-layer path is the one an fp8 cache takes (with the model's own attention)."""
    runner = auto_llm.engine.runner
    model, kv_cache = runner.model, runner.kv_cache
    kv_cache.bind(model)
    stack = runner.executors["native_stack"].stack
    assert isinstance(stack, llama_native.NativeStack)
    ids = auto_llm.engine.tokenizer.encode("The history of the Roman Empire is long and complicated. It began with")
    table = list(range(1, 6))
    for dtype in (torch.bfloat16, torch.float32):
        layers = [layer.self_attn.attn for layer in model.model.layers]
        saved = [(a.k_cache, a.v_cache) for a in layers]
        for a, (k, v) in zip(layers, saved):  # another pool bound: the stack must follow it
            a.k_cache, a.v_cache = k.to(dtype), v.to(dtype)
        try:
            for tokens, start in ((ids[:-1], 0), (ids[-1:], len(ids) - 1)):
                outs = []
                for forward in (stack, runner.executors["native_layers"].forward):
                    positions, meta = build_step_metadata([SeqChunk(table, start, len(tokens))], kv_cache.block_size)
                    outs.append(forward(torch.tensor(tokens), positions, meta))
                assert torch.equal(outs[0], outs[1])
        finally:
            for a, (k, v) in zip(layers, saved):
                a.k_cache, a.v_cache = k, v


@pytest.mark.parametrize("family", ["llama", "llama3_rope", "mistral", "qwen2"])
@torch.inference_mode()
def test_native_engine_on_every_llama_family_shape(tiny_model_dir, family):
    """The native layers on the other Llama-family shapes: head_dim 16 (the kernels' generic head size),
    Llama 3 rope, Mistral's sliding window (5 tokens, shorter than the prompts), Qwen2's q/k/v biases. The
    engine takes the native path, batched == alone with every block freed, and a prefill's logits are the
    plain quantized forward's (up to the noise of quantized activations: see
    test_native_layers_give_the_plain_forward_logits). Random float weights: "auto" stores them as Q8_0."""
    engine = LLMEngine(load_model(tiny_model_dir(family)), EngineConfig(kv_cache_memory=8 << 20))
    assert weight_format(engine.runner.model) == "q8_0"
    runner = engine.runner
    assert "native_stack" in runner.executors
    rng = random.Random(family)
    prompts = [[rng.randrange(300) for _ in range(rng.randint(3, 40))] for _ in range(6)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    batched = [o.token_ids for o in run_all(engine, prompts, params)]
    assert batched == [run_all(engine, [p], params)[0].token_ids for p in prompts]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks

    model, kv_cache = runner.model, runner.kv_cache
    kv_cache.bind(model)
    logits = []
    for executor in ("eager", "native_layers"):
        positions, meta = build_step_metadata([SeqChunk([1, 2, 3], 0, len(prompts[0]))], kv_cache.block_size)
        logits.append(model.compute_logits(runner.executors[executor].forward(torch.tensor(prompts[0]), positions, meta)))
    # Here ≤ 2e-5 (tiny random models spread their activations evenly); the logits of the wrong positions
    # are 0.2-0.4 apart.
    assert mean_kl(*logits) < 1e-3


def test_a_compiler_without_amx_falls_back_to_avx512(tmp_path, monkeypatch):
    """Where the CPU has AMX but the compiler cannot build for it (GCC before 11), the default kernels are the
    AVX-512 ones, not none; asked for by name, AMX is refused."""
    runnable("amx")
    compiler = tmp_path / "cc"
    compiler.write_text('#!/bin/sh\nfor a in "$@"; do case "$a" in -mamx*) exit 1;; esac; done\nexec gcc "$@"\n')
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    monkeypatch.setenv("GLASSBOX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("GLASSBOX_NATIVE_ISA", raising=False)
    cpu_native.library.cache_clear()
    try:
        assert cpu_native.isa() == "avx512"
        assert cpu_native.library("amx") is None
    finally:
        cpu_native.library.cache_clear()
