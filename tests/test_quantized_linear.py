"""Weight-only int4 and W8A8 int8 layers against float references, and the engine in those modes."""

from __future__ import annotations

import pytest
import torch

from glassbox.kernels import cpu_native
from glassbox.layers.quantized_linear import Int4Linear, Int8Linear


def q4_1_weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """A weight whose groups of 32 are exactly d * q + m with q spanning 0..15 (as GGUF Q4_1 stores)."""
    g = torch.Generator().manual_seed(seed)
    groups = in_features // 32
    q = torch.randint(0, 16, (out_features, groups, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15  # every group uses the full range, as a Q4_1 block of real weights does
    d = torch.rand(out_features, groups, 1, generator=g) * 0.02 + 0.001
    m = -torch.rand(out_features, groups, 1, generator=g) * 0.1
    return (d * q + m).reshape(out_features, in_features)


def test_int4_reproduces_q4_1_weights():
    weight = q4_1_weight(64, 128)
    x = torch.randn(5, 128)
    layer = Int4Linear(weight, None)
    reference = x.bfloat16().float() @ weight.t()
    # Only the bfloat16 rounding of activations, scales and zeros separates the two.
    assert (layer(x) - reference).abs().max() < 0.02 * reference.abs().max()


def test_int8_w8a8_is_close_and_rows_are_independent():
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(48, 96, generator=g) * 0.05
    bias = torch.randn(48, generator=g)
    layer = Int8Linear(weight, bias)
    x = torch.randn(7, 96, generator=g)
    reference = x @ weight.t() + bias
    out = layer(x)
    assert (out - reference).abs().max() < 0.02 * reference.abs().max()
    # Integer accumulation and per-token scales: a row's result does not depend on the other rows.
    assert torch.equal(layer(x[3:4]), out[3:4])


@pytest.mark.skipif(not cpu_native.available(), reason="needs AVX-512 VNNI and a C compiler")
@pytest.mark.parametrize("out_features,in_features", [(960, 576), (50, 37), (16, 1536), (49, 4)])
@pytest.mark.parametrize("rows", [1, 7, 32])
def test_native_int8_kernel_is_the_torch_path_bit_for_bit(out_features, in_features, rows):
    """kernels/cpu/int8_linear.c against Int8Linear's torch._int_mm path: every tile shape (row tails of
    16, input tails of 4, 1-6 activation rows per register block), with and without bias, strided rows."""
    g = torch.Generator().manual_seed(out_features + rows)
    weight = torch.randn(out_features, in_features, generator=g) * 0.05
    bias = torch.randn(out_features, generator=g) if rows != 7 else None
    reference, native = Int8Linear(weight, bias, native=False), Int8Linear(weight, bias, native=True)
    x = torch.randn(rows, in_features + 3, generator=g)[:, :in_features]  # rows with a stride
    x[0, :3] = 0.0  # exact zeros
    assert torch.equal(native(x), reference(x))
    assert torch.equal(native(x.bfloat16()), reference(x.bfloat16()))
    zeros = torch.zeros(2, in_features)
    assert torch.equal(native(zeros), reference(zeros))
