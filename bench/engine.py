"""Engine speed on this machine, glassbox side by side with transformers, same model, same prompts, one run.

    .venv/bin/python bench/engine.py [--modes float32,int4,int8,int8:bfloat16] [--new-tokens 128] [--concurrency 1,8,32]
                                     [--temperature 0.7 --top-p 0.9]

A mode is the weights' quantization (float32: none), then optionally `:` and the KV cache's dtype
(kv_cache_dtype; default auto: bfloat16 beside the CPU default's int12 activations, else the model's float32).

Columns: TTFT of the 14-token prompt (median of 5), decode ms/token at batch 1 (128 new tokens), and
aggregate output tokens/s with N concurrent requests of 128 new tokens (ignore EOS): greedy, or sampled
with --temperature / --top-p (both systems). transformers runs `generate` on the same GGUF, float32; its N
requests are one left-padded batch.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

PROMPT = "The history of the Roman Empire is long and complicated. It began"
TOPICS = ["Roman Empire", "Ming dynasty", "printing press", "steam engine", "Silk Road", "French Revolution",
          "Internet", "Byzantine Empire"]


def prompts(n: int) -> list[str]:
    return [f"The history of the {TOPICS[i % len(TOPICS)]} is long and complicated. Chapter {i} begins" for i in range(n)]


def bench_glassbox(mode: str, new_tokens: int, concurrency: list[int], temperature: float, top_p: float,
                   kv_cache_dtype: str = "auto") -> dict[str, float]:
    from glassbox import LLM, SamplingParams

    quantization = None if mode == "float32" else mode
    llm = LLM(quantization=quantization, kv_cache_memory=1 << 30, max_num_batched_tokens=4096,
              kv_cache_dtype=kv_cache_dtype)
    first = SamplingParams(temperature=0, max_tokens=1)
    llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8))  # warm-up
    result = {"ttft_ms": statistics.median(llm.generate(PROMPT, first)[0].timings["ttft_ms"] for _ in range(5))}
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))[0]
    result["decode_ms"] = out.timings["decode_ms_per_token"]
    for n in concurrency:
        params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=new_tokens, ignore_eos=True)
        start = time.perf_counter()
        outs = llm.generate(prompts(n), params)
        result[f"tok_s_{n}"] = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)
    return result


def bench_transformers(new_tokens: int, concurrency: list[int], temperature: float, top_p: float) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    from glassbox.models.loader import default_model_path

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()

    def generate(texts: list[str], tokens: int, sampled: bool = False) -> tuple[float, int]:
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if sampled else {
            "do_sample": False}
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **batch, max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=tokenizer.pad_token_id, **sampling
            )
        return time.perf_counter() - start, (out.shape[1] - batch.input_ids.shape[1]) * len(texts)

    generate([PROMPT], 4)  # warm-up
    ttft = statistics.median(generate([PROMPT], 1)[0] for _ in range(5))
    total, _ = generate([PROMPT], new_tokens)
    result = {"ttft_ms": ttft * 1000, "decode_ms": (total - ttft) / (new_tokens - 1) * 1000}
    for n in concurrency:
        seconds, tokens = generate(prompts(n), new_tokens, sampled=temperature > 0)
        result[f"tok_s_{n}"] = tokens / seconds
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--modes", default="float32,int4,int8,int8:bfloat16")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--temperature", type=float, default=0.0, help="for the concurrent runs (0: greedy)")
    parser.add_argument("--top-p", type=float, default=1.0)
    args = parser.parse_args()
    sampling = (args.temperature, args.top_p)
    concurrency = [int(n) for n in args.concurrency.split(",")]

    rows = []
    for mode in args.modes.split(","):
        weights, _, kv_cache_dtype = mode.partition(":")
        name = f"glassbox {weights}" + (f", {kv_cache_dtype} KV cache" if kv_cache_dtype else "")
        rows.append((name, bench_glassbox(weights, args.new_tokens, concurrency, *sampling, kv_cache_dtype or "auto")))
    if not args.skip_transformers:
        rows.append(("transformers float32 generate", bench_transformers(args.new_tokens, concurrency, *sampling)))

    how = f"temperature {args.temperature}, top_p {args.top_p}" if args.temperature > 0 else "greedy"
    print(f"\nSmolLM2-135M-Instruct (Q4_1 GGUF), {args.new_tokens} new tokens, {how}; torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    header = "| system | TTFT (ms) | decode ms/token, batch 1 | " + " | ".join(f"tok/s, {n} concurrent" for n in concurrency) + " |"
    print(header)
    print("|" + "---|" * (3 + len(concurrency)))
    for name, r in rows:
        cells = [f"{r['ttft_ms']:.1f}", f"{r['decode_ms']:.1f}"] + [f"{r[f'tok_s_{n}']:.1f}" for n in concurrency]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
