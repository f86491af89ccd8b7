"""The native kernels built for ARM64 — NEON with the dot-product extension, and plain C — with Debian's
cross-compiler (gcc-aarch64-linux-gnu) and run under qemu-aarch64 (qemu-user), against the PyTorch
reference and the x86 build: the quantized GEMM gives the same bits on every ISA (test_quantized_linear.py).

`make install` installs both packages where apt can (Debian, Ubuntu); elsewhere these tests skip."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from glassbox.kernels import attention_torch, cpu_native
from glassbox.layers import quantized_linear as ql
from glassbox.layers.norm import RMSNorm
from glassbox.layers.rotary import RotaryEmbedding, apply_rotary

ROOT = Path(__file__).parent.parent
SOURCES = [Path(__file__).parent / "native" / "driver.c", *cpu_native.SOURCES]
ARM_FLAGS = {"neon": ["-march=armv8.2-a+dotprod"], "generic": []}
ARM_ROWS = 8  # kernels/cpu/qlinear.c's ROWS for both ARM builds

pytestmark = pytest.mark.skipif(
    not (shutil.which("aarch64-linux-gnu-gcc") and shutil.which("qemu-aarch64")),
    reason="needs gcc-aarch64-linux-gnu and qemu-user (apt-get install gcc-aarch64-linux-gnu qemu-user)",
)


@pytest.fixture(scope="module", params=["neon", "generic"])
def arm(request, tmp_path_factory):
    """Run one kernel call in the ARM64 build of `request.param`: (op, params, arrays) -> output arrays."""
    exe = tmp_path_factory.mktemp("arm") / f"driver_{request.param}"
    subprocess.run(
        ["aarch64-linux-gnu-gcc", "-O2", "-static", "-fopenmp", "-ffp-contract=off", "-std=gnu11",
         *ARM_FLAGS[request.param], f"-I{cpu_native.SOURCES[0].parent}", "-o", str(exe), *map(str, SOURCES), "-lm"],
        check=True, capture_output=True,
    )  # fmt: skip

    def call(op: str, params: list[int], arrays: list[torch.Tensor]) -> list[bytes]:
        data = op.encode().ljust(16, b"\0") + struct.pack(f"<{len(params)}q", *params)
        for a in arrays:
            raw = a.contiguous().view(torch.uint8).numpy().tobytes()
            data += struct.pack("<q", len(raw)) + raw
        out = subprocess.run(["qemu-aarch64", str(exe)], input=data, capture_output=True, check=True).stdout
        results = []
        while out:
            (size,) = struct.unpack("<q", out[:8])
            results.append(out[8 : 8 + size])
            out = out[8 + size :]
        return results

    assert call("isa", [], [])[0].decode() == request.param
    return call


def floats(raw: bytes, *shape: int) -> torch.Tensor:
    return torch.frombuffer(bytearray(raw), dtype=torch.float32).reshape(shape)


@pytest.mark.parametrize("activations", ql.ACTIVATIONS)
@pytest.mark.parametrize("format", ql.FORMATS)
def test_arm_gemm_gives_the_x86_bits_and_its_prologues_the_torch_ops(arm, format, activations):
    g = torch.Generator().manual_seed(11)
    n, k, m = 40, 576, 6
    weight, bias = torch.randn(n, k, generator=g) * 0.05, torch.randn(n, generator=g)
    data, scales = ql.pack(*ql.quantize_weight(weight, format), ARM_ROWS)
    x = torch.randn(m, k, generator=g)
    eps = torch.tensor([1e-5])
    code, act = cpu_native.FORMATS[format], cpu_native.ACTIVATIONS[activations]
    y = floats(arm("qlinear", [m, k, n, code, 0, 1, act], [x, data, scales, bias, eps])[0], m, n)
    reference = ql.QLinear(weight, bias, format, activations, native=False)
    if cpu_native.library("generic") is not None:  # the x86 plain-C build: the same bits
        x86_data, x86_scales = ql.pack(*ql.quantize_weight(weight, format), cpu_native.rows("generic"))
        x86_weight = cpu_native.qweight(x86_data, x86_scales, reference.bias, format, activations)
        x86 = cpu_native.qlinear(x, x86_weight, n, isa="generic")
        assert torch.equal(y, x86)
    expected = reference.reference(x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())

    norm = RMSNorm(k, eps=1e-5)
    norm.weight.data = torch.rand(k, generator=g) + 0.5
    y = floats(arm("qlinear", [m, k, n, code, 1, 0, act], [x, data, scales, norm.weight.data, eps])[0], m, n)
    expected = reference.reference(norm(x)) - reference.bias
    torch.testing.assert_close(y, expected, rtol=2e-3, atol=2e-3 * expected.abs().max().item())
    gate_up = torch.randn(m, 2 * k, generator=g) * 3
    y = floats(arm("qlinear", [m, k, n, code, 2, 0, act], [gate_up, data, scales, eps])[0], m, n)
    gate, up = gate_up.chunk(2, dim=-1)
    expected = reference.reference(F.silu(gate) * up) - reference.bias
    torch.testing.assert_close(y, expected, rtol=2e-3, atol=2e-3 * expected.abs().max().item())


def test_arm_argmax_is_torch_argmax(arm):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 1000 + 3, generator=g)
    x[1, 100], x[1, 50] = float("nan"), float("nan")
    x[2] = float("-inf")
    x[3, 7] = x[3, 900] = x[3].max() + 1
    out = torch.frombuffer(bytearray(arm("argmax", list(x.shape), [x])[0]), dtype=torch.int64)
    assert torch.equal(out, x.argmax(dim=-1))


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_arm_paged_attention_is_the_torch_path(arm, cache_dtype):
    """A mixed step (a prompt chunk after cached tokens, decodes), sliding window 7: caches bit for bit,
    output to float32 rounding (test_native_cpu.py's test on x86, smaller)."""
    g = torch.Generator().manual_seed(2)
    heads, kv_heads, head_dim, block_size, window = 6, 2, 48, 16, 7
    seqs = [(17, 17), (40, 8), (33, 1)]  # (context after the step, new tokens)
    k_cache = torch.randn(12, block_size, kv_heads, head_dim, generator=g).to(cache_dtype)
    v_cache = torch.randn(12, block_size, kv_heads, head_dim, generator=g).to(cache_dtype)
    tables = torch.tensor([[3, 1, -1], [0, 5, 7], [2, 4, 9]], dtype=torch.int32)
    positions = [p for c, new in seqs for p in range(c - new, c)]
    seq_of = [i for i, (_, new) in enumerate(seqs) for _ in range(new)]
    slots = torch.tensor([int(tables[i, p // block_size]) * block_size + p % block_size for i, p in zip(seq_of, positions)])
    starts = torch.tensor([0, 17, 25, 26], dtype=torch.int32)
    contexts = torch.tensor([c for c, _ in seqs], dtype=torch.int32)
    tokens = len(positions)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g)
    cos, sin = RotaryEmbedding(head_dim, 10000.0)(torch.tensor(positions), torch.float32)
    scale = head_dim**-0.5
    params = [tokens, qkv.shape[1], int(cache_dtype == torch.bfloat16), len(seqs), tables.shape[1], heads, kv_heads,
              head_dim, block_size, window]  # fmt: skip
    out, k_out, v_out = arm("attention", params, [qkv, cos, sin, k_cache, v_cache, slots, starts, tables, contexts,
                                                   torch.tensor([scale])])  # fmt: skip

    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    qk = apply_rotary(qkv[:, : (heads + kv_heads) * head_dim].view(tokens, -1, head_dim), cos, sin)
    v = qkv[:, (heads + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim)
    attention_torch.store_kv(qk[:, heads:], v, expected_k, expected_v, slots)
    assert bytes(expected_k.view(torch.uint8).numpy()) == k_out and bytes(expected_v.view(torch.uint8).numpy()) == v_out
    reference, _ = attention_torch.attention(
        qk[:, :heads].contiguous(), qk[:, heads:], v, expected_k, expected_v, tables, starts.tolist(),
        contexts.tolist(), scale, window,
    )  # fmt: skip
    torch.testing.assert_close(floats(out, tokens, heads * head_dim), reference.reshape(tokens, -1), rtol=1e-5, atol=1e-5)
