"""The native CPU decode attention at long context: dense against Quest (block-sparse decode: each
token's kv head reads its last block and the blocks of highest bound, kernels/cpu/paged_attention.c), one
layer of the default model's shape (9 query heads, 3 kv heads, head_dim 64, blocks of 16), float32 cache.

    .venv/bin/python bench/cpu_attention.py [--contexts 1024,4096,8192] [--batch 1,32] [--fraction 8]

Per context and batch: ms per decode step of one layer (median of 20 after warm-ups; the step includes
rotary, the k/v store and, for Quest, keeping the block summaries), dense vs Quest with 1/--fraction of
the blocks, and the speed-up. Every sequence of the batch has the full context.
"""

from __future__ import annotations

import argparse

import torch
from cpu_kernels import timed  # median microseconds of a call, after warm-ups

from glassbox.kernels import cpu_native

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16


def decode_step(context: int, batch: int, g: torch.Generator):
    blocks = -(-context // BLOCK)
    k_cache = torch.randn(batch * blocks + 1, BLOCK, KV_HEADS, HEAD_DIM, generator=g)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(batch * blocks, generator=g).to(torch.int32).view(batch, blocks)
    position = context - 1
    slots = torch.tensor([int(tables[s, position // BLOCK]) * BLOCK + position % BLOCK for s in range(batch)])
    qkv = torch.randn(batch, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=g)
    angle = torch.rand(batch, HEAD_DIM, generator=g)
    starts = torch.arange(batch + 1, dtype=torch.int32)
    lens = torch.full((batch,), context, dtype=torch.int32)
    args = (qkv, angle.cos(), angle.sin(), k_cache, v_cache, slots, starts, tables, lens, HEADS, HEAD_DIM**-0.5, None)
    summaries = torch.empty(k_cache.shape[0], KV_HEADS, 2, HEAD_DIM)
    summaries[..., 0, :], summaries[..., 1, :] = k_cache.amin(1), k_cache.amax(1)  # as the kernel keeps them
    return args, summaries, blocks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--contexts", default="1024,4096,8192")
    parser.add_argument("--batch", default="1,32")
    parser.add_argument("--fraction", type=int, default=8, help="Quest reads 1/fraction of the blocks")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    print(f"{cpu_native.isa()} kernels, {torch.get_num_threads()} threads; ms per decode step of one layer\n")
    print(f"| context | batch | dense (ms) | Quest 1/{args.fraction} (ms) | speed-up |")
    print("|---:|---:|---:|---:|---:|")
    for context in map(int, args.contexts.split(",")):
        for batch in map(int, args.batch.split(",")):
            step, summaries, blocks = decode_step(context, batch, g)
            top = max(1, blocks // args.fraction)
            dense = timed(lambda: cpu_native.paged_attention(*step), 20) / 1000
            quest = timed(lambda: cpu_native.paged_attention(*step, None, summaries, top), 20) / 1000
            print(f"| {context} | {batch} | {dense:.3f} | {quest:.3f} | {dense / quest:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
