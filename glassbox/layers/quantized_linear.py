"""Block-quantized linear layers for the CPU, swapped in for `nn.Linear` from outside the model files (see
engine/optimize.py).

Weights are stored in GGUF's block formats, each block 32 inputs of one output row:
- "q4_1": w ≈ d·q + m, q in [0, 15], scale d and minimum m in float16 (0.625 bytes a weight);
- "q8_0": w ≈ d·q, q in [-127, 127], scale d in float16 (1.06 bytes a weight).
Quantizing a GGUF model's dequantized weights gives its blocks back, so a Q4_1 GGUF runs on the weights it
stores (tests/test_quantized_linear.py checks it on the default model).

The activations multiply them in one of four ways:
- "float32" (QLinear's default; the engine's "auto" takes "int12" where the native kernels run): each weight
  dequantized on the fly and multiplied in float32 — the model's own numerics, reading 4 or 8 bits a weight;
- "int8": activations quantized per block of 32 at run time, d = max|x| / 127 — llama.cpp's arithmetic:
  an exact integer dot product per block, scaled by d_w·d_x (and m_w·d_x·Σq_x for Q4_1). Faster at large
  batches; one scale per block keeps perplexity within 0.3% of float32's on the default model (one scale
  per row, as an earlier mode did, let a single outlier coarsen the whole row: +3.5%), but greedy text
  drifts from float32's after ~20 tokens;
- "int16": activations quantized per block of 32 to 65,279 levels, d = max|x| / 32639, each split into two
  int8 halves (256·hi + lo) whose exact integer products with the weights are combined per block,
  256·Σ q·hi + Σ q·lo, and scaled as int8's: integer products at twice int8's cost, and float32's greedy
  text on the default model (bench/activation_bits.py);
- "int12": the same with 4,079 levels, d = max|x| / 2039, and halves 16·hi + lo (lo in [-8, 7]): on AMX a
  Q4_1 block is one tile product of [hi | lo] with [16·q ; q] (16·q is still a byte), half int16's work
  there; perplexity as float32's, greedy text float32's for ~58 of 64 tokens (docs/benchmarks.md).
Every way a row's result depends on that row alone, so outputs are the same whatever else is in the batch.

Two kernels, same math: the native one (kernels/cpu/qlinear.c, one call per layer, weights packed for it)
where a compiler allows, else `QLinear.reference` — the readable path below, and the oracle the native
kernel is tested against.
"""

from __future__ import annotations

import torch
from torch import nn

from glassbox.kernels import cpu_native

BLOCK = 32
FORMATS = ("q4_1", "q8_0")
ACTIVATIONS = ("float32", "int8", "int16", "int12")
# The split activations: (levels each side, the hi half's weight) (kernels/cpu/qlinear.c)
SPLITS = {"int16": (32639, 256), "int12": (2039, 16)}


def supported(in_features: int) -> bool:
    return in_features % BLOCK == 0


def quantize_weight(weight: torch.Tensor, format: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """weight [N, K] float -> (q [N, K] int8, d [N, K / 32] float16, m [N, K / 32] float16 or None), as
    llama.cpp quantizes (q4_1: d = (max - min) / 15, m = min; q8_0: d = max|w| / 127), with q taken against
    the float16 scales that are stored."""
    n, k = weight.shape
    blocks = weight.detach().float().reshape(n, k // BLOCK, BLOCK)
    if format == "q4_1":
        low, high = blocks.amin(-1), blocks.amax(-1)
        d, m = ((high - low) / 15).half(), low.half()
        q = ((blocks - m.float()[..., None]) / d.float()[..., None]).nan_to_num_(0).round_().clamp_(0, 15)
        return q.to(torch.int8).reshape(n, k), d, m
    if format == "q8_0":
        d = (blocks.abs().amax(-1) / 127).half()
        q = (blocks / d.float()[..., None]).nan_to_num_(0).round_().clamp_(-127, 127)
        return q.to(torch.int8).reshape(n, k), d, None
    raise ValueError(f"unknown weight format {format!r}; choose one of {', '.join(FORMATS)}")


def dequantize_weight(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """The float32 weight [N, K] the blocks stand for."""
    n, k = q.shape
    w = q.float().reshape(n, k // BLOCK, BLOCK) * d.float()[..., None]
    if m is not None:
        w += m.float()[..., None]
    return w.reshape(n, k)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] float32 -> (q [M, K] float32 holding integers in [-127, 127], d [M, K / 32], Σq [M, K / 32]),
    the blocks the kernels multiply (d = max|x| / 127 per block, q = round-half-even(x / d))."""
    q, d = _round_blocks(x, 127)
    return q.reshape(x.shape), d, q.sum(-1)


def quantize_activations_split(x: torch.Tensor, activations: str) -> tuple[torch.Tensor, ...]:
    """x [M, K] float32 -> the "int16" or "int12" blocks as int8 halves: (hi [M, K], lo [M, K], d [M, K / 32],
    Σ(unit·hi + lo) [M, K / 32]), x ≈ d·(unit·hi + lo) per block with d = max|x| / levels (SPLITS), hi in
    [-127, 127], lo in [-unit / 2, unit / 2 - 1] (float32 tensors holding integers)."""
    levels, unit = SPLITS[activations]
    v, d = _round_blocks(x, levels)
    hi = torch.floor((v + unit // 2) / unit)
    lo = v - unit * hi
    return hi.reshape(x.shape), lo.reshape(x.shape), d, v.sum(-1)


def _round_blocks(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (round-half-even(x / d) [M, K / 32, 32], d [M, K / 32]) with d = max|x| / levels per block
    (the kernels' round_block)."""
    m, k = x.shape
    blocks = x.float().reshape(m, k // BLOCK, BLOCK)
    d = blocks.abs().amax(-1).clamp_min(1e-10) / levels
    return torch.round(blocks / d[..., None]), d


def pack(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, d, m) of quantize_weight -> (data, scales) in the kernels' layout (kernels/cpu/kernels.h): groups
    of `rows` output rows (padded with zero rows), per group and block of 32 inputs the rows interleaved
    4 inputs at a time, so that one vector load holds the same inputs of every row of the group."""
    n, k = q.shape
    pad = -n % rows
    q, d = nn.functional.pad(q, (0, 0, 0, pad)), nn.functional.pad(d, (0, 0, 0, pad))
    groups, blocks = (n + pad) // rows, k // BLOCK
    if m is None:  # q8_0: [groups, blocks, 8 steps, rows, 4]
        data = q.reshape(groups, rows, blocks, 8, 4).permute(0, 2, 3, 1, 4).contiguous().view(torch.uint8)
        scales = d.reshape(groups, rows, blocks).permute(0, 2, 1)
    else:  # q4_1: [groups, blocks, 4 chunks, rows, 4]; input 8j + 4h + t is chunk j, nibble h, byte t
        nibbles = q.to(torch.uint8).reshape(groups, rows, blocks, 4, 2, 4).permute(0, 2, 3, 1, 5, 4)
        data = (nibbles[..., 0] | (nibbles[..., 1] << 4)).contiguous()
        m = nn.functional.pad(m, (0, 0, 0, pad))
        scales = torch.stack([d, m]).reshape(2, groups, rows, blocks).permute(1, 3, 0, 2)
    return data, scales.contiguous()


def unpack(data: torch.Tensor, scales: torch.Tensor, format: str, rows: int, out_features: int) -> tuple:
    """pack's inverse: (data, scales) -> (q [N, K], d [N, K / 32], m or None)."""
    groups, blocks = scales.shape[0], scales.shape[1]
    if format == "q8_0":
        q = data.reshape(groups, blocks, 8, rows, 4).view(torch.int8).permute(0, 3, 1, 2, 4)
        d, m = scales.reshape(groups, blocks, rows).permute(0, 2, 1), None
    else:
        packed = data.reshape(groups, blocks, 4, rows, 4)
        q = torch.stack([packed & 0x0F, packed >> 4], -1).permute(0, 3, 1, 2, 5, 4).to(torch.int8)
        d, m = scales.reshape(groups, blocks, 2, rows).permute(2, 0, 3, 1)
        m = m.reshape(groups * rows, blocks)[:out_features]
    q = q.reshape(groups * rows, blocks * BLOCK)[:out_features]
    return q, d.reshape(groups * rows, blocks)[:out_features], m


class QLinear(nn.Module):
    """A linear layer over block-quantized weights (module docstring); in_features a multiple of 32."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        format: str,
        activations: str = "float32",
        native: bool | None = None,
        packed: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """weight: [out, in] float, quantized to `format` (by the native kernels where they run: one pass);
        packed: its (data, scales) where cpu_native.quantize already made them. native: None = wherever the
        kernels are available."""
        super().__init__()
        if activations not in ACTIVATIONS:
            raise ValueError(f"unknown activations {activations!r}; choose one of {', '.join(ACTIVATIONS)}")
        self.out_features, self.in_features = weight.shape
        self.format, self.activations = format, activations
        self.native = cpu_native.available() if native is None else native
        if self.native:
            data, scales = packed if packed is not None else cpu_native.quantize(weight, format)[:2]
            self.rows = cpu_native.rows()
            self.register_buffer("data", data)
            self.register_buffer("scales", scales)
        else:
            q, d, m = quantize_weight(weight, format)
            self.register_buffer("q", q)
            self.register_buffer("d", d)
            self.register_buffer("m", m)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
                f"activations={self.activations}")

    def dequantized(self) -> torch.Tensor:
        """The float32 weight [out, in] the blocks stand for (research calls that name a weight)."""
        if self.native:
            return dequantize_weight(*unpack(self.data, self.scales, self.format, self.rows, self.out_features))
        return dequantize_weight(self.q, self.d, self.m)

    def qweight(self) -> cpu_native.QWeight:
        """The native kernels' view of this layer's packed weight (read afresh: the tensors may move)."""
        return cpu_native.qweight(self.data, self.scales, self.bias, self.format, self.activations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = (x if x.dim() == 2 else x.reshape(-1, x.shape[-1])).float()
        y = cpu_native.qlinear(x2d, self.qweight(), self.out_features) if self.native else self.reference(x2d)
        y = y.to(x.dtype)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> [M, N] float32 in PyTorch ops: the kernels' math (to float32 rounding)."""
        q, d, m = self.q, self.d, self.m
        if self.activations == "float32":
            y = x.float() @ dequantize_weight(q, d, m).t()
        else:  # block by block: exact integer sums, then scaled
            q, d, m = q.float(), d.float(), None if m is None else m.float()
            if self.activations in SPLITS:
                hi, lo, dx, sum_x = quantize_activations_split(x, self.activations)
                unit = SPLITS[self.activations][1]
            else:
                qx, dx, sum_x = quantize_activations(x)
            y = torch.zeros(x.shape[0], self.out_features)
            for b in range(self.in_features // BLOCK):
                cols = slice(b * BLOCK, (b + 1) * BLOCK)
                if self.activations in SPLITS:  # each half's sum exact in float32; combined exactly, then rounded
                    isum = (unit * (hi[:, cols] @ q[:, cols].t()).double() + (lo[:, cols] @ q[:, cols].t())).float()
                else:
                    isum = qx[:, cols] @ q[:, cols].t()
                y += isum * (d[:, b] * dx[:, b, None])
                if m is not None:
                    y += m[:, b] * (sum_x[:, b, None] * dx[:, b, None])
        return y if self.bias is None else y + self.bias

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
        return cpu_native.qlinear(
            x, self.qweight(), self.out_features, residual, prologue,
            None if norm is None else norm.weight, 0.0 if norm is None else norm.eps,
        )  # fmt: skip
