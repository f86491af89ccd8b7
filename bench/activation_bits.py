"""How many bits per activation, in blocks of 32 with their own scale, keep the default model's float32 text:
every linear layer's input rounded to a grid of 2^(bits-1) - 1 steps of the block's max |x| (fake
quantization in PyTorch, GLASSBOX_NATIVE=0: what an integer kernel over such activations would compute),
against float32 activations — bench/quality.py's perplexity and 16 greedy continuations of 64 tokens.

    .venv/bin/python bench/activation_bits.py [--bits 16,12,10,8]

8 bits is llama.cpp's Q8 activations; 16 bits as two int8 halves (hi · 256 + lo) is what an integer GEMM
(vpdpbusd, vpmaddubsw, sdot, AMX TDPBUSD) can take at twice the int8 cost, with exact integer sums.
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(bits: int) -> None:
    """One run in this process: prints perplexity and the continuations as one line of Python literals."""
    os.environ["GLASSBOX_NATIVE"] = "0"  # the PyTorch layers, whose F.linear is wrapped below
    sys.path.insert(0, str(HERE))
    import torch
    import torch.nn.functional as F

    import quality

    linear = F.linear

    def rounded_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if bits and x.shape[-1] % 32 == 0:
            blocks = x.float().reshape(-1, x.shape[-1] // 32, 32)
            step = blocks.abs().amax(-1, keepdim=True).clamp_min(1e-30) / (2 ** (bits - 1) - 1)
            x = (torch.round(blocks / step) * step).reshape(x.shape).to(x.dtype)
        return linear(x, weight, bias)

    F.linear = rounded_linear
    text = (HERE / "data" / "pride_and_prejudice_ch1.txt").read_text()
    perplexity, outs, _ = quality.run(text, "float32", "auto", "none", "float32")
    print(repr((perplexity, outs)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bits", default="16,12,10,8")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        return child(args.child)
    runs = {}
    for bits in [0] + [int(b) for b in args.bits.split(",")]:  # each in a fresh process (F.linear is patched)
        out = subprocess.run([sys.executable, __file__, "--child", str(bits)], capture_output=True, text=True, check=True)
        runs[bits] = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    reference = runs[0][1]
    print("| activations (blocks of 32) | perplexity | greedy continuations equal to float32's | mean common prefix |")
    print("|---|---:|---:|---:|")
    for bits, (perplexity, outs) in runs.items():
        equal = sum(a == b for a, b in zip(outs, reference))
        prefix = sum(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(outs, reference))
        name = "float32" if bits == 0 else f"{bits} bits"
        print(f"| {name} | {perplexity:.4f} | {equal}/16 | {prefix / len(outs):.1f} of 64 |")


if __name__ == "__main__":
    main()
