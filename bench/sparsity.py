"""Quality impact of each sparse-attention method on a real text, and what it buys served: the tables of
docs/research.md.

    .venv/bin/python bench/sparsity.py [--text bench/data/pride_and_prejudice_ch1.txt] [--skip-quality]
                                       [--contexts 1024,4096,8192] [--decode-steps 8] [--speed-methods all|a,b]
                                       [--long-quality 8192]

Quality: teacher-forced on the default model (float32): perplexity dense and sparse, mean KL(dense ‖ sparse)
per position, top-1 agreement, realised density, and the mean and largest per-layer attention-output error —
the same numbers /optimization/evaluate returns, computed by the same function.
Speed and memory, per context length: the default served model (its CPU fast path) on the first tokens of
--speed-text (Genesis 37-50, KJV: 14,664 tokens) as the prompt, then --decode-steps tokens, dense and under each
method — decode ms/token, the decode attention's ms/step (its kernel replayed over the final cache; "-" where
decode takes the readable path) and KV blocks at the end: /optimization/evaluate's speed part
(research/decode_speed.py). Each method's budget scales with the context (1/8 of the blocks for Quest).
--long-quality N: the quality of the same settings teacher-forced on N tokens of --speed-text (past the
served 1,024-token limit of /optimization/evaluate: its [heads, N, N] scores, 2.4 GB a layer at 8k).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

SETTINGS = [
    {"method": "top_k", "k": 64},
    {"method": "top_k", "k": 16},
    {"method": "top_k", "k": 4},
    {"method": "top_k", "sparsity_ratio": 0.8},
    {"method": "top_k", "sparsity_ratio": 0.95},
    {"method": "threshold", "threshold": 0.01},
    {"method": "threshold", "threshold": 0.05},
    {"method": "sliding_window", "window": 128, "sink_tokens": 4},
    {"method": "sliding_window", "window": 32, "sink_tokens": 4},
    {"method": "sliding_window", "window": 32, "sink_tokens": 0},
    {"method": "block_sparse", "block_size": 16, "top_blocks": 8},
    {"method": "block_sparse", "block_size": 16, "top_blocks": 2},
    {"method": "h2o", "heavy_ratio": 0.1, "recent_ratio": 0.1},
    {"method": "h2o", "heavy_ratio": 0.05, "recent_ratio": 0.05},
]



def speed_settings(context: int) -> dict[str, dict]:
    """The methods at a context length, with budgets that scale with it."""
    return {
        "block_sparse 1/8": {"method": "block_sparse", "block_size": 16, "top_blocks": -(-context // 16) // 8},
        "block_sparse 1/8, dense_layers 2": {
            "method": "block_sparse", "block_size": 16, "top_blocks": -(-context // 16) // 8, "dense_layers": 2,
        },
        "sliding_window 512+4": {"method": "sliding_window", "window": 512, "sink_tokens": 4},
        "h2o 0.1+0.1": {"method": "h2o", "heavy_ratio": 0.1, "recent_ratio": 0.1},
        "top_k 64": {"method": "top_k", "k": 64},
    }


def speed_table(engine, ids: list[int], contexts: list[int], decode_steps: int, methods: str) -> None:
    from glassbox.layers.sparsity import parse_sparsity
    from glassbox.research.decode_speed import decode_speed

    print("\n| context | method | decode ms/token dense → sparse | attention ms/step dense → sparse | KV blocks at the end dense → sparse |")
    print("|---:|---|---:|---:|---:|")
    for context in contexts:
        for name, spec in speed_settings(context).items():
            if methods != "all" and name.split(" ")[0] not in methods.split(","):
                continue
            r = decode_speed(engine, ids[:context], parse_sparsity(spec), decode_steps)
            d, s = r["dense"], r["sparse"]
            attn = "-" if s["attention_ms_per_step"] is None else f"{d['attention_ms_per_step']:.2f} → {s['attention_ms_per_step']:.2f} ({r['speedup']['attention_ms_per_step']:.2f}x)"
            print(f"| {context} | {name} | {d['decode_ms_per_token']:.1f} → {s['decode_ms_per_token']:.1f} "
                  f"({r['speedup']['decode_ms_per_token']:.2f}x) | {attn} | {d['kv_blocks_at_end']} → {s['kv_blocks_at_end']} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--text", default=str(Path(__file__).parent / "data" / "pride_and_prejudice_ch1.txt"))
    parser.add_argument("--speed-text", default=str(Path(__file__).parent / "data" / "genesis_37_50_kjv.txt"))
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--contexts", default="1024,4096,8192", help="served speed table's contexts ('' to skip)")
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--speed-methods", default="all", help="all, or first words of the names: block_sparse,sliding_window")
    parser.add_argument("--long-quality", type=int, default=0, help="also teacher-forced quality on this many tokens of --speed-text")
    args = parser.parse_args()

    from glassbox.config import EngineConfig
    from glassbox.engine.llm_engine import LLMEngine
    from glassbox.models.loader import load_model

    engine = LLMEngine(load_model(None), EngineConfig(kv_cache_memory=64 << 20))
    if not args.skip_quality:
        quality_table(engine, args.text)
    if args.long_quality:
        long_quality_table(engine, args.speed_text, args.long_quality, args.speed_methods)
    if args.contexts:
        ids = engine.tokenizer.encode(Path(args.speed_text).read_text())
        print(f"\nServed, {Path(args.speed_text).name}; {platform.processor() or platform.machine()}, "
              f"{engine.config.quantization} weights; {time.strftime('%Y-%m-%d')}")
        speed_table(engine, ids, [int(c) for c in args.contexts.split(",")], args.decode_steps, args.speed_methods)


def long_quality_table(engine, text: str, tokens: int, methods: str) -> None:
    """Teacher-forced quality at a long context (past evaluate's served limit of 1,024 tokens a text), each
    method at its budget for that context."""
    from glassbox.layers.sparsity import parse_sparsity
    from glassbox.research.evaluate import evaluate

    ids = engine.tokenizer.encode(Path(text).read_text())[:tokens]
    print(f"\nTeacher-forced on the first {len(ids)} tokens of {Path(text).name}\n")
    print("| method | density | perplexity dense → sparse | KL(dense‖sparse) | top-1 agreement |")
    print("|---|---:|---:|---:|---:|")
    settings = {**speed_settings(tokens), "sliding_window 512, no sinks": {"method": "sliding_window", "window": 512, "sink_tokens": 0}}
    for name, spec in settings.items():
        if methods != "all" and name.split(" ")[0] not in methods.split(","):
            continue
        r = evaluate(engine, [ids], parse_sparsity(spec), max_tokens=tokens)
        print(f"| {name} | {r['density']:.3f} | {r['perplexity_dense']:.2f} → {r['perplexity_sparse']:.2f} | "
              f"{r['kl_dense_sparse']:.4f} | {r['top1_agreement']:.3f} |", flush=True)


def quality_table(engine, text: str) -> None:
    from glassbox.layers.sparsity import parse_sparsity
    from glassbox.research.evaluate import evaluate

    ids = engine.tokenizer.encode(Path(text).read_text())
    print(f"{Path(text).name}: {len(ids)} tokens; SmolLM2-135M-Instruct float32; {platform.machine()} CPU; "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| method | parameters | density | perplexity dense → sparse | KL(dense‖sparse) | top-1 agreement | attn-out error mean / max |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for spec in SETTINGS:
        r = evaluate(engine, [ids], parse_sparsity(spec))
        params = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "method")
        errors = r["attention_output_rel_error"]
        print(
            f"| {spec['method']} | {params} | {r['density']:.3f} | {r['perplexity_dense']:.2f} → {r['perplexity_sparse']:.2f} "
            f"| {r['kl_dense_sparse']:.4f} | {r['top1_agreement']:.3f} | {sum(errors) / len(errors):.3f} / {max(errors):.3f} |"
        )


if __name__ == "__main__":
    main()
