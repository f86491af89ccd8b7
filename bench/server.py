"""Server overhead on this machine: ready time, first streamed token over HTTP, and 32 concurrent HTTP
streams against the engine's own figure for the same work, in one run.

    .venv/bin/python bench/server.py [--modes float32,int4,int8] [--streams 32] [--new-tokens 128]

Ready = process spawn to /health answering 200 (weights already converted, i.e. a warm cache). First
token = request sent to the first SSE event carrying a token, prompt "Hi", median of 10. The engine
figure runs LLM.generate on the same 32 prompts in this process.
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


def prompts(n: int) -> list[str]:
    return [f"The history of the city number {i} is long and complicated. It began" for i in range(n)]


def start(mode: str) -> tuple[subprocess.Popen, str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "-m", "glassbox.cli", "serve", "--port", str(port)]
    if mode != "float32":
        args += ["--quantization", mode]
    begin = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url, time.perf_counter() - begin
        except httpx.HTTPError:
            time.sleep(0.02)


def first_token_ms(port: int, prompt: str = "Hi") -> float:
    """Request sent to the first SSE event holding a token, read off a raw socket (TCP_NODELAY, as curl
    does) so that no client library's own overhead is counted."""
    body = json.dumps({"prompt": prompt, "max_tokens": 2, "temperature": 0, "stream": True}).encode()
    head = "POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        begin = time.perf_counter()
        sock.sendall(head.encode() + body)
        received = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError("no token streamed")
            received += chunk
            event = received.partition(b"data: ")[2]
            if b"\n\n" in event and b'"token_ids": [' in event:
                return (time.perf_counter() - begin) * 1000


async def http_streams(port: int, n: int, new_tokens: int) -> float:
    """n concurrent streaming /generate requests -> aggregate tokens/s. A bare asyncio client (raw HTTP/1.1,
    the SSE events cut out of the chunked body), as first_token_ms: the client shares the server's 2 CPUs,
    and httpx's per-event cost (~0.25 ms, ~1 s of CPU for 32 x 128 events) would be counted against the
    server."""

    async def one(prompt: str) -> int:
        body = json.dumps({"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
                           "stream": True}).encode()
        head = "POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head.encode() + body)
        count, pending = 0, b""
        while chunk := await reader.read(65536):
            pending += chunk
            # Complete events end with a blank line; the chunked framing between them is skipped.
            *events, pending = pending.split(b"\n\n")
            for event in events:
                data = event.partition(b"data: ")[2]
                if data and data != b"[DONE]":
                    count += len(json.loads(data)["token_ids"])
        writer.close()
        return count

    begin = time.perf_counter()
    counts = await asyncio.gather(*(one(p) for p in prompts(n)))
    if min(counts) != new_tokens:
        raise RuntimeError(f"a stream ended early: {min(counts)} of {new_tokens} tokens")
    return sum(counts) / (time.perf_counter() - begin)


def engine_tok_s(mode: str, n: int, new_tokens: int) -> float:
    from glassbox import LLM, SamplingParams

    llm = LLM(quantization=None if mode == "float32" else mode)
    llm.generate("warm up", SamplingParams(max_tokens=4))
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    begin = time.perf_counter()
    outs = llm.generate(prompts(n), params)
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - begin)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--modes", default="float32,int4,int8")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()

    rows = []
    for mode in args.modes.split(","):
        proc, url, ready = start(mode)
        try:
            port = int(url.rsplit(":", 1)[1])
            first_token_ms(port)  # warm-up
            first = statistics.median(first_token_ms(port) for _ in range(10))
            over_http = asyncio.run(http_streams(port, args.streams, args.new_tokens))
        finally:
            proc.terminate()
            proc.wait()
        in_process = engine_tok_s(mode, args.streams, args.new_tokens)
        rows.append((mode, ready, first, over_http, in_process))

    print(f"\nglassbox server, default model, {os.cpu_count()} CPUs; {args.streams} streams x {args.new_tokens} tokens")
    print(f"| mode | ready after start (s) | first streamed token (ms) | tok/s, {args.streams} HTTP streams | "
          f"tok/s, engine alone | HTTP / engine |")
    print("|---|---|---|---|---|---|")
    for mode, ready, first, over_http, in_process in rows:
        print(f"| {mode} | {ready:.2f} | {first:.1f} | {over_http:.1f} | {in_process:.1f} | {over_http / in_process:.2f} |")


if __name__ == "__main__":
    main()
