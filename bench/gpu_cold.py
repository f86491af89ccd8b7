"""nano-vllm's throughput workload measured the way nano-vllm measures it: a new process builds the engine,
runs one short warm-up generate, then times one generate of the 256 sequences (Qwen3-0.6B shape, random
weights, bfloat16). A second timed generate in the same process gives the warm figure beside it.

    python bench/gpu_cold.py [--kv-cache-dtype auto|fp8] [--folder DIR]

Prints start-up (engine built, warm-up included), the warm-up generate, the cold and the warm tok/s and
their ratio, and where the cold run's time went (bench/gpu.py's step accounting). Each run is its own
process: compile caches on disk (Inductor, Triton) stay warm from earlier runs, as they would for a server
restarted on the same machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from gpu import (
    MAX_BATCHED_TOKENS,
    NANO_SHAPE,
    NANO_TEMPERATURE,
    generate,
    kv_bytes,
    make_engine,
    nano_workload,
    random_model_folder,
    watch_steps,
)

GiB = 1 << 30


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--folder", type=Path, help="a saved random-weight folder of the shape (made if absent)")
    parser.add_argument("--warm-up", choices=["short", "budget", "chunked"], default="short",
                        help="short: nano-vllm's (one 100-token prompt); budget: also 16 x 1024-token prompts in one "
                             "step; chunked: also one prompt longer than the step budget (its prefill split in two)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or Path(tmp) / NANO_SHAPE
        if not (folder / "config.json").exists():
            random_model_folder(NANO_SHAPE, folder)
        prompts, max_tokens = nano_workload()
        element_bytes = 1 if args.kv_cache_dtype == "fp8" else 2
        kv_memory = min(kv_bytes(NANO_SHAPE, len(prompts) * 2048, element_bytes), torch.cuda.mem_get_info()[0] - 8 * GiB)
        start = time.perf_counter()
        engine = make_engine(folder, kv_memory, False, args.kv_cache_dtype)
        startup = time.perf_counter() - start
        start = time.perf_counter()
        generate(engine, [[1] * 100], [8])  # nano-vllm's warm-up: one short generate
        if args.warm_up == "budget":
            generate(engine, [[2 + i] * 1024 for i in range(16)], [2] * 16)
        if args.warm_up == "chunked":
            generate(engine, [[2] * (MAX_BATCHED_TOKENS + 512)], [2])
        warm_up = time.perf_counter() - start
        steps = watch_steps(engine)
        slow, step = [], engine.step

        def timed_step() -> list:  # the steps over 30 ms (prefills), in order
            begin = time.perf_counter()
            outputs = step()
            if (elapsed := time.perf_counter() - begin) > 0.03:
                plan = engine.last_plan
                slow.append([round(elapsed * 1000), plan and plan.executor, plan and plan.reason, len(engine.scheduler.running)])
            return outputs

        engine.step = timed_step
        cold_s, outs = generate(engine, prompts, max_tokens, temperature=NANO_TEMPERATURE)
        tokens = sum(len(o.token_ids) for o in outs)
        cold_steps, cold_slow, slow[:] = dict(steps), list(slow), []
        # (the same requests, shifted ids: no prefix cache hits)
        warm_s, outs = generate(engine, [[t + 1 for t in p] for p in prompts], max_tokens, temperature=NANO_TEMPERATURE)
        warm_tokens = sum(len(o.token_ids) for o in outs)
    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "kv_cache_dtype": args.kv_cache_dtype,
        "max_num_batched_tokens": MAX_BATCHED_TOKENS, "startup_s": startup, "warm_up_generate_s": warm_up,
        "cold_tok_s": tokens / cold_s, "warm_tok_s": warm_tokens / warm_s, "cold_over_warm": (tokens / cold_s) / (warm_tokens / warm_s),
        "cold_steps": cold_steps, "cold_slow_steps_ms": cold_slow, "warm_slow_steps_ms": slow, "warm_up": args.warm_up, "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    print(json.dumps(result, indent=1))
    print("\n| KV cache | start-up s | warm-up generate s | cold tok/s | warm tok/s (same process) | cold / warm |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| {args.kv_cache_dtype} | {startup:.1f} | {warm_up:.2f} | {result['cold_tok_s']:.0f} | "
          f"{result['warm_tok_s']:.0f} | {result['cold_over_warm']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
