"""glassbox on a GPU, random weights with real configs, beside transformers' `generate` baseline (run
../shared/bench/hf_gpu_baseline.py in the same device call).

    python bench/gpu.py [--shapes smollm2-135m,llama-1b,qwen3-0.6b] [--batches 1,32,128] [--eager] [--no-nano]
                        [--nano-kv-cache-dtypes auto,fp8]

bfloat16, prompts of 128 random tokens, 128 new tokens, greedy, EOS ignored. Per shape: TTFT (median of 5),
decode ms/token and output tokens/s per batch size, and the weight-read floor (weight bytes / copy bandwidth).
Then nano-vllm's throughput workload on the Qwen3-0.6B shape, sampled at temperature 0.6 as nano-vllm does,
with the bfloat16 KV cache and again with kv_cache_dtype="fp8". `--shapes ""` runs the nano workload alone.
Prints tables; writes JSON to $OUT/glassbox_gpu.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import tempfile
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

GiB = 1 << 30
# Same shapes as the baseline script (transformers' Llama classes), plus Qwen3-0.6B for nano-vllm's workload.
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True,
                     "max_position_embeddings": 8192},
    "llama-1b": {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": True,
                 "max_position_embeddings": 8192},
    # Llama-3-8B's shape: Quest's whole-step figure (bench/gpu_quest.py), where the paper measured it.
    "llama-8b": {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False,
                 "max_position_embeddings": 8192, "rope_theta": 500000.0},
    "qwen3-0.6b": {"vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": True,
                   "max_position_embeddings": 40960, "rope_theta": 1e6, "rms_norm_eps": 1e-6},
}
NANO_SHAPE = "qwen3-0.6b"
NANO_TEMPERATURE = 0.6  # nano-vllm's bench.py samples at 0.6 (on the device here, as greedy is)
NANO_KEYS = {"auto": "nano", "fp8": "nano_fp8"}  # glassbox_gpu.json keys of the nano runs per KV cache dtype
MAX_BATCHED_TOKENS = 16384  # nano-vllm's default


def random_model_folder(name: str, folder: Path) -> Path:
    """A Hugging Face folder with random weights and a word-level tokenizer (ids are all the bench uses)."""
    import transformers
    from tokenizers import Tokenizer, models

    shape = SHAPES[name]
    if name.startswith("qwen3"):
        config_class, model_class = transformers.Qwen3Config, transformers.Qwen3ForCausalLM
    else:
        config_class, model_class = transformers.LlamaConfig, transformers.LlamaForCausalLM
    torch.manual_seed(0)
    # Built in bf16 on the GPU: initialising a 1B model in fp32 on the CPU takes tens of seconds.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = model_class(config_class(**shape))
    finally:
        torch.set_default_dtype(default_dtype)
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    vocab = {f"t{i}": i for i in range(shape["vocab_size"])}
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(folder / "tokenizer.json"))
    return folder


def copy_bandwidth_gbps(num_bytes: int = GiB) -> float:
    """Device-to-device copy bandwidth, counting the read and the write (what a decode step's weight read is
    bounded by)."""
    source = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    torch.cuda.synchronize()
    start, repeats = time.perf_counter(), 10
    for _ in range(repeats):
        target.copy_(source)
    torch.cuda.synchronize()
    return 2 * num_bytes / ((time.perf_counter() - start) / repeats) / 1e9


def kv_bytes(name: str, tokens: int, element_bytes: int = 2) -> int:
    """KV pool bytes for `tokens` tokens: keys and values, every layer, bfloat16 (or 1-byte fp8)."""
    shape = SHAPES[name]
    head_dim = shape.get("head_dim", shape["hidden_size"] // shape["num_attention_heads"])
    return 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * head_dim * element_bytes * tokens


def make_engine(folder: Path, kv_memory: int, eager: bool, kv_cache_dtype: str = "auto") -> Any:
    from glassbox.config import EngineConfig
    from glassbox.engine.llm_engine import LLMEngine
    from glassbox.models.loader import load_model

    loaded = load_model(folder, dtype="bfloat16", device="cuda")
    config = EngineConfig(kv_cache_memory=kv_memory, max_num_batched_tokens=MAX_BATCHED_TOKENS, enforce_eager=eager,
                          kv_cache_dtype=kv_cache_dtype)
    return LLMEngine(loaded, config)


def generate(engine: Any, prompts: list[list[int]], max_tokens: list[int], temperature: float = 0.0
             ) -> tuple[float, list[Any]]:
    """Submit everything at once, step until done: (wall seconds, finished outputs in prompt order)."""
    from glassbox.sampling import SamplingParams

    ids = [engine.add_request(p, SamplingParams(temperature=temperature, max_tokens=n, ignore_eos=True,
                                                output_kind="final_only"))
           for p, n in zip(prompts, max_tokens)]
    torch.cuda.synchronize()
    start = time.perf_counter()
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    torch.cuda.synchronize()
    return time.perf_counter() - start, [finished[i] for i in ids]


def bench_shape(folder: Path, kv_memory: int, eager: bool, batches: list[int], prompt_len: int = 128,
                new_tokens: int = 128) -> dict[str, Any]:
    start = time.perf_counter()
    engine = make_engine(folder, kv_memory, eager)
    setup_s = time.perf_counter() - start
    vocab = engine.loaded.config.vocab_size
    generator = torch.Generator().manual_seed(0)

    def prompts(count: int) -> list[list[int]]:
        # Fresh prompts every run: a repeated one would hit the prefix cache and skip the prefill.
        return [torch.randint(0, vocab, (prompt_len,), generator=generator).tolist() for _ in range(count)]

    for batch in batches:  # warm-up: Triton compiles, CUDA graph captures for every batch size timed below
        generate(engine, prompts(batch), [8] * batch)
    ttfts = [generate(engine, prompts(1), [1])[1][0].timings["ttft_ms"] for _ in range(5)]
    weights = sum(p.numel() * p.element_size() for p in engine.loaded.model.parameters())
    result: dict[str, Any] = {"weights_MB": weights / 1e6, "ttft_ms": statistics.median(ttfts), "engine_setup_s": setup_s}
    for batch in batches:
        seconds, outs = generate(engine, prompts(batch), [new_tokens] * batch)
        result[f"bs{batch}"] = {
            "step_ms": outs[0].timings["decode_ms_per_token"],
            "tok_s": sum(len(o.token_ids) for o in outs) / seconds,
        }
    return result


def nano_workload(num_seqs: int = 256, max_input_len: int = 1024, max_output_len: int = 1024
                  ) -> tuple[list[list[int]], list[int]]:
    """nano-vllm bench.py's requests: the same draws in the same order after seed(0) (prompts, then output
    lengths), so the output total is its published 133,966 tokens."""
    rng = random.Random(0)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(100, max_input_len))] for _ in range(num_seqs)]
    return prompts, [rng.randint(100, max_output_len) for _ in range(num_seqs)]


def bench_nano(folder: Path, eager: bool, kv_cache_dtype: str = "auto") -> dict[str, Any]:
    prompts, max_tokens = nano_workload()
    # Room for every sequence at full length (prompt + output <= 2048: ~56 GiB in bfloat16), so nothing is
    # preempted; less only if an earlier engine's memory lingers (8 GiB left for weights, activations, graphs).
    element_bytes = 1 if kv_cache_dtype == "fp8" else 2
    kv_memory = min(kv_bytes(NANO_SHAPE, len(prompts) * 2048, element_bytes), torch.cuda.mem_get_info()[0] - 8 * GiB)
    engine = make_engine(folder, kv_memory, eager, kv_cache_dtype)
    # Warm-up (nano-vllm runs one short generate) with prompts of its own: the real ones would hit the prefix cache.
    generate(engine, [[1] * length for length in (1024, 512, 256, 100)], [8] * 4)
    steps = watch_steps(engine)
    seconds, outs = generate(engine, prompts, max_tokens, temperature=NANO_TEMPERATURE)
    tokens = sum(len(o.token_ids) for o in outs)
    return {"requests": len(prompts), "output_tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds,
            "kv_GiB": kv_memory / GiB, "preemptions": engine.scheduler.num_preemptions,
            "sampling": f"temperature {NANO_TEMPERATURE}", "kv_cache_dtype": kv_cache_dtype, "steps": steps}


def watch_steps(engine: Any) -> dict[str, float]:
    """Where the workload's time goes: steps that replayed a CUDA graph, eager (prefill) steps, and calls that
    only read a step launched before; the time the host waited for the device (the sampler's or a launched
    step's copy of the token ids); how many decode steps were launched before the host read the one before."""
    totals = {"graph_steps": 0, "graph_s": 0.0, "eager_steps": 0, "eager_s": 0.0, "read_steps": 0, "read_s": 0.0,
              "wait_s": 0.0, "overlapped": 0}
    runner, step, sample, launch = engine.runner, engine.step, engine.runner.sample, engine.runner.launch_decode
    execute, graph_run = runner.execute, runner.graphs.run if runner.graphs is not None else None
    ran = []

    def timed(fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            totals["wait_s"] += time.perf_counter() - start
            return result
        return call

    def noted(kind: str, fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            ran.append(kind)
            return fn(*args, **kwargs)
        return call

    def timed_step() -> list:
        ran.clear()
        start = time.perf_counter()
        outputs = step()
        kind = "graph" if "graph" in ran else "eager" if ran else "read"
        totals[f"{kind}_steps"] += 1
        totals[f"{kind}_s"] += time.perf_counter() - start
        return outputs

    def noted_launch(plan: Any, batch: Any, requests: list, input_ids: list | None = None, previous: Any = None) -> Any:
        totals["overlapped"] += previous is not None
        pending = launch(plan, batch, requests, input_ids, previous)
        pending.token_ids = timed(pending.token_ids)
        return pending

    engine.step, runner.sample, runner.launch_decode = timed_step, timed(sample), noted_launch
    runner.execute = noted("eager", execute)
    if graph_run is not None:
        runner.graphs.run = noted("graph", graph_run)
    return totals


def print_tables(out: dict[str, Any], shapes: list[str], batches: list[int]) -> None:
    print(f"\n{out['device']}; torch {out['torch']}, triton {out['triton']}; copy {out['copy_GBps']:.0f} GB/s; "
          f"{'eager' if out['eager'] else 'CUDA graphs'}")
    print("\n| shape | TTFT ms | " + " | ".join(f"batch {b}: step ms / tok/s" for b in batches)
          + " | weight-read floor ms/step |")
    print("|---" * (len(batches) + 3) + "|")
    for name in shapes:
        res = out[name]
        cells = [f"{res[f'bs{b}']['step_ms']:.2f} / {res[f'bs{b}']['tok_s']:,.0f}" for b in batches]
        print(f"| {name} | {res['ttft_ms']:.1f} | " + " | ".join(cells) + f" | {res['floor_step_ms']:.3f} |")
    runs = [out[key] for key in NANO_KEYS.values() if key in out]
    if runs:
        print(f"\n| nano-vllm workload (Qwen3-0.6B shape, {runs[0]['sampling']}) | KV cache | output tokens | time s | tok/s |\n"
              "|---|---|---|---|---|")
        for nano in runs:
            print(f"| {nano['requests']} seqs, in/out 100-1024 | {nano['kv_cache_dtype']} | {nano['output_tokens']:,} | "
                  f"{nano['seconds']:.2f} | {nano['tok_s']:,.0f} |")
        for nano in runs:
            print(f"nano steps ({nano['kv_cache_dtype']}):", json.dumps(nano["steps"]))


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--batches", default="1,32,128")
    parser.add_argument("--kv-gib", type=float, default=16, help="KV pool per shape (the nano run sizes its own)")
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs (EngineConfig.enforce_eager)")
    parser.add_argument("--nano", action=argparse.BooleanOptionalAction, default=True,
                        help="nano-vllm's 256-request throughput workload on the Qwen3-0.6B shape")
    parser.add_argument("--nano-kv-cache-dtypes", default="auto,fp8",
                        help="the nano-vllm workload once per KV cache dtype (EngineConfig.kv_cache_dtype)")
    args = parser.parse_args()
    shapes, batches = [s for s in args.shapes.split(",") if s], [int(b) for b in args.batches.split(",")]
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "triton": package_version("triton"), "eager": args.eager,
                           "copy_GBps": copy_bandwidth_gbps()}
    out_path = Path(os.environ.get("OUT", "/tmp")) / "glassbox_gpu.json"
    with tempfile.TemporaryDirectory() as tmp:
        for name in shapes:
            start = time.perf_counter()
            folder = random_model_folder(name, Path(tmp) / name)
            out[name] = bench_shape(folder, int(args.kv_gib * GiB), args.eager, batches)
            out[name]["floor_step_ms"] = out[name]["weights_MB"] / out["copy_GBps"]  # MB / (GB/s) = ms
            gc.collect()  # the engine is gone: give its weights, KV pool and graph pools back before the next
            torch.cuda.empty_cache()
            out_path.write_text(json.dumps(out, indent=1))  # kept so far, should a later shape fail
            print(f"{name}: done in {time.perf_counter() - start:.0f} s", flush=True)
        if args.nano:
            start, folder = time.perf_counter(), Path(tmp) / NANO_SHAPE
            folder = folder if folder.exists() else random_model_folder(NANO_SHAPE, folder)
            for kv_cache_dtype in args.nano_kv_cache_dtypes.split(","):
                out[NANO_KEYS[kv_cache_dtype]] = bench_nano(folder, args.eager, kv_cache_dtype)
                gc.collect()
                torch.cuda.empty_cache()
            print(f"nano-vllm workload: done in {time.perf_counter() - start:.0f} s", flush=True)
    out_path.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    print_tables(out, shapes, batches)


if __name__ == "__main__":
    main()
