"""The decode attention kernel alone: time and effective bandwidth (KV bytes read / time) over batch sizes,
context lengths and launch settings, against the device's copy bandwidth.

    python bench/gpu_kernels.py
"""

from __future__ import annotations

import itertools

import torch

from glassbox.kernels.attention_triton import paged_decode_attention

SHAPES = {"smollm2 (9/3/64)": (9, 3, 64), "qwen3-0.6b (16/8/128)": (16, 8, 128)}
BLOCK = 16


def time_ms(fn, repeats: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def copy_bandwidth() -> float:
    """GB/s of a 1 GiB device-to-device copy (read + write)."""
    x = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.nbytes / time_ms(lambda: y.copy_(x), 10) / 1e6


def main() -> None:
    print(f"{torch.cuda.get_device_name()}: copy {copy_bandwidth():,.0f} GB/s")
    for name, (heads, kv_heads, dim) in SHAPES.items():
        for seqs, context in [(1, 256), (128, 256), (128, 1024), (256, 1024)]:
            blocks_per_seq = -(-context // BLOCK)
            num_blocks = seqs * blocks_per_seq
            k_cache = torch.randn(num_blocks, BLOCK, kv_heads, dim, dtype=torch.bfloat16, device="cuda")
            v_cache = torch.randn_like(k_cache)
            tables = torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(seqs, blocks_per_seq)
            lens = torch.full((seqs,), context, dtype=torch.int32, device="cuda")
            q = torch.randn(seqs, heads, dim, dtype=torch.bfloat16, device="cuda")
            kv_bytes = 2 * seqs * context * kv_heads * dim * 2
            results = []
            for block_n, warps, stages in itertools.product((32, 64, 128), (2, 4, 8), (None, 2, 4)):
                try:
                    ms = time_ms(lambda: paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.1, block_n=block_n,
                                                                num_warps=warps, num_stages=stages))
                except Exception as error:  # a setting the compiler rejects (registers, shared memory)
                    results.append((float("inf"), block_n, warps, stages, type(error).__name__))
                    continue
                results.append((ms, block_n, warps, stages, ""))
            results.sort()
            default = next(r for r in results if r[1:4] == (64, 4, None))
            best = results[0]
            print(f"{name} S={seqs} ctx={context}: default {default[0] * 1000:.1f} us "
                  f"({kv_bytes / default[0] / 1e6:,.0f} GB/s); best {best[0] * 1000:.1f} us "
                  f"({kv_bytes / best[0] / 1e6:,.0f} GB/s) block_n={best[1]} warps={best[2]} stages={best[3]}")


if __name__ == "__main__":
    main()
