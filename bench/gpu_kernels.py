"""The decode attention kernel alone: time and effective bandwidth (KV bytes read / time) over batch sizes,
context lengths (equal, and spread as in nano-vllm's workload) and launch settings, against the device's copy
bandwidth; the default settings with and without storing the step's keys.

    python bench/gpu_kernels.py
"""

from __future__ import annotations

import itertools
import random

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


def case(seqs: int, lengths: list[int], kv_heads: int, dim: int) -> tuple[torch.Tensor, ...]:
    """A bfloat16 cache holding `lengths` tokens in shuffled blocks, tables as wide as the engine's for
    Qwen3's 40,960 positions, and each sequence's slot for its next token."""
    need = [-(-n // BLOCK) for n in lengths]
    k_cache = torch.randn(sum(need) + 1, BLOCK, kv_heads, dim, dtype=torch.bfloat16, device="cuda")
    v_cache = torch.randn_like(k_cache)
    ids = torch.randperm(k_cache.shape[0]).tolist()
    tables = torch.zeros(seqs, 40960 // BLOCK, dtype=torch.int32)
    for i, n in enumerate(need):
        tables[i, :n] = torch.tensor(ids[:n])
        ids = ids[n:]
    last = torch.tensor(lengths) - 1
    slots = tables.long().gather(1, (last // BLOCK)[:, None])[:, 0] * BLOCK + last % BLOCK
    lens = torch.tensor(lengths, dtype=torch.int32)
    return k_cache, v_cache, tables.cuda(), lens.cuda(), slots.cuda()


def main() -> None:
    print(f"{torch.cuda.get_device_name()}: copy {copy_bandwidth():,.0f} GB/s")
    rng = random.Random(0)
    for name, (heads, kv_heads, dim) in SHAPES.items():
        cases = {f"S={s} ctx={n}": [n] * s for s, n in [(1, 256), (128, 256), (128, 1024), (256, 1024)]}
        cases["S=256 ctx 100-2048 (nano-vllm's spread)"] = [rng.randint(100, 2048) for _ in range(256)]
        for label, lengths in cases.items():
            seqs = len(lengths)
            k_cache, v_cache, tables, lens, slots = case(seqs, lengths, kv_heads, dim)
            q = torch.randn(seqs, heads, dim, dtype=torch.bfloat16, device="cuda")
            new = torch.randn(seqs, 2, kv_heads, dim, dtype=torch.bfloat16, device="cuda")
            kv_bytes = 2 * sum(lengths) * kv_heads * dim * 2

            def run(**settings) -> float:
                return time_ms(lambda: paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.1, **settings))

            results = []
            for block_n, warps, stages in itertools.product((32, 64, 128), (2, 4, 8), (None, 2, 4)):
                try:
                    results.append((run(block_n=block_n, num_warps=warps, num_stages=stages), block_n, warps, stages))
                except Exception:  # a setting the compiler rejects (registers, shared memory)
                    continue
            best = min(results)
            default, stored = run(), run(k_new=new[:, 0], v_new=new[:, 1], slot_mapping=slots)
            print(f"{name} {label}: default {default * 1000:.1f} us ({kv_bytes / default / 1e6:,.0f} GB/s), "
                  f"storing the new keys {stored * 1000:.1f} us; best {best[0] * 1000:.1f} us "
                  f"({kv_bytes / best[0] / 1e6:,.0f} GB/s) block_n={best[1]} warps={best[2]} stages={best[3]}")

if __name__ == "__main__":
    main()
