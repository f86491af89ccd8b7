"""This tree's native CPU kernels against another commit's, in one process, interleaved: on a VM whose speed
drifts by ±15-30% between runs, two builds compared in separate processes tell nothing; alternated in one,
they see the same machine.

    .venv/bin/python bench/native_ab.py --against REV [--gemms 16] [--rows 32] [--runs 6]

REV's kernel sources (git archive) are built as the engine builds its own (kernels/cpu_native.py), and
  --gemms N  times each linear layer of the default model at --rows rows of x (int12 activations; the LM head
             in Q8_0; a list gives a table each) N times per build, alternated ABBA, and checks the two give
             the same bits;
  --runs N   runs the default engine on 32 requests x 128 new tokens (greedy) N times per build, the builds
             swapped under the same engine, ABBA, and checks the tokens are the same.
Medians per build, and B/A per pair (A: REV, B: this tree).
"""

from __future__ import annotations

import argparse
import ctypes
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from cpu_kernels import SHAPES  # the default model's linear layers: (name, in_features, out_features)
from engine import prompts  # the prompts bench/engine.py times glassbox with
from glassbox import LLM, SamplingParams
from glassbox.kernels import cpu_native
from glassbox.layers.quantized_linear import QLinear

ROOT = Path(__file__).resolve().parent.parent
# What the engine folds into each layer's call (models/llama_native.py); the LM head is the GGUF's Q8_0
PROLOGUES = {"qkv": "rms_norm", "gate_up": "rms_norm", "down": "silu_mul", "lm_head": "rms_norm"}


def build(rev: str, into: Path) -> ctypes.CDLL:
    """REV's native library, built from its sources in `into` by its own cpu_native, loaded with this tree's
    signatures (the entry points compared here take the same arguments)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "glassbox"], check=True, capture_output=True).stdout
    tarfile.open(fileobj=io.BytesIO(archive)).extractall(into)
    code = f"import sys; sys.path.insert(0, {str(into)!r}); from glassbox.kernels import cpu_native; print(cpu_native.library()._name)"
    path = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=into).stdout.split()[-1]
    lib = ctypes.CDLL(path)
    for name, (argtypes, restype) in cpu_native.SIGNATURES.items():
        if hasattr(lib, name):
            getattr(lib, name).argtypes, getattr(lib, name).restype = argtypes, restype
    return lib


def use(lib: ctypes.CDLL) -> None:
    cpu_native.library = lambda isa=None: lib  # every kernel call looks the library up


def pairs(a: list[float], b: list[float]) -> str:
    return " ".join(f"{y / x:.3f}" for x, y in zip(a, b))


def gemms(libs: dict[str, ctypes.CDLL], rounds: int, rows: int) -> None:
    g = torch.Generator().manual_seed(0)
    cases = []
    for name, k, n in SHAPES:
        prologue, format = PROLOGUES.get(name), "q8_0" if name == "lm_head" else "q4_1"
        layer = QLinear(torch.randn(n, k, generator=g) * 0.05, None, format, "int12")
        x = torch.randn(rows, 2 * k if prologue == "silu_mul" else k, generator=g)
        cases.append((name, layer, x, n, prologue, torch.rand(k, generator=g) + 0.5 if prologue == "rms_norm" else None))
    times: dict[tuple[str, str], list[float]] = {}
    outs: dict[tuple[str, str], torch.Tensor] = {}
    for r in range(rounds):
        for which in "AB" if r % 2 == 0 else "BA":
            use(libs[which])
            for name, layer, x, n, prologue, norm in cases:
                calls = 2 if name == "lm_head" else 10
                start = time.perf_counter()
                for _ in range(calls):
                    y = cpu_native.qlinear(x, layer.qweight(), n, prologue=prologue, norm_weight=norm, eps=1e-5)
                times.setdefault((name, which), []).append((time.perf_counter() - start) / calls * 1e6)
                outs[(name, which)] = y
    print(f"\n| layer ({rows} rows, int12) | A µs | B µs | A / B | same bits |\n|---|---:|---:|---:|---|")
    for name, *_ in cases:
        a, b = (statistics.median(times[(name, w)]) for w in "AB")
        print(f"| {name} | {a:,.1f} | {b:,.1f} | {a / b:.3f}x | {torch.equal(outs[(name, 'A')], outs[(name, 'B')])} |")
    a, b = (sum(statistics.median(times[(name, w)]) * (1 if name == "lm_head" else 30) for name, *_ in cases) for w in "AB")
    print(f"| a step's GEMMs (30 layers and the head), ms | {a / 1e3:.2f} | {b / 1e3:.2f} | {a / b:.3f}x | |")


def runs(libs: dict[str, ctypes.CDLL], rounds: int) -> None:
    llm = LLM(kv_cache_memory=1 << 30, max_num_batched_tokens=4096)
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    llm.generate(prompts(32), params)  # (warm-up)
    tok_s: dict[str, list[float]] = {"A": [], "B": []}
    tokens: dict[str, list[list[int]]] = {}
    for r in range(rounds):
        for which in "AB" if r % 2 == 0 else "BA":
            use(libs[which])
            start = time.perf_counter()
            outputs = llm.generate(prompts(32), params)
            tok_s[which].append(sum(len(o.token_ids) for o in outputs) / (time.perf_counter() - start))
            tokens[which] = [o.token_ids for o in outputs]
    print(f"32 requests x 128 tokens: A {statistics.median(tok_s['A']):.1f}, B {statistics.median(tok_s['B']):.1f} "
          f"tok/s (medians of {rounds}); B / A per pair: {pairs(tok_s['A'], tok_s['B'])}; "
          f"same tokens: {tokens['A'] == tokens['B']}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--against", required=True, help="the commit to compare with (A)")
    parser.add_argument("--gemms", type=int, default=16, help="rounds of the layer timings (0: none)")
    parser.add_argument("--rows", default="32", help="rows of x for the layer timings, e.g. 1,8,32")
    parser.add_argument("--runs", type=int, default=6, help="rounds of whole runs (0: none)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        libs = {"A": build(args.against, Path(tmp)), "B": cpu_native.library()}
        print(f"A: {args.against}, B: this tree; ISA {cpu_native.isa()}, {torch.get_num_threads()} threads, "
              f"{time.strftime('%Y-%m-%d %H:%M')}")
        for rows in map(int, args.rows.split(",")) if args.gemms else ():
            gemms(libs, args.gemms, rows)
        if args.runs:
            runs(libs, args.runs)


if __name__ == "__main__":
    main()
