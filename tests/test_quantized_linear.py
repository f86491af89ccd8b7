"""Weight-only int4 and W8A8 int8 layers against float references, and the engine in those modes."""

from __future__ import annotations

import torch

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
