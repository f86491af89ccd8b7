"""glassbox on a GPU, random weights with real configs, beside transformers' `generate` baseline (run
../shared/bench/hf_gpu_baseline.py in the same device call).

    python bench/gpu.py [--shapes smollm2-135m,llama-1b] [--batches 1,32,128]

bfloat16, prompts of 128 random tokens, 128 new tokens (EOS ignored). Prints a table; writes JSON to
$OUT/glassbox_gpu.json. This is the engine's eager PyTorch path (no Triton kernels or CUDA graphs yet).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         max_position_embeddings=8192),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
                     max_position_embeddings=8192),
}


def random_model_folder(shape: dict, folder: Path) -> Path:
    """A Hugging Face folder with random weights and a word-level tokenizer (ids are all the bench uses)."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**shape)).to(torch.bfloat16).save_pretrained(folder)
    vocab = {f"t{i}": i for i in range(shape["vocab_size"])}
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(folder / "tokenizer.json"))
    return folder


def bench_shape(name: str, batches: list[int], new_tokens: int = 128, prompt_len: int = 128) -> dict:
    from glassbox.config import EngineConfig
    from glassbox.engine.llm_engine import LLMEngine
    from glassbox.models.loader import load_model
    from glassbox.sampling import SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_model(random_model_folder(SHAPES[name], Path(tmp)), dtype="bfloat16", device="cuda")
    engine = LLMEngine(loaded, EngineConfig(kv_cache_memory=8 << 30, max_num_batched_tokens=16384))
    vocab = SHAPES[name]["vocab_size"]
    generator = torch.Generator().manual_seed(0)
    result: dict = {"weights_MB": sum(p.numel() * p.element_size() for p in loaded.model.parameters()) / 1e6}

    def run(batch: int, tokens: int) -> tuple[float, list]:
        prompts = [torch.randint(0, vocab, (prompt_len,), generator=generator).tolist() for _ in range(batch)]
        params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        ids = [engine.add_request(p, params) for p in prompts]
        torch.cuda.synchronize()
        start = time.perf_counter()
        finished = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out
        torch.cuda.synchronize()
        return time.perf_counter() - start, [finished[i] for i in ids]

    run(2, 8)  # warm-up
    for batch in batches:
        seconds, outs = run(batch, new_tokens)
        timings = outs[0].timings
        result[f"bs{batch}"] = {
            "ttft_ms": timings["ttft_ms"],
            "step_ms": timings["decode_ms_per_token"],
            "tok_s": sum(len(o.token_ids) for o in outs) / seconds,
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="smollm2-135m,llama-1b")
    parser.add_argument("--batches", default="1,32,128")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "path": "eager PyTorch"}
    for name in args.shapes.split(","):
        out[name] = bench_shape(name, batches)
    print(json.dumps(out, indent=1))
    print(f"\n| shape | " + " | ".join(f"batch {b}: step ms / tok/s" for b in batches) + " |")
    for name in args.shapes.split(","):
        cells = [f"{out[name][f'bs{b}']['step_ms']:.2f} / {out[name][f'bs{b}']['tok_s']:.0f}" for b in batches]
        print(f"| {name} | " + " | ".join(cells) + " |")
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "glassbox_gpu.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
