"""Where a decode step's time goes on the GPU: the whole engine step vs the CUDA-graph replay alone, and
the kernels one replay launches (torch.profiler). Random SmolLM2-135M-shaped weights.

    python bench/gpu_profile.py [--shape smollm2-135m] [--batches 1,128] [--no-compile]
    python bench/gpu_profile.py --nano [--decode-steps 300] [--kv-cache-dtype fp8]

--nano profiles nano-vllm's workload (bench/gpu.py) mid-way: all 256 requests in, N decode steps run, then
the wall time of engine steps, the kernels of a few steps by device time, and the KV bytes those steps read
against the attention kernel's time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu import (  # noqa: E402
    NANO_SHAPE, NANO_TEMPERATURE, SHAPES, GiB, kv_bytes, make_engine, nano_workload, random_model_folder,
)


def profile_prefill(engine, vocab: int) -> None:
    """One 128-token request to its first token (TTFT), with the CPU-side cost of each op."""
    from glassbox.sampling import SamplingParams

    def first_token() -> None:
        engine.add_request(torch.randint(0, vocab, (128,)).tolist(), SamplingParams(temperature=0, max_tokens=1))
        while engine.has_unfinished_requests():
            engine.step()
        torch.cuda.synchronize()

    for _ in range(3):
        first_token()
    t0 = time.perf_counter()
    first_token()
    print(f"prefill of 128 tokens to the first token: {(time.perf_counter() - t0) * 1000:.2f} ms")
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        first_token()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=18))


def profile_nano(decode_steps: int, kv_cache_dtype: str, profiled_steps: int = 5) -> None:
    """nano-vllm's workload after `decode_steps` decode steps: where a step's device time goes."""
    from glassbox.sampling import SamplingParams

    prompts, max_tokens = nano_workload()
    with tempfile.TemporaryDirectory() as tmp:
        folder = random_model_folder(NANO_SHAPE, Path(tmp))
        element_bytes = 1 if kv_cache_dtype == "fp8" else 2
        kv_memory = min(kv_bytes(NANO_SHAPE, len(prompts) * 2048, element_bytes), torch.cuda.mem_get_info()[0] - 8 * GiB)
        engine = make_engine(folder, kv_memory, False, kv_cache_dtype)
    for p, n in zip(prompts, max_tokens):
        engine.add_request(p, SamplingParams(temperature=NANO_TEMPERATURE, max_tokens=n, ignore_eos=True,
                                             output_kind="final_only"))
    while engine.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running):
        engine.step()
    for _ in range(decode_steps):
        engine.step()
    torch.cuda.synchronize()
    running = engine.scheduler.running
    cached = sum(s.num_computed_tokens for s in running)
    t0 = time.perf_counter()
    for _ in range(20):
        engine.step()
    torch.cuda.synchronize()
    print(f"nano after {decode_steps} decode steps: {len(running)} sequences, {cached / len(running):.0f} cached "
          f"tokens each; engine step {(time.perf_counter() - t0) / 20 * 1000:.2f} ms")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(profiled_steps):
            engine.step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    device_ms = sum(e.device_time_total for e in kernels) / 1000 / profiled_steps
    attention = [e for e in kernels if "_decode_kernel" in e.name]
    attention_ms = sum(e.device_time_total for e in attention) / 1000 / profiled_steps
    kv_gb = kv_bytes(NANO_SHAPE, sum(s.num_computed_tokens for s in running), element_bytes) / 1e9
    print(f"device time per step {device_ms:.2f} ms; decode attention {attention_ms:.2f} ms for ~{kv_gb:.1f} GB "
          f"of KV ({kv_gb / attention_ms * 1000:.0f} GB/s)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--batches", default="1,128")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--nano", action="store_true", help="profile nano-vllm's workload instead")
    parser.add_argument("--decode-steps", type=int, default=300)
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    args = parser.parse_args()
    if args.nano:
        return profile_nano(args.decode_steps, args.kv_cache_dtype)

    from glassbox.config import EngineConfig
    from glassbox.engine.llm_engine import LLMEngine
    from glassbox.models.loader import load_model
    from glassbox.sampling import SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_model(random_model_folder(args.shape, Path(tmp)), device="cuda")
    start = time.perf_counter()
    engine = LLMEngine(loaded, EngineConfig(kv_cache_memory=8 << 30, compile=not args.no_compile))
    print(f"{args.shape}: engine set-up (compile + graph capture) {time.perf_counter() - start:.1f} s")
    vocab = SHAPES[args.shape]["vocab_size"]
    profile_prefill(engine, vocab)
    for batch in [int(b) for b in args.batches.split(",")]:
        for i in range(batch):
            prompt = torch.randint(0, vocab, (128,)).tolist()
            engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
        waiting = engine.scheduler.waiting
        while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running + list(waiting)):
            engine.step()
        torch.cuda.synchronize()
        steps, t0 = 20, time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        step_ms = (time.perf_counter() - t0) / steps * 1000
        graphs = engine.runner.graphs
        size = graphs.buckets[[b >= batch for b in graphs.buckets].index(True)]
        t0 = time.perf_counter()
        for _ in range(steps):
            graphs.graphs[size].replay()
        torch.cuda.synchronize()
        replay_ms = (time.perf_counter() - t0) / steps * 1000
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            graphs.graphs[size].replay()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        print(f"batch {batch}: engine step {step_ms:.3f} ms, graph replay {replay_ms:.3f} ms, "
              f"{len(kernels)} kernels per replay")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                engine.step()
        print("CPU side of 10 engine steps:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        while engine.has_unfinished_requests():
            engine.step()


if __name__ == "__main__":
    main()
