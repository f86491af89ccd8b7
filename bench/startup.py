"""Start-up time and peak memory: process start to model ready, glassbox cold (first GGUF conversion) and
warm (converted weights cached), side by side with transformers loading the same GGUF.

    .venv/bin/python bench/startup.py [--model PATH] [--repeat 3]

Each run is a fresh Python process; "ready" = weights, config and tokenizer loaded and one forward pass
over a prompt done (the model's own forward, without the engine's KV pool).
Peak RSS is the child's ru_maxrss.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

GLASSBOX = """
import sys, torch
from glassbox.layers.attention import AttentionMetadata
from glassbox.models.loader import load_model
loaded = load_model(sys.argv[1] or None, progress=False)
ids = loaded.tokenizer.encode("Hello")
with torch.inference_mode():
    loaded.model.compute_logits(loaded.model(torch.tensor(ids), torch.arange(len(ids)), AttentionMetadata.for_prompts([len(ids)])))
"""

TRANSFORMERS = """
import sys, os, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging
logging.disable_progress_bar()
path = sys.argv[1]
folder, name = os.path.dirname(path), os.path.basename(path)
tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
with torch.no_grad():
    model(**tokenizer("Hello", return_tensors="pt"))
"""


def run(code: str, model: str, env: dict[str, str]) -> tuple[float, float]:
    """(seconds from process start to exit after ready, peak RSS in MB)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, model], env=env, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"run failed: {proc.stderr.read().decode()[-2000:]}")
    return elapsed, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="", help="GGUF file (default: the embedded SmolLM2-135M)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()

    from glassbox.models.loader import default_model_path

    model = args.model or str(default_model_path())
    weights_mb = os.path.getsize(model) / 2**20
    rows = []
    cold, warm = [], []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "GLASSBOX_CACHE": cache}
            cold.append(run(GLASSBOX, args.model, env))
            warm.append(run(GLASSBOX, args.model, env))
    rows.append(("glassbox cold (converts GGUF)", cold))
    rows.append(("glassbox warm (cached safetensors)", warm))
    if not args.skip_transformers:
        rows.append(("transformers 5 (GGUF, float32)", [run(TRANSFORMERS, model, dict(os.environ))]))

    import torch
    from safetensors import safe_open  # noqa: F401  (same environment as the runs)

    print(f"model: {model} ({weights_mb:.0f} MB file), torch {torch.__version__}, {os.cpu_count()} CPUs")
    print(f"{'system':38} {'ready (s), median':>18} {'peak RSS (MB)':>14}  runs")
    for name, results in rows:
        seconds = statistics.median(r[0] for r in results)
        rss = max(r[1] for r in results)
        print(f"{name:38} {seconds:18.2f} {rss:14.0f}  {len(results)}")


if __name__ == "__main__":
    main()
