"""Serving under adversarial research calls: a /generate's time to first token, idle and while hostile
clients run the research API at its limits, with the server's RSS; one table.

    .venv/bin/python bench/adversarial.py [--probes 9] [--args "--quantization none"]

Hostile clients, each in a loop, all at once (research/limits.py's defaults are the maxima):
- profiling: start (cpu activities, record_shapes and with_stack), two short generates, stop (summary + trace);
- pipeline: embed -> final_norm -> lm_head over pipeline_max_tokens (512) tokens, handles kept;
- tensors: /parallel/tensor_split of a random tensor at tensor_max_elements, handles kept;
- schedule: /optimization/batch_schedule of 16 x 64-token requests (two policies' runs each).
The hostile clients run in their own process at --clients-nice (19: stand-ins for clients on other
machines, whose own HTTP work is not the server's; 0 to have them take this machine's cores too).
The probe: a streamed /generate ("Hello", 2 tokens), request sent to its first token event, median of
--probes, one at a time; -v prints the server's split of each (queue, prefill). RSS: /debug/memory_usage's
process_rss_mb, the largest seen.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import start_server, stop_server


async def ttft(http: httpx.AsyncClient) -> float:
    """ms from sending the request to its first token event (with -v: the server's own split of it)."""
    start, first, events = time.perf_counter(), None, []

    async def trace(name: str, info: dict) -> None:
        events.append(f"{name.removeprefix('http11.')} {(time.perf_counter() - start) * 1000:.0f}")

    body = {"prompt": "Hello", "max_tokens": 2, "stream": True}
    async with http.stream("POST", "/generate", json=body, extensions={"trace": trace}) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: ") and first is None:
                first = (time.perf_counter() - start) * 1000
            if VERBOSE and line.startswith("data: {") and '"result"' in line:
                timings = json.loads(line[6:])["result"]["timings"]
                print(f"  probe {first:.0f} ms: queue {timings['queue_ms']:.0f}, prefill {timings['prefill_ms']:.0f}; {', '.join(events)}")
    if first is None:
        raise RuntimeError("no token event")
    return first


async def profiling(http: httpx.AsyncClient) -> None:
    await http.post("/debug/profiling/start", json={"activities": ["cpu"], "record_shapes": True, "with_stack": True})
    for _ in range(2):
        await http.post("/generate", json={"prompt": "Profile me", "max_tokens": 8})
    await http.post("/debug/profiling/stop")


async def pipeline(http: httpx.AsyncClient) -> None:
    steps = [{"step": "embed"}, {"step": "final_norm"}, {"step": "lm_head"}]
    await http.post("/pipeline/schedule", json={"input_ids": [17] * 512, "steps": steps})


async def tensors(http: httpx.AsyncClient) -> None:
    await http.post("/parallel/tensor_split", json={"tensor_shape": [2048, 2048], "num_splits": 4})


async def schedule(http: httpx.AsyncClient) -> None:
    requests = [{"prompt": "Tell me a story", "max_tokens": 64}] * 16
    await http.post("/optimization/batch_schedule", json={"requests": requests, "max_batch_size": 16})


VERBOSE = "-v" in sys.argv
HOSTILE = {"profiling": profiling, "pipeline": pipeline, "tensors": tensors, "schedule": schedule}


async def hostile_loops(url: str, hostile: list[str], stop: Any, calls: Any) -> None:
    async def loop(index: int, name: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=600) as own:
            while not stop.is_set():
                began = time.perf_counter()
                await HOSTILE[name](own)
                calls[index] += 1
                if VERBOSE:
                    print(f"{name}: {time.perf_counter() - began:.2f} s", flush=True)

    await asyncio.gather(*(loop(i, name) for i, name in enumerate(hostile)))


def hostile_process(url: str, hostile: list[str], stop: Any, calls: Any, nice: int, verbose: bool) -> None:
    """The hostile clients, in their own process: stand-ins for clients on other machines (at `nice`, their
    own HTTP work does not take the server's cores; the server's research work does)."""
    global VERBOSE
    VERBOSE = verbose
    os.nice(nice)
    asyncio.run(hostile_loops(url, hostile, stop, calls))


async def measure(url: str, probes: int, hostile: list[str], nice: int) -> tuple[list[float], list[float], dict[str, int], float]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        await ttft(http)  # warm-up
        idle = [await ttft(http) for _ in range(probes)]
        context = multiprocessing.get_context("spawn")
        stop, calls, rss, done = context.Event(), context.Array("i", len(hostile)), [0.0], asyncio.Event()
        clients = context.Process(target=hostile_process, args=(url, hostile, stop, calls, nice, VERBOSE))
        clients.start()

        async def watch() -> None:
            while not done.is_set():
                memory = (await http.get("/debug/memory_usage")).json()
                rss[0] = max(rss[0], memory["process_rss_mb"])
                await asyncio.sleep(1.0)

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(5.0)  # every hostile loop under way
        busy = []
        for _ in range(probes):
            busy.append(await ttft(http))
            if VERBOSE:
                print(f"probe: {busy[-1]:.0f} ms", flush=True)
            await asyncio.sleep(0.5)
        stop.set()
        done.set()
        await asyncio.to_thread(clients.join)
        await watcher
        return idle, busy, dict(zip(hostile, calls[:])), rss[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--probes", type=int, default=9)
    parser.add_argument("--args", default="", help="extra `glassbox serve` arguments")
    parser.add_argument("--hostile", default=",".join(HOSTILE), help="which hostile clients run")
    parser.add_argument("--clients-nice", type=int, default=19, help="the hostile clients' process's nice value")
    parser.add_argument("-v", action="store_true", help="print each hostile call's time")
    args = parser.parse_args()
    proc, url = start_server(*shlex.split(args.args))
    try:
        idle, busy, calls, rss = asyncio.run(measure(url, args.probes, args.hostile.split(","), args.clients_nice))
    finally:
        stop_server(proc)
    ratio = statistics.median(busy) / statistics.median(idle)
    print(f"{time.strftime('%Y-%m-%d')}, `glassbox serve {args.args}`; TTFT in ms, median of {args.probes};"
          f" hostile clients at nice {args.clients_nice}\n")
    print("| TTFT idle | TTFT under research calls | ratio | max RSS (MB) | hostile calls made |")
    print("|---:|---:|---:|---:|---|")
    made = ", ".join(f"{name} {n}" for name, n in calls.items())
    print(f"| {statistics.median(idle):.0f} | {statistics.median(busy):.0f} | {ratio:.2f} | {rss:.0f} | {made} |")
    print(f"\nidle: {sorted(round(t) for t in idle)}\nbusy: {sorted(round(t) for t in busy)}")


if __name__ == "__main__":
    main()
