"""Quality impact of each sparse-attention method on a real text: the table of docs/research.md.

    .venv/bin/python bench/sparsity.py [--text bench/data/pride_and_prejudice_ch1.txt]

Teacher-forced on the default model (float32): perplexity dense and sparse, mean KL(dense ‖ sparse) per
position, top-1 agreement, realised density, and the mean and largest per-layer attention-output error —
the same numbers /optimization/evaluate returns, computed by the same function.
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--text", default=str(Path(__file__).parent / "data" / "pride_and_prejudice_ch1.txt"))
    args = parser.parse_args()

    from glassbox.config import EngineConfig
    from glassbox.engine.llm_engine import LLMEngine
    from glassbox.layers.sparsity import parse_sparsity
    from glassbox.models.loader import load_model
    from glassbox.research.evaluate import evaluate

    engine = LLMEngine(load_model(None), EngineConfig(kv_cache_memory=64 << 20))
    ids = engine.tokenizer.encode(Path(args.text).read_text())
    print(f"{Path(args.text).name}: {len(ids)} tokens; SmolLM2-135M-Instruct float32; {platform.machine()} CPU; "
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
