"""The first request's time to first token, as `make serve` gives it: start `glassbox serve` (the defaults),
wait for /health, then send bench/engine.py's 14-token prompt streamed over a raw socket and time the first
token event; then ten more prompts the same way, and one request's server-side timings.

    .venv/bin/python bench/first_request.py [--starts 2] [--args "--quantization none"]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
import time

import httpx
from engine import PROMPT
from server import first_token_ms  # (a raw socket, as curl)


def one_start(port: int, extra: list[str]) -> tuple[float, float, list[float], dict]:
    command = [sys.executable, "-m", "glassbox.cli", "serve", "--port", str(port), *extra]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        begin = time.perf_counter()
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        ready = time.perf_counter() - begin
        first = first_token_ms(port, PROMPT + " 0")
        then = [first_token_ms(port, PROMPT + f" {i + 1}") for i in range(10)]
        body = {"prompt": PROMPT + " x", "max_tokens": 16, "temperature": 0}
        timings = httpx.post(f"http://127.0.0.1:{port}/generate", json=body, timeout=60).json()["timings"]
        return ready, first, then, timings
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--starts", type=int, default=2)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--args", default="", help="extra `glassbox serve` arguments")
    args = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, `glassbox serve {args.args}`, prompt {PROMPT!r} + a number\n")
    print("| start | ready (s) | first request TTFT (ms) | next 10: median (ms) | server-side prefill (ms) |")
    print("|---:|---:|---:|---:|---:|")
    for n in range(args.starts):
        ready, first, then, timings = one_start(args.port, shlex.split(args.args))
        print(f"| {n + 1} | {ready:.1f} | {first:.0f} | {statistics.median(then):.0f} | {timings['prefill_ms']:.0f} |")


if __name__ == "__main__":
    main()
