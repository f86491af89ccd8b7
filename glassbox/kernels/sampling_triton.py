"""The sampler's draw in Triton: the GPU twin of `glassbox.sampling.draw`'s inverse CDF.

Per row of logits [N, vocab]: softmax(logits * scale) without writing it, then the first token whose
cumulative probability exceeds u x total. One program per row reads the row twice (once for the max and
sum, once for the cumulative sum, stopping at the drawn token), where the PyTorch path writes and reads
float32 copies of the whole batch for the cast, the temperature, the softmax and the scan: 0.8 ms for 256
rows of Qwen3's 151,936 logits on an H200, most of a sampled decode step's time outside attention.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096  # logits per step of each pass
NO_MAX = tl.constexpr(-1e30)  # running-max start: finite, so masked (-inf) logits give exp2(-inf) = 0, never NaN


@triton.jit
def _draw_kernel(
    logits_ptr,  # [N, vocab], any float dtype; -inf = filtered out
    scale_ptr,  # [N] float32: 1 / temperature
    u_ptr,  # [N] float32 in [0, 1)
    out_ptr,  # [N] int64
    vocab,
    stride_row,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride_row
    scale = tl.load(scale_ptr + row) * 1.4426950408889634  # log2 units
    cols = tl.arange(0, BLOCK)

    # Pass 1: per-lane running max and sum of exp2(x - max), merged at the end (an online softmax).
    lane_max = tl.full([BLOCK], NO_MAX, tl.float32)
    lane_sum = tl.zeros([BLOCK], tl.float32)
    for start in range(0, vocab, BLOCK):
        x = tl.load(base + start + cols, mask=start + cols < vocab, other=float("-inf")).to(tl.float32) * scale
        new_max = tl.maximum(lane_max, x)
        lane_sum = lane_sum * tl.exp2(lane_max - new_max) + tl.exp2(x - new_max)
        lane_max = new_max
    row_max = tl.max(lane_max, 0)
    target = tl.load(u_ptr + row) * tl.sum(lane_sum * tl.exp2(lane_max - row_max), 0)

    # Pass 2: cumulative probability block by block until it passes the target. Only a token of positive
    # probability can be drawn; if rounding leaves the whole row under the target, the last such token is.
    cumulative = tl.zeros([], tl.float32)
    drawn = tl.full([], -1, tl.int64)
    last_positive = tl.zeros([], tl.int64)
    start = 0
    while (drawn < 0) & (start < vocab):
        x = tl.load(base + start + cols, mask=start + cols < vocab, other=float("-inf")).to(tl.float32) * scale
        probs = tl.exp2(x - row_max)  # [BLOCK], unnormalised
        positive = probs > 0
        passed = (cumulative + tl.cumsum(probs, 0) > target) & positive
        first = tl.min(tl.where(passed, start + cols, vocab), 0)
        drawn = tl.where(first < vocab, first.to(tl.int64), drawn)
        last_positive = tl.maximum(last_positive, tl.max(tl.where(positive, start + cols, 0), 0).to(tl.int64))
        cumulative += tl.sum(probs, 0)
        start += BLOCK
    tl.store(out_ptr + row, tl.where(drawn >= 0, drawn, last_positive))


def draw(logits: torch.Tensor, scale: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """logits [N, vocab] (contiguous vocab axis; -inf entries are never drawn), scale [N] float32 (1 /
    temperature), u [N] float32 in [0, 1) -> [N] int64: per row, the first token whose cumulative
    probability under softmax(logits * scale) exceeds u x total."""
    num_rows, vocab = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("logits need a contiguous vocabulary axis")
    if scale.shape != (num_rows,) or u.shape != (num_rows,):
        raise ValueError(f"scale and u must be [{num_rows}], got {tuple(scale.shape)} and {tuple(u.shape)}")
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows:
        _draw_kernel[(num_rows,)](
            logits, scale.float().contiguous(), u.float().contiguous(), out, vocab, logits.stride(0),
            BLOCK=min(BLOCK, triton.next_power_of_2(vocab)), num_warps=8,
        )  # fmt: skip
    return out
