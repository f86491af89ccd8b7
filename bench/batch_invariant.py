"""What the batch-invariant mode costs on a GPU (issue 21): the default engine beside
EngineConfig(batch_invariant=True), random weights, bfloat16, CUDA graphs.

    PYTHONPATH=$PWD python bench/batch_invariant.py [--shapes qwen3-0.6b,llama-1b] [--batches 1,128] [--no-nano]

Per shape and mode: decode ms/step and output tok/s at each batch size (prompts of 128 random tokens, 128
new tokens, greedy); after the Qwen3-0.6B shape's rows, nano-vllm's throughput workload (256 sequences,
temperature 0.6) in each mode after one short warm-up generate. Each batch run also checks the mode's
promise on its own outputs: the first sequence's tokens equal its tokens alone. Prints the tables row by
row; JSON to $OUT/batch_invariant.json (rewritten after each row).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from gpu import (
    MAX_BATCHED_TOKENS,
    NANO_SHAPE,
    NANO_TEMPERATURE,
    GiB,
    generate,
    kv_bytes,
    nano_workload,
    random_model_folder,
)

MODES = {"default": False, "batch_invariant": True}


def make_engine(folder: Path, batch_invariant: bool, kv_memory: int) -> Any:
    from glassbox.config import EngineConfig
    from glassbox.engine.llm_engine import LLMEngine
    from glassbox.models.loader import load_model

    loaded = load_model(folder, dtype="bfloat16", device="cuda")  # a fresh model: the mode converts its layers
    config = EngineConfig(kv_cache_memory=kv_memory, max_num_batched_tokens=MAX_BATCHED_TOKENS,
                          batch_invariant=batch_invariant)
    return LLMEngine(loaded, config)


def free(engine: Any) -> None:
    del engine
    gc.collect()
    torch.cuda.empty_cache()


def bench_batches(folder: Path, shape: str, batch_invariant: bool, batches: list[int]) -> dict[str, Any]:
    engine = make_engine(folder, batch_invariant, kv_bytes(shape, max(batches) * 256 + 4096))
    generator = torch.Generator().manual_seed(0)
    result = {}
    for batch in batches:
        prompts = [torch.randint(0, 10000, (128,), generator=generator).tolist() for _ in range(batch)]
        generate(engine, prompts, [8] * batch)  # warm-up at this size
        _, alone = generate(engine, prompts[:1], [128])
        seconds, outs = generate(engine, prompts, [128] * batch)
        result[batch] = {"step_ms": seconds / 128 * 1000, "tok_s": batch * 128 / seconds,
                         "first_equals_alone": outs[0].token_ids == alone[0].token_ids}
    free(engine)
    return result


def bench_nano(folder: Path, batch_invariant: bool) -> dict[str, Any]:
    prompts, max_tokens = nano_workload()
    kv_memory = min(kv_bytes(NANO_SHAPE, len(prompts) * 2048), torch.cuda.mem_get_info()[0] - 8 * GiB)
    engine = make_engine(folder, batch_invariant, kv_memory)
    generate(engine, [[1] * 100], [8])  # nano-vllm's warm-up: one short generate
    seconds, outs = generate(engine, prompts, max_tokens, temperature=NANO_TEMPERATURE)
    tokens = sum(len(o.token_ids) for o in outs)
    free(engine)
    return {"output_tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="qwen3-0.6b,llama-1b")
    parser.add_argument("--batches", default="1,128")
    parser.add_argument("--no-nano", action="store_true")
    args = parser.parse_args()
    shapes = [s for s in args.shapes.split(",") if s]
    batches = [int(b) for b in args.batches.split(",")]
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": {}}
    path = Path(os.environ.get("OUT", ".")) / "batch_invariant.json"
    print(f"{out['device']}; torch {out['torch']}; bfloat16, CUDA graphs; prompts of 128, 128 new tokens, greedy")
    print("\n| shape | mode | " + " | ".join(f"batch {b}: step ms / tok/s" for b in batches) + " | first == alone |")
    print("|---|---|" + "---|" * (len(batches) + 1), flush=True)
    with tempfile.TemporaryDirectory() as tmp:  # rows printed as they come: a run cut short keeps its rows
        for shape in shapes + ([NANO_SHAPE] if not args.no_nano and NANO_SHAPE not in shapes else []):
            folder = random_model_folder(shape, Path(tmp) / shape)
            for mode, invariant in MODES.items():
                if shape not in shapes:
                    continue
                rows = out["shapes"].setdefault(shape, {})[mode] = bench_batches(folder, shape, invariant, batches)
                cells = " | ".join(f"{rows[b]['step_ms']:.2f} / {rows[b]['tok_s']:,.0f}" for b in batches)
                same = all(r["first_equals_alone"] for r in rows.values())
                print(f"| {shape} | {mode} | {cells} | {same} |", flush=True)
                path.write_text(json.dumps(out, indent=1))
            if shape == NANO_SHAPE and not args.no_nano:
                print("\n| nano-vllm workload (256 seqs, Qwen3-0.6B, temperature 0.6) | tok/s | s |\n|---|---|---|")
                for mode, invariant in MODES.items():
                    row = out.setdefault("nano", {})[mode] = bench_nano(folder, invariant)
                    print(f"| {mode} | {row['tok_s']:,.0f} | {row['seconds']:.1f} |", flush=True)
                    path.write_text(json.dumps(out, indent=1))
                ratio = out["nano"]["batch_invariant"]["tok_s"] / out["nano"]["default"]["tok_s"]
                print(f"\nbatch_invariant / default throughput: {ratio:.2f}\n", flush=True)


if __name__ == "__main__":
    main()
