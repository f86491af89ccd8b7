"""Block-quantized linear layers (layers/quantized_linear.py): the native kernel of every instruction set this
CPU runs against the PyTorch reference, and the default model's GGUF blocks used as stored."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from glassbox.kernels import cpu_native
from glassbox.layers import quantized_linear as ql
from glassbox.models.gguf_reader import GGUFFile
from glassbox.models.loader import default_model_path

# Every x86 instruction set is a test here; the ones this CPU lacks skip (AVX-512 on an AVX2 machine, AMX's
# tiles before Sapphire Rapids).
X86_ISAS = ["amx", "avx512", "avx2", "generic"]


def runnable(isa: str) -> str:
    if isa not in cpu_native.runnable_isas():
        pytest.skip(f"this CPU does not run {isa} code (it runs {', '.join(cpu_native.runnable_isas())})")
    if cpu_native.library(isa) is None:
        pytest.skip("no C compiler")
    return isa


def packed(weight: torch.Tensor, bias: torch.Tensor | None, format: str, isa: str, activations: str = "float32") -> tuple:
    """(QWeight, the tensors it points into) of `weight` packed for the kernels of `isa`."""
    data, scales = ql.pack(*ql.quantize_weight(weight, format), cpu_native.rows(isa))
    return cpu_native.qweight(data, scales, bias, format, activations), (data, scales, bias)


@pytest.mark.parametrize("format", ql.FORMATS)
def test_dequantized_layer_gives_back_its_blocks(format):
    """unpack(pack(blocks)) == blocks, and a layer's dequantized weight is the blocks' weight, natively
    packed or not (research calls that name a weight read it)."""
    weight = torch.randn(19, 64) * 0.05
    q, d, m = ql.quantize_weight(weight, format)
    back = ql.unpack(*ql.pack(q, d, m, 8), format, 8, 19)
    assert torch.equal(back[0], q) and torch.equal(back[1], d) and (m is None or torch.equal(back[2], m))
    expected = ql.dequantize_weight(q, d, m)
    for native in {False, cpu_native.available()}:
        assert torch.equal(ql.QLinear(weight, None, format, native=native).dequantized(), expected)


@pytest.mark.parametrize("isa", X86_ISAS)
@pytest.mark.parametrize("format", ql.FORMATS)
def test_native_quantization_is_the_reference_bit_for_bit(isa, format):
    """cpu_native.quantize (one C pass) == quantize_weight then pack: the same packed bytes and float16
    scales, for blocks of every kind — random, constant, zero, huge, tiny (subnormal float16 scales), a
    row count that is not a multiple of the group — and each row's max reconstruction error."""
    runnable(isa)
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(37, 128, generator=g) * 0.05
    weight[1, :32] = 0.7
    weight[2, 32:64] = 0.0
    weight[3, :32] *= 1e4
    weight[4, 64:] *= 1e-6
    data, scales, error = cpu_native.quantize(weight, format, isa)
    q, d, m = ql.quantize_weight(weight, format)
    expected_data, expected_scales = ql.pack(q, d, m, cpu_native.rows(isa))
    assert torch.equal(data.flatten(), expected_data.flatten())
    assert torch.equal(scales.flatten().view(torch.int16), expected_scales.flatten().view(torch.int16))
    expected_error = (ql.dequantize_weight(q, d, m) - weight).abs().amax(1)
    assert torch.equal(error, expected_error)


@pytest.mark.parametrize("isa", X86_ISAS)
@pytest.mark.parametrize("activations", ql.ACTIVATIONS)
@pytest.mark.parametrize("format", ql.FORMATS)
@pytest.mark.parametrize("out_features,in_features", [(960, 576), (17, 64), (40, 1536), (8, 32)])
@pytest.mark.parametrize("rows", [1, 3, 4, 7, 9, 14, 15, 20])
def test_kernel_is_the_reference(isa, activations, format, out_features, in_features, rows):
    """kernels/cpu/qlinear.c against QLinear.reference: every tile shape (output rows past a group of 8 or
    16, 1-4 activation rows per register block, AMX's tiles of 16 quantized rows and a partial one), with and
    without bias, strided rows, zero rows, an outlier. Only the float32 order of the sums (and, for int8 activations, of the scaling: the integer
    sums are exact) differs."""
    runnable(isa)
    g = torch.Generator().manual_seed(out_features + rows)
    weight = torch.randn(out_features, in_features, generator=g) * 0.05
    bias = torch.randn(out_features, generator=g) if rows != 3 else None
    reference = ql.QLinear(weight, bias, format, activations, native=False)
    x = torch.randn(rows, in_features + 5, generator=g)[:, :in_features]  # rows with a stride
    x[0, :40] = 0.0
    x[-1, 1] = 40.0
    qweight, keep = packed(weight, reference.bias, format, isa, activations)
    out = cpu_native.qlinear(x, qweight, out_features, isa=isa)
    expected = reference.reference(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    # A row's result depends on that row alone.
    assert torch.equal(cpu_native.qlinear(x[-1:], qweight, out_features, isa=isa), out[-1:])


@pytest.mark.parametrize("isa", X86_ISAS)
@pytest.mark.parametrize("activations", ql.ACTIVATIONS)
@pytest.mark.parametrize("format", ql.FORMATS)
def test_every_instruction_set_gives_the_same_bits(isa, activations, format):
    """The same integer sums and the same fused multiply-adds in the same order on every ISA: AVX-512, AVX2
    and plain C agree bit for bit (without a prologue, whose float sums follow the vector width). 6 rows and
    37 (AMX's tiles, the last partial)."""
    runnable(isa)
    g = torch.Generator().manual_seed(7)
    weight, x = torch.randn(200, 1536, generator=g) * 0.05, torch.randn(37, 1536, generator=g)
    results = []
    for each in (isa, "generic"):
        qweight, keep = packed(weight, None, format, each, activations)
        results.append(torch.cat([cpu_native.qlinear(rows, qweight, 200, isa=each) for rows in (x[:6], x)]))
    assert torch.equal(*results)


@pytest.mark.parametrize("isa", X86_ISAS)
def test_activation_blocks_are_the_reference(isa):
    """Each row quantized per block of 32 (d = max|x| / 127, round half to even), as quantize_activations."""
    runnable(isa)
    x = torch.randn(5, 96) * torch.logspace(-3, 2, 96)
    x[1] = 0.0
    x[2, :32] = torch.arange(32) * 0.5 - 8  # ties: values at exact halves of the scale
    q, d, total = cpu_native.quantize_rows(x, isa=isa)
    rq, rd, rtotal = ql.quantize_activations(x)
    assert torch.equal(q.float(), rq) and torch.equal(d, rd) and torch.equal(total.float(), rtotal)


@pytest.mark.parametrize("format,bound", [("q8_0", 0.01), ("q4_1", 0.1)])
def test_quantized_layer_is_close_to_the_float_layer(format, bound):
    """Relative error of the output against x · wᵀ in float32, for random weights and activations; with
    float32 activations, the dequantized weights' own product to float32 rounding."""
    g = torch.Generator().manual_seed(3)
    weight, x = torch.randn(64, 256, generator=g) * 0.05, torch.randn(7, 256, generator=g)
    expected = x @ weight.t()
    for native in {False, cpu_native.available()}:
        for activations in ql.ACTIVATIONS:
            out = ql.QLinear(weight, None, format, activations, native=native)(x)
            assert (out - expected).norm() / expected.norm() < bound
        exact = x @ ql.dequantize_weight(*ql.quantize_weight(weight, format)).t()
        torch.testing.assert_close(ql.QLinear(weight, None, format, native=native)(x), exact, rtol=1e-5, atol=1e-5)


def test_the_default_model_runs_its_gguf_blocks_as_stored():
    """Quantizing the default model's dequantized weights gives back the GGUF file's own Q4_1 blocks: the
    same 4-bit values and the same float16 scales and minimums, bit for bit."""
    gguf = GGUFFile(default_model_path())
    tensor = next(t for t in gguf.tensors if t.name == "blk.3.ffn_down.weight")
    assert tensor.type_name == "Q4_1"
    weight = torch.from_numpy(tensor.dequantize().copy())
    q, d, m = ql.quantize_weight(weight, "q4_1")
    # A Q4_1 block: float16 d, float16 m, 16 bytes (value i in the low nibble of byte i, i + 16 in the high).
    blocks = np.ascontiguousarray(tensor.data).reshape(-1, 20)
    assert np.array_equal(blocks[:, 0:2].copy().view(np.float16).ravel(), d.numpy().ravel())
    assert np.array_equal(blocks[:, 2:4].copy().view(np.float16).ravel(), m.numpy().ravel())
    nibbles = blocks[:, 4:]
    stored = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1)
    assert np.array_equal(stored, q.numpy().reshape(-1, 32))
