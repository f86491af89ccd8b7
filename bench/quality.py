"""What the fast modes cost in quality on the default model, against float32 weights and cache: narrower KV
caches (kv_cache_dtype "bfloat16", "fp8"), bfloat16 weights and cache, and the CPU's quantized weights
(quantization "auto" = the GGUF's own Q4_1 blocks, "int8" = Q8_0 blocks; with float32 activations or
activations quantized per block of 32 to int12, int16 or int8), alone and combined.

    .venv/bin/python bench/quality.py [--text bench/data/pride_and_prejudice_ch1.txt]

Teacher-forced perplexity of the text from prompt logprobs, prefilled in chunks of 64 tokens so that each
chunk reads the keys and values before it from the cache; then greedy continuations (64 tokens) of 16 prompts
cut from the text, against float32's: how many are identical, and the mean length of the common prefix.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

CHUNK = 64  # max_num_batched_tokens: the prefill chunk
NEW_TOKENS = 64
# (model dtype, kv_cache_dtype, quantization, activations); the first is the reference
CONFIGS = [
    ("float32", "auto", "none", "float32"),
    ("float32", "auto", "auto", "float32"),
    ("float32", "auto", "auto", "auto"),  # the CPU default: int12 activations beside a bfloat16 cache
    ("float32", "float32", "auto", "int12"),
    ("float32", "auto", "auto", "int16"),
    ("float32", "auto", "auto", "int8"),
    ("float32", "bfloat16", "auto", "float32"),
    ("float32", "auto", "int8", "float32"),
    ("float32", "auto", "int8", "int8"),
    ("float32", "bfloat16", "none", "float32"),
    ("float32", "fp8", "none", "float32"),
    ("bfloat16", "auto", "none", "float32"),
]


def run(text: str, dtype: str, kv_cache_dtype: str, quantization: str, activations: str
        ) -> tuple[float, list[list[int]], int]:
    """(perplexity, greedy continuations, text tokens)."""
    from glassbox import LLM, SamplingParams

    llm = LLM(dtype=dtype, kv_cache_dtype=kv_cache_dtype, quantization=quantization, activations=activations,
              max_num_batched_tokens=CHUNK, kv_cache_memory=256 << 20)
    ids = llm.tokenizer.encode(text)
    scored = llm.generate(ids, SamplingParams(max_tokens=1, prompt_logprobs=0))[0].prompt_logprobs
    logprobs = [entry[1] for entry in scored if entry is not None]
    step = len(ids) // 16
    prompts = [ids[i * step : i * step + 48] for i in range(16)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))
    return math.exp(-sum(logprobs) / len(logprobs)), [o.token_ids for o in outs], len(ids)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--text", default=str(Path(__file__).parent / "data" / "pride_and_prejudice_ch1.txt"))
    parser.add_argument("--configs", type=int, default=len(CONFIGS), help="run the first N configs only")
    args = parser.parse_args()

    text = Path(args.text).read_text()
    configs = CONFIGS[: args.configs]
    results = [run(text, *config) for config in configs]
    reference = results[0][1]
    print(f"{Path(args.text).name}: {results[0][2]} tokens; SmolLM2-135M-Instruct; {platform.machine()} CPU; "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| model dtype | quantization | activations | KV cache | perplexity | greedy continuations equal to float32's | "
          "mean common prefix |")
    print("|---|---|---|---|---:|---:|---:|")
    for (dtype, kv_cache_dtype, quantization, activations), (perplexity, continuations, _) in zip(configs, results):
        prefixes = [next((j for j, (a, b) in enumerate(zip(r, c)) if a != b), len(r))
                    for r, c in zip(reference, continuations)]  # fmt: skip
        print(f"| {dtype} | {quantization} | {activations} | {kv_cache_dtype} | {perplexity:.3f} | {sum(p == NEW_TOKENS for p in prefixes)}/16 | "
              f"{sum(prefixes) / 16:.1f} of {NEW_TOKENS} |")


if __name__ == "__main__":
    main()
