"""Quest (block_sparse) on the GPU: the decode attention alone and whole decode steps, dense vs reading 1/8 of
the KV blocks, at long contexts.

    python bench/gpu_quest.py [--shapes smollm2-135m,llama-8b] [--contexts 1024,4096,8192] [--batches 1,32]
                              [--fraction 8] [--step-shapes smollm2-135m,llama-8b] [--step-context 8192]
                              [--step-batch 32] [--new-tokens 64]

Attention: a stack of 8 layers' bfloat16 paged caches (blocks of 16, shuffled; 8 distinct layers so that what
Quest reads does not stay in L2 between calls, as it does not in a real step) with random keys; per layer,
dense `paged_decode_attention` (storing the step's keys) vs the same with Quest's summaries and budgets (budget:
ceil(blocks / fraction); split launches run `quest_tables` first, unsplit ones choose in the decode kernel), ms
per layer: the 8 layers captured in a CUDA graph (as a decode step runs them), CUDA events over 20 replays;
its two parts apart: "choice" is `quest_tables` alone, "decode" the decode kernel (and its merge of splits) over
the tables `quest_tables` made (what split launches run after it; unsplit ones choose in the decode kernel).
Steps: the engine on random weights with the shape's config (bench/gpu.py), bfloat16: `--step-batch` prompts
of `--step-context` random tokens, then `--new-tokens` greedy tokens, dense (CUDA graphs) vs block_sparse with
the same budget (bench/kv_eviction.py's run: decode ms/step from the step after the last prompt's).
Prints two tables; writes $OUT/gpu_quest.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch
from gpu import SHAPES, random_model_folder
from gpu_kernels import time_ms
from kv_eviction import run

BLOCK = 16
LAYERS = 8


def attention_case(batch: int, context: int, heads: int, kv_heads: int, dim: int):
    """LAYERS caches of `batch` sequences of `context` tokens in shuffled blocks, their summaries, tables,
    lengths, next slots, and a decode step's q, k, v."""
    blocks = -(-context // BLOCK)
    num_blocks = batch * blocks + 1
    caches = []
    for _ in range(LAYERS):
        k = torch.randn(num_blocks, BLOCK, kv_heads, dim, dtype=torch.bfloat16, device="cuda")
        summaries = torch.stack([k.amin(1), k.amax(1)], 2)  # [num_blocks, KV, 2, D]: every slot is filled
        caches.append((k, torch.randn_like(k), summaries))
    ids = torch.randperm(num_blocks - 1, device="cuda")[: batch * blocks].view(batch, blocks).int()
    tables = torch.cat([ids, torch.zeros(batch, 8, dtype=torch.int32, device="cuda")], 1)  # a little spare width
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    last = context - 1
    slots = tables[:, last // BLOCK].long() * BLOCK + last % BLOCK
    q = torch.randn(batch, heads, dim, dtype=torch.bfloat16, device="cuda")
    k_new = torch.randn(batch, kv_heads, dim, dtype=torch.bfloat16, device="cuda")
    return caches, tables, lens, slots, q, k_new, torch.randn_like(k_new)


def bench_attention(shape: str, batch: int, context: int, fraction: int) -> dict:
    from glassbox.kernels.attention_triton import paged_decode_attention, quest_tables

    config = SHAPES[shape]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    dim = config.get("head_dim", config["hidden_size"] // heads)
    caches, tables, lens, slots, q, k_new, v_new = attention_case(batch, context, heads, kv_heads, dim)
    budget = math.ceil(-(-context // BLOCK) / fraction)
    budgets = torch.full((batch,), budget, dtype=torch.int32, device="cuda")
    scale = dim**-0.5

    def dense() -> None:
        for k, v, _ in caches:
            paged_decode_attention(q, k, v, tables, lens, scale, k_new=k_new, v_new=v_new, slot_mapping=slots)

    def quest() -> None:
        for k, v, summaries in caches:
            paged_decode_attention(q, k, v, tables, lens, scale, k_new=k_new, v_new=v_new, slot_mapping=slots,
                                   quest_summaries=summaries, quest_budgets=budgets)  # fmt: skip

    def select() -> None:
        for _, _, summaries in caches:
            quest_tables(q, summaries, tables, lens, budgets, BLOCK)

    chosen = [quest_tables(q, summaries, tables, lens, budgets, BLOCK) for _, _, summaries in caches]

    def decode() -> None:
        for (k, v, _), (quest_table, quest_lens) in zip(caches, chosen):
            paged_decode_attention(q, k, v, quest_table, quest_lens, scale, k_new=k_new, v_new=v_new,
                                   slot_mapping=slots)  # fmt: skip

    result = {"budget": budget}
    for name, fn in (("dense", dense), ("quest", quest), ("select", select), ("decode", decode)):
        fn()  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()  # replayed: GPU time, without the launches' host time
        with torch.cuda.graph(graph):
            fn()
        result[f"{name}_ms"] = time_ms(graph.replay, 20) / LAYERS
    result["speedup"] = result["dense_ms"] / result["quest_ms"]
    del caches
    torch.cuda.empty_cache()
    return result


def bench_steps(shape: str, batch: int, context: int, fraction: int, new_tokens: int) -> dict:
    from glassbox.config import EngineConfig
    from glassbox.engine.llm_engine import LLMEngine
    from glassbox.models.loader import load_model

    config = SHAPES[shape]
    folder = random_model_folder(shape, Path(tempfile.mkdtemp()))
    loaded = load_model(folder, dtype="bfloat16", device="cuda")
    dim = config.get("head_dim", config["hidden_size"] // config["num_attention_heads"])
    per_token = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * dim * 2
    kv_memory = int(per_token * batch * (context + new_tokens + 64) * 1.1)
    engine = LLMEngine(loaded, EngineConfig(kv_cache_memory=kv_memory, max_num_batched_tokens=16384, max_num_seqs=batch))
    budget = math.ceil(-(-context // BLOCK) / fraction)
    vocab = config["vocab_size"]
    out = {"budget": budget}
    for name, spec in (("dense", None), ("quest", {"method": "block_sparse", "block_size": BLOCK, "top_blocks": budget})):
        prompt = context - new_tokens - 8  # the decode steps run at ~context tokens
        # Warm up with the same run: compiles, and captures the graphs of every batch size the run goes
        # through (Quest's are captured as sizes first occur; early sequences finish before late ones).
        run(engine, spec, batch, prompt, new_tokens, vocab)
        engine.executor_counts.clear()
        out[name] = run(engine, spec, batch, prompt, new_tokens, vocab)
    out["speedup"] = out["dense"]["decode_ms_per_step"] / out["quest"]["decode_ms_per_step"]
    del engine, loaded
    torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="smollm2-135m,llama-8b")
    parser.add_argument("--contexts", default="1024,4096,8192")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--fraction", type=int, default=8)
    parser.add_argument("--step-shapes", default="smollm2-135m,llama-8b")
    parser.add_argument("--step-context", type=int, default=8192)
    parser.add_argument("--step-batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    results: dict = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "attention": {}, "steps": {}}
    print(f"{results['device']}, torch {torch.__version__}, {results['date']}; Quest reads 1/{args.fraction} of the blocks\n")
    print("| shape (H/KV/D) | batch | context | budget (blocks) | dense ms/layer | Quest ms/layer (choice, decode) "
          "| speedup |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for shape in filter(None, args.shapes.split(",")):
        c = SHAPES[shape]
        dims = f"{c['num_attention_heads']}/{c['num_key_value_heads']}/{c.get('head_dim', c['hidden_size'] // c['num_attention_heads'])}"
        for batch in (int(b) for b in args.batches.split(",")):
            for context in (int(n) for n in args.contexts.split(",")):
                r = bench_attention(shape, batch, context, args.fraction)
                results["attention"][f"{shape} x{batch} {context}"] = r
                print(f"| {shape} ({dims}) | {batch} | {context} | {r['budget']} | {r['dense_ms']:.4f} | "
                      f"{r['quest_ms']:.4f} ({r['select_ms']:.4f}, {r['decode_ms']:.4f}) | {r['speedup']:.2f}x |",
                      flush=True)
    print(f"\nWhole decode steps: {args.step_batch} sequences of {args.step_context} tokens, {args.new_tokens} new\n")
    print("| shape | dense ms/step (executors) | Quest ms/step (executors) | speedup |")
    print("|---|---:|---:|---:|")
    for shape in filter(None, args.step_shapes.split(",")):
        r = bench_steps(shape, args.step_batch, args.step_context, args.fraction, args.new_tokens)
        results["steps"][shape] = r
        d, s = r["dense"], r["quest"]
        print(f"| {shape} | {d['decode_ms_per_step']:.2f} ({d['executors']}) | {s['decode_ms_per_step']:.2f} "
              f"({s['executors']}) | {r['speedup']:.2f}x |", flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_quest.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
