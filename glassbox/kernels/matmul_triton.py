"""A batch-invariant matmul in Triton: `out = x @ weight.T + bias` where every row of `out` is computed with
the same operations in the same order whatever the number of rows.

cuBLAS picks its kernel (tile shape, tensor-core instruction, split-K) by the problem's shape, M included: a
row's logits then move when another request joins the batch (Thinking Machines, "Defeating Nondeterminism in
LLM Inference", 2025). Here the launch configuration depends on the weight's shape (N, K) only, never on M,
there is no split-K, and M is not specialized by the compiler (`do_not_specialize`): one compiled kernel
serves every batch size, and an output element is always the sum over K in BLOCK_K tiles, in order. A row's
place inside an M tile does not change its sums (each row of a tensor-core product is reduced alike).

What it costs is measured by bench/batch_invariant.py; the model's own nn.Linear (cuBLAS) stays the default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


class TritonMatmulError(ValueError):
    """Arguments the batch-invariant matmul cannot take; the message says which and what was expected."""


@dataclass(frozen=True)
class MatmulConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def matmul_config(out_features: int, in_features: int) -> MatmulConfig:
    """The one launch configuration of a weight [N, K], whatever M. Narrow layers (o_proj, down_proj of a
    1B model: N = 2,048) take 64-column tiles, so that a batch-1 step still spreads over more programs; M
    tiles are 64 rows (one warp group's tensor-core tile on Hopper)."""
    block_n = 64 if out_features <= 4096 else 128
    return MatmulConfig(block_m=64, block_n=block_n, block_k=64, num_warps=4, num_stages=4)


@triton.jit(do_not_specialize=["M"])
def _matmul_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K] (nn.Linear's layout: out = x @ w.T)
    bias_ptr,  # [N] or unused
    out_ptr,  # [M, N]
    M,
    N,
    K,
    stride_x_row,
    stride_x_col,
    stride_w_row,
    stride_w_col,
    stride_out_row,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,  # float32 inputs: full-precision products (tf32 otherwise on the GPU)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # M tiles that walk the N tiles together (L2 reuse of the weight)
):
    # Program order only: which program computes a tile does not change how the tile is computed.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % group_size
    pid_n = (pid % (GROUP_M * num_n)) // group_size

    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BLOCK_M]
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # [BLOCK_N]
    ks = tl.arange(0, BLOCK_K)
    row_mask = rows < M
    col_mask = cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    # The K tiles in order, each added to the float32 accumulator: the same sum for every row and every M.
    # Past K (a last partial tile) the operands are zeros, which add nothing.
    for k in range(0, K, BLOCK_K):
        k_mask = k + ks < K
        x = tl.load(
            x_ptr + rows[:, None] * stride_x_row + (k + ks)[None, :] * stride_x_col,
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_K]
        w = tl.load(
            w_ptr + cols[None, :] * stride_w_row + (k + ks)[:, None] * stride_w_col,
            mask=col_mask[None, :] & k_mask[:, None],
            other=0.0,
        )  # [BLOCK_K, BLOCK_N]
        if IEEE:
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + rows[:, None] * stride_out_row + cols[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None] & col_mask[None, :],
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) with batch-invariant rows. x: [..., K]; weight: [N, K] (any strides);
    bias: [N] or None. Returns [..., N] in x's dtype, accumulated in float32."""
    if x.shape[-1] != weight.shape[1] or weight.dim() != 2:
        raise TritonMatmulError(f"x {tuple(x.shape)} does not fit weight {tuple(weight.shape)} (expected [N, K])")
    if x.dtype != weight.dtype:
        raise TritonMatmulError(f"x is {x.dtype} but weight is {weight.dtype}; cast one of them")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise TritonMatmulError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    leading = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # a view where it can be
    num_rows, in_features = x2.shape
    out_features = weight.shape[0]
    out = torch.empty(num_rows, out_features, dtype=x.dtype, device=x.device)
    if num_rows:
        config = matmul_config(out_features, in_features)
        grid = (triton.cdiv(num_rows, config.block_m) * triton.cdiv(out_features, config.block_n),)
        _matmul_kernel[grid](
            x2, weight, bias if bias is not None else out, out,
            num_rows, out_features, in_features,
            x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), out.stride(0),
            HAS_BIAS=bias is not None,
            IEEE=x.dtype == torch.float32,
            BLOCK_M=config.block_m,
            BLOCK_N=config.block_n,
            BLOCK_K=config.block_k,
            GROUP_M=8,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )  # fmt: skip
    return out.reshape(*leading, out_features)
