"""RMSNorm in Triton, one program per row: a row's sum of squares is one reduction over the row, in an order
fixed by the row's length, whatever the number of rows (batch-invariant; layers/batch_invariant.py).

Numerics as `F.rms_norm` on half types: in float32, x * rsqrt(mean(x²) + eps) * weight, cast back once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [T, H, D]: rows are (token, head) pairs, one program each; a 2-D input is [T, 1, D]
    weight_ptr,  # [D]
    out_ptr,  # [T, H, D] contiguous
    num_heads,  # H
    stride_x_token,
    stride_x_head,
    eps,
    DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    token = row // num_heads
    head = row % num_heads
    cols = tl.arange(0, BLOCK_D)
    mask = cols < DIM
    x = tl.load(x_ptr + token * stride_x_token + head * stride_x_head + cols, mask=mask, other=0.0).to(tl.float32)
    mean_square = tl.sum(x * x, 0) / DIM
    y = x * (1.0 / tl.sqrt(mean_square + eps))
    y = y * tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * DIM + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, D] or [T, H, D] (contiguous last axis, any other strides: q/k heads are views of the fused
    projection), weight [D] -> a new contiguous tensor of x's shape and dtype."""
    if x.dim() not in (2, 3) or x.stride(-1) != 1:
        raise ValueError(f"x must be [T, D] or [T, H, D] with a contiguous last axis, got {tuple(x.shape)}")
    dim = x.shape[-1]
    if weight.shape != (dim,):
        raise ValueError(f"weight must be [{dim}], got {tuple(weight.shape)}")
    x3 = x if x.dim() == 3 else x[:, None, :]
    num_tokens, num_heads, _ = x3.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    num_rows = num_tokens * num_heads
    if num_rows:
        _rms_norm_kernel[(num_rows,)](
            x3, weight, out, num_heads, x3.stride(0), x3.stride(1), eps,
            DIM=dim,
            BLOCK_D=triton.next_power_of_2(dim),
            num_warps=4 if dim <= 2048 else 8,
        )  # fmt: skip
    return out
