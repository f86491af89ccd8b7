"""Serving under adversarial research calls: a /generate's time to first token, idle and while hostile
clients run the research API at its limits, with the server's RSS; one table.

    .venv/bin/python bench/adversarial.py [--probes 9] [--rounds 5] [--args "--quantization none"]

Hostile clients, each in a loop, all at once (research/limits.py's defaults are the maxima):
- profiling: start (cpu activities, record_shapes and with_stack), two short generates, stop (summary + trace);
- pipeline: embed -> final_norm -> lm_head over pipeline_max_tokens (512) tokens, handles kept;
- tensors: /parallel/tensor_split of a random tensor at tensor_max_elements, handles kept;
- schedule: /optimization/batch_schedule of 16 x 64-token requests (two policies' runs each).
The hostile clients run in their own process at --clients-nice (19: stand-ins for clients on other
machines, whose own HTTP work is not the server's; 0 to have them take this machine's cores too).
The probe: a streamed /generate ("Hello", 2 tokens), request sent to its first token event, one at a time,
0.5 s apart; -v prints the server's split of each (queue, prefill). Idle and busy probes alternate in
--rounds rounds (idle probes, hostile clients resumed, busy probes, clients paused and their calls drained),
so both medians are taken over the same stretch of time: this machine's speed moves from second to second (a
fixed single-threaded matmul loop timed every 0.3 s for a minute: 63-147 ms, median 76) and idle medians
drift 15-24 ms from run to run; phases measured a minute apart compared one speed with another. The
warm-up probes and the clients' process start come first, outside both. RSS: /debug/memory_usage's
process_rss_mb, the largest seen.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
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


async def hostile_loops(url: str, hostile: list[str], go: Any, stop: Any, calls: Any, in_flight: Any) -> None:
    async def loop(index: int, name: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=600) as own:
            while not stop.is_set():
                in_flight[index] = 1  # (before reading `go`: a pause then sees this call, or it sees the pause)
                if not go.is_set():  # paused: the bench takes idle probes
                    in_flight[index] = 0
                    await asyncio.sleep(0.05)
                    continue
                began = time.perf_counter()
                try:
                    await HOSTILE[name](own)
                finally:
                    in_flight[index] = 0
                calls[index] += 1
                if VERBOSE:
                    print(f"{name}: {time.perf_counter() - began:.2f} s", flush=True)

    await asyncio.gather(*(loop(i, name) for i, name in enumerate(hostile)))


def hostile_process(
    url: str, hostile: list[str], ready: Any, go: Any, stop: Any, calls: Any, in_flight: Any, nice: int, verbose: bool
) -> None:
    """The hostile clients, in their own process: stand-ins for clients on other machines (at `nice`, their
    own HTTP work does not take the server's cores; the server's research work does). They call while `go`
    is set, and finish the call in progress when it is cleared."""
    global VERBOSE
    VERBOSE = verbose
    os.nice(nice)
    ready.set()  # (its imports, seconds of CPU, are behind it: the idle probes do not share the cores with them)
    asyncio.run(hostile_loops(url, hostile, go, stop, calls, in_flight))


# Seconds for the hostile loops to be under way after a resume: the first round's covers one-time set-ups, the
# others' are drawn from WARM_UP_S (a seeded draw: the busy probes meet the hostile calls at varied points of
# their cycles, not always at the same one); and for the server to settle after the last paused call returned.
FIRST_WARM_UP_S, WARM_UP_S, SETTLE_S = 5.0, (2.0, 4.0), 1.0
PROBE_GAP_S, WARM_UP_PROBES = 0.5, 3


async def measure(
    url: str, probes: int, rounds: int, hostile: list[str], nice: int
) -> tuple[list[list[float]], list[list[float]], dict[str, int], float]:
    """Per round, the idle probes' and the busy probes' TTFTs; the hostile calls made; the largest RSS."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        context = multiprocessing.get_context("spawn")
        ready, go, stop, rss, done = context.Event(), context.Event(), context.Event(), [0.0], asyncio.Event()
        calls, in_flight = context.Array("i", len(hostile)), context.Array("i", len(hostile))
        args = (url, hostile, ready, go, stop, calls, in_flight, nice, VERBOSE)
        clients = context.Process(target=hostile_process, args=args)
        clients.start()
        await asyncio.to_thread(ready.wait)

        async def watch() -> None:
            while not done.is_set():
                memory = (await http.get("/debug/memory_usage")).json()
                rss[0] = max(rss[0], memory["process_rss_mb"])
                await asyncio.sleep(1.0)

        async def take(count: int, label: str) -> list[float]:
            times = []
            for _ in range(count):
                times.append(await ttft(http))
                if VERBOSE:
                    print(f"{label} probe: {times[-1]:.0f} ms", flush=True)
                await asyncio.sleep(PROBE_GAP_S)
            return times

        watcher = asyncio.create_task(watch())
        await take(WARM_UP_PROBES, "warm-up")  # (the server's first requests, and the clients' process starting)
        idle, busy, warm_ups = [], [], random.Random(0)
        per_round = [probes // rounds + (r < probes % rounds) for r in range(rounds)]
        for r, count in enumerate(per_round):
            idle.append(await take(count, "idle"))
            go.set()
            await asyncio.sleep(FIRST_WARM_UP_S if r == 0 else warm_ups.uniform(*WARM_UP_S))
            busy.append(await take(count, "busy"))
            go.clear()
            while any(in_flight[:]):  # the calls in progress end before the next idle probes
                await asyncio.sleep(0.1)
            await asyncio.sleep(SETTLE_S)
        stop.set()
        done.set()
        await asyncio.to_thread(clients.join)
        await watcher
        return idle, busy, dict(zip(hostile, calls[:])), rss[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--probes", type=int, default=9, help="probes idle, and as many busy")
    parser.add_argument("--rounds", type=int, default=5, help="idle and busy phases alternate this many times")
    parser.add_argument("--args", default="", help="extra `glassbox serve` arguments")
    parser.add_argument("--hostile", default=",".join(HOSTILE), help="which hostile clients run")
    parser.add_argument("--clients-nice", type=int, default=19, help="the hostile clients' process's nice value")
    parser.add_argument("-v", action="store_true", help="print each hostile call's time")
    args = parser.parse_args()
    rounds = max(1, min(args.rounds, args.probes))
    proc, url = start_server(*shlex.split(args.args))
    try:
        idle, busy, calls, rss = asyncio.run(measure(url, args.probes, rounds, args.hostile.split(","), args.clients_nice))
    finally:
        stop_server(proc)
    all_idle, all_busy = [t for r in idle for t in r], [t for r in busy for t in r]
    ratio = statistics.median(all_busy) / statistics.median(all_idle)
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, `glassbox serve {args.args}`; TTFT in ms, median of {args.probes},"
          f" idle and busy alternating in {rounds} rounds; hostile clients at nice {args.clients_nice}\n")
    print("| TTFT idle | TTFT under research calls | ratio | max RSS (MB) | hostile calls made |")
    print("|---:|---:|---:|---:|---|")
    made = ", ".join(f"{name} {n}" for name, n in calls.items())
    print(f"| {statistics.median(all_idle):.0f} | {statistics.median(all_busy):.0f} | {ratio:.2f} | {rss:.0f} | {made} |")
    rounds_text = ", ".join(f"{statistics.median(i):.0f} / {statistics.median(b):.0f}" for i, b in zip(idle, busy))
    print(f"\nper round, idle / busy median: {rounds_text}")
    print(f"idle: {sorted(round(t) for t in all_idle)}\nbusy: {sorted(round(t) for t in all_busy)}")


if __name__ == "__main__":
    main()
