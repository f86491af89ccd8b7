"""Soak: N concurrent streams for M minutes against `glassbox serve`; errors, RSS growth, KV blocks returned.

    .venv/bin/python bench/soak.py [--streams 64] [--minutes 10] [--max-tokens 64] [--adversarial]

Starts the server (default model, CPU), warms up for one minute's tenth, then keeps N streams busy: each
sends a prompt, reads its server-sent events to [DONE], and starts the next. Prints one table: requests,
errors (any non-200, any stream without [DONE] or with an error event), tokens/s, the server's RSS after
warm-up and at the end (growth in %), its peak, and the KV blocks in use once the streams have stopped.
With --adversarial, one more client loops over the research calls at their budgets (profiling sessions,
max tensor splits and pipelines, a max batch_schedule) the whole time, and /generate's time to first
token is sampled alone before and during it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def start_server(extra: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "glassbox.cli", "serve", "--port", str(port), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


class Tally:
    def __init__(self) -> None:
        self.requests = self.errors = self.tokens = 0
        self.error_samples: list[str] = []

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(what)


async def one_stream(http: httpx.AsyncClient, index: int, max_tokens: int, tally: Tally) -> None:
    body = {"prompt": f"Story {index}: once upon a time in the city number {index},", "max_tokens": max_tokens, "stream": True}
    events = []
    try:
        async with http.stream("POST", "/generate", json=body) as response:
            if response.status_code != 200:
                tally.error(f"status {response.status_code}: {(await response.aread())[:200]!r}")
                return
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
    except httpx.HTTPError as error:
        tally.error(f"{type(error).__name__}: {error}")
        return
    tally.requests += 1
    if not events or events[-1] != "[DONE]" or any('"error"' in e[:10] for e in events[:-1]):
        tally.error(f"stream ended badly: {events[-2:]}")
        return
    tally.tokens += sum(len(json.loads(e)["token_ids"]) for e in events[:-1])


async def ttft(http: httpx.AsyncClient) -> float:
    start = time.perf_counter()
    async with http.stream("POST", "/generate", json={"prompt": "Hello", "max_tokens": 2, "stream": True}) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                break
    return time.perf_counter() - start


async def hostile(http: httpx.AsyncClient, stop: asyncio.Event, tally: Tally) -> None:
    """The research calls at their budgets, in a loop."""
    calls = [
        ("/debug/profiling/start", {"activities": ["cpu"], "record_shapes": True, "with_stack": True}),
        ("/parallel/tensor_split", {"tensor_shape": [2048, 2048], "num_splits": 4}),
        ("/pipeline/schedule", {"input_ids": [1] * 512, "steps": [{"step": "embed"}, {"step": "lm_head"}]}),
        ("/optimization/batch_schedule", {"requests": [{"prompt": "Tell me a story", "max_tokens": 64}] * 16, "max_batch_size": 16}),
        ("/debug/profiling/stop", None),
    ]
    while not stop.is_set():
        for path, body in calls:
            response = await http.post(path, json=body) if body is not None else await http.post(path)
            if response.status_code >= 500:
                tally.error(f"{path}: {response.status_code}")


async def soak(url: str, pid: int, streams: int, seconds: float, max_tokens: int, adversarial: bool) -> dict:
    tally, hostile_tally = Tally(), Tally()
    limits = httpx.Limits(max_connections=streams + 8, max_keepalive_connections=streams + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        idle_ttft = statistics.median([await ttft(http) for _ in range(7)])
        stop = asyncio.Event()

        async def worker(index: int) -> None:
            n = 0
            while not stop.is_set():
                await one_stream(http, index * 100000 + n, max_tokens, tally)
                n += 1

        workers = [asyncio.create_task(worker(i)) for i in range(streams)]
        extra = [asyncio.create_task(hostile(http, stop, hostile_tally))] if adversarial else []
        await asyncio.sleep(min(60.0, seconds / 10))  # warm-up: allocator and caches settle
        rss_start, tokens_start, start = rss_mb(pid), tally.tokens, time.perf_counter()
        busy_ttft, peak = [], rss_start
        while time.perf_counter() - start < seconds:
            await asyncio.sleep(5)
            peak = max(peak, rss_mb(pid))
            if adversarial:
                busy_ttft.append(await ttft(http))
        elapsed = time.perf_counter() - start
        rss_end = rss_mb(pid)
        stop.set()
        await asyncio.gather(*workers, *extra)
        await asyncio.sleep(1)
        blocks = (await http.get("/cache/stats")).json()["blocks"]
    return {
        "streams": streams,
        "seconds": round(elapsed),
        "requests": tally.requests,
        "errors": tally.errors + hostile_tally.errors,
        "error_samples": tally.error_samples + hostile_tally.error_samples,
        "tokens_per_s": round((tally.tokens - tokens_start) / elapsed, 1),
        "rss_after_warmup_mb": round(rss_start),
        "rss_end_mb": round(rss_end),
        "rss_growth_pct": round((rss_end - rss_start) / rss_start * 100, 2),
        "rss_peak_mb": round(peak),
        "kv_blocks_in_use_after": blocks["in_use"],
        "kv_blocks_total": blocks["total"],
        "ttft_idle_ms": round(idle_ttft * 1000, 1),
        "ttft_busy_median_ms": round(statistics.median(busy_ttft) * 1000, 1) if busy_ttft else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--adversarial", action="store_true", help="research calls at their budgets meanwhile")
    parser.add_argument("--url", default=None, help="soak a running server instead (RSS then read from --pid)")
    parser.add_argument("--pid", type=int, default=None)
    args = parser.parse_args()
    proc = None
    if args.url is None:
        proc, url = start_server([])
        pid = proc.pid
    else:
        url, pid = args.url, args.pid or os.getpid()
    try:
        result = asyncio.run(soak(url, pid, args.streams, args.minutes * 60, args.max_tokens, args.adversarial))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
