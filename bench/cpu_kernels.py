"""glassbox's quantized CPU GEMM beside PyTorch's own CPU kernels for quantized weights, on the default
model's shapes: which one should a layer call on this machine?

    .venv/bin/python bench/cpu_kernels.py [--threads 2] [--rows 1,8,32]

Per shape and batch (rows of x): microseconds per call, median of 50 after a warm-up, for
- glassbox qlinear, Q4_1 and Q8_0 weights, float32 activations, int8 block activations, int16 ones (two
  int8 halves) and int12 ones (the default);
- torch `_weight_int4pack_mm_for_cpu` (4-bit groups of 32 with bfloat16 scale and zero, bfloat16
  activations: Q4_1's layout, rounded), torch `_weight_int8pack_mm` (int8 weights, one scale per row,
  float32 activations), and float32 `F.linear` (MKL).
The torch kernels cannot hold GGUF's blocks exactly (bfloat16 scales, or one scale per row), so they would
change the model; the table says what they would buy.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F

from glassbox.kernels import cpu_native

# (name, in_features, out_features) of SmolLM2-135M: fused q/k/v, o, fused gate/up, down, LM head
SHAPES = [("qkv", 576, 960), ("o", 576, 576), ("gate_up", 576, 3072), ("down", 1536, 576), ("lm_head", 576, 49152)]


def timed(fn, repeat: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def torch_int4(weight: torch.Tensor):
    n, k = weight.shape
    groups = weight.reshape(n, k // 32, 32)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp_min(1e-10)
    q = ((groups - low) / scale).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    scales_zeros = torch.cat([scale, low + 8 * scale], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), packed, 32, scales_zeros)


def torch_int8(weight: torch.Tensor):
    scale = weight.abs().amax(1) / 127
    q = (weight / scale[:, None]).round().to(torch.int8)
    return lambda x: torch._weight_int8pack_mm(x, q, scale)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="1,8,32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    print(f"{platform.processor() or platform.machine()}, ISA {cpu_native.isa()}, {args.threads} threads, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; µs per call (median of 50)\n")
    ways = ("f32", "int8", "int16", "int12")
    print("| shape | rows | " + " | ".join(f"{f} · {a}" for f in ("Q4_1", "Q8_0") for a in ways) + " | "
          "torch int4pack (bf16) | torch int8pack | float32 F.linear |")
    print("|---|---:|" + "---:|" * (2 * len(ways) + 3))
    g = torch.Generator().manual_seed(0)
    for name, k, n in SHAPES:
        weight = torch.randn(n, k, generator=g) * 0.05
        ours = {}
        for format in ("q4_1", "q8_0"):
            data, scales, _ = cpu_native.quantize(weight, format)
            for activations in ("float32", "int8", "int16", "int12"):
                ours[format, activations] = (cpu_native.qweight(data, scales, None, format, activations), data, scales)
        int4, int8 = torch_int4(weight), torch_int8(weight)
        column_major = weight.t().contiguous().t()
        for m in rows:
            x = torch.randn(m, k, generator=g)
            calls = [partial(cpu_native.qlinear, x, w[0], n) for w in ours.values()]
            calls += [partial(int4, x), partial(int8, x), partial(F.linear, x, column_major)]
            cells = [timed(call) for call in calls]
            print(f"| {name} [{k} -> {n}] | {m} | " + " | ".join(f"{c:,.0f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
