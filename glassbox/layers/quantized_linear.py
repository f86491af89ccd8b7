"""Weight-only quantized linear layers for the CPU, swapped in for `nn.Linear` from outside the model
files (see engine/optimize.py).

- `Int4Linear`: 4-bit weights in groups of 32 along the input dimension, each group with its own scale and
  minimum — the layout of GGUF's Q4_1, so the default model's Q4_1 weights round-trip almost exactly (only
  the scales are rounded to bfloat16). torch's `_weight_int4pack_mm_for_cpu`, bfloat16 activations.
- `Int8Linear`: W8A8 — 8-bit weights (a scale per output row) and 8-bit activations (a scale per token),
  integer GEMM. Also the LM head of the int4 mode (GGUF stores the SmolLM2 embedding as Q8_0).

Int4 reads 8x fewer weight bytes than float32, which is what a batch-1 decode step is bound by; int8's
integer GEMM is the fastest kernel here once a step has many rows.
"""

from __future__ import annotations

import torch
from torch import nn

from glassbox.kernels import cpu_native

INT4_GROUP_SIZE = 32


def int4_supported(in_features: int, out_features: int, group_size: int = INT4_GROUP_SIZE) -> bool:
    return in_features % group_size == 0 and out_features % 16 == 0


class Int4Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int = INT4_GROUP_SIZE) -> None:
        """weight: [out, in] float; quantized per group of `group_size` inputs: w ≈ (q - 8) * scale + zero."""
        super().__init__()
        out_features, in_features = weight.shape
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = weight.float().reshape(out_features, in_features // group_size, group_size)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = ((high - low) / 15).clamp_min(1e-10)
        q = ((groups - low) / scale).round_().clamp_(0, 15).to(torch.int32).reshape(out_features, in_features)
        zero = low + 8 * scale  # the kernel computes (q - 8) * scale + zero
        # [in / group, out, 2] (scale, zero), as the kernel wants
        scales_zeros = torch.cat([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        self.register_buffer("packed_weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        self.register_buffer("scales_zeros", scales_zeros)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2d.to(torch.bfloat16), self.packed_weight, self.group_size, self.scales_zeros
        ).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)


class Int8Linear(nn.Module):
    """W8A8: int8 weights (one scale per output row) times int8 activations (one scale per token, taken
    at run time), accumulated exactly in int32. A row's result depends on that row alone, so outputs are
    the same whatever else is in the batch.

    Two kernels, same bits: the native one (kernels/cpu/int8_linear.c: quantize, VNNI GEMM and scaling in
    one call, weights packed for it) where the CPU and a compiler allow, else `torch._int_mm` — the
    readable path below, and the oracle the native kernel is tested against. Only one weight copy is kept.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, native: bool | None = None) -> None:
        """weight: [out, in] float; w ≈ q * scale[row]. native: None = wherever available."""
        super().__init__()
        self.out_features = weight.shape[0]
        scale = weight.float().abs().amax(1).clamp_min(1e-10) / 127
        weight_int8 = (weight.float() / scale[:, None]).round_().to(torch.int8)
        self.native = cpu_native.available() if native is None else native
        if self.native:
            self.register_buffer("packed_weight", cpu_native.int8_pack(weight_int8))
        else:
            # Stored [out, in] and handed to the kernel transposed: faster than a contiguous [in, out] here.
            self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = (x if x.dim() == 2 else x.reshape(-1, x.shape[-1])).float()
        if self.native:
            y = cpu_native.int8_linear(x2d, self.packed_weight, self.scale, self.bias, self.out_features)
        else:
            x_scale = x2d.abs().amax(1, keepdim=True).clamp_min_(1e-10).div_(127)  # [M, 1]
            x_int8 = torch.round(x2d / x_scale).to(torch.int8)
            y = torch._int_mm(x_int8, self.weight_int8.t()).float().mul_(x_scale).mul_(self.scale)
            if self.bias is not None:
                y += self.bias
        y = y.to(x.dtype)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def forward_fused(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None = None,
        prologue: str | None = None,
        norm: nn.Module | None = None,
    ) -> torch.Tensor:
        """The native kernel with what surrounds the layer folded in (models/llama_native.py): x [M, K]
        float32, first normalized by the RMSNorm `norm` (prologue "rms_norm") or taken as [M, 2K] gate/up
        halves (prologue "silu_mul"); `residual` [M, N] float32 added to the result."""
        return cpu_native.int8_linear(
            x, self.packed_weight, self.scale, self.bias, self.out_features, residual, prologue,
            None if norm is None else norm.weight, 0.0 if norm is None else norm.eps,
        )  # fmt: skip
