"""Tensor parallelism on this CPU: one rank against two (gloo), same model, same prompts, greedy.

    .venv/bin/python bench/parallel.py [--new-tokens 64] [--concurrency 1,32] [--model PATH]

Rows: one and two ranks on the default CPU weights (quantization auto: Q4_1 blocks; one rank runs all layers
in one native call, two ranks the per-layer kernel with the all-reduces between), and on float32 weights
(quantization none). Columns: decode ms/token of one request, output
tokens/s with 1 and N concurrent requests (ignore EOS), and rank 0's communication share of the run: the
seconds inside the layers' collectives (all-reduce, the head's gather) and inside sending each model call
to the worker, over the run's wall time. Threads: torch's per rank, as set (OMP_NUM_THREADS).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from glassbox import LLM, SamplingParams

PROMPT = "The history of the Roman Empire is long and complicated. It began"
TOPICS = ["Roman Empire", "Ming dynasty", "printing press", "steam engine", "Silk Road", "French Revolution"]


def prompts(n: int) -> list[str]:
    return [f"The history of the {TOPICS[i % len(TOPICS)]} is long and complicated. Chapter {i} begins" for i in range(n)]


def run(label: str, llm: LLM, new_tokens: int, concurrency: list[int]) -> dict[str, object]:
    llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8))  # warm-up
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))[0]
    row: dict[str, object] = {"setup": label, "decode ms/token": out.timings["decode_ms_per_token"]}
    group = getattr(llm.engine.runner, "group", None)
    for n in concurrency:
        if group is not None:
            group.comm.reset()
            group.send_seconds = 0.0
        start = time.perf_counter()
        outs = llm.generate(prompts(n), SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
        wall = time.perf_counter() - start
        row[f"tok/s @{n}"] = sum(len(o.token_ids) for o in outs) / wall
        if group is not None:
            collective_s, collective_bytes, calls = group.comm.reset()
            row[f"comm share @{n}"] = f"{collective_s / wall:.0%} + {group.send_seconds / wall:.0%} send"
            row[f"collectives @{n}"] = f"{calls} ({collective_bytes / 2**20:.0f} MiB)"
    return row


def parity(model: str | None) -> None:
    """How close two ranks are to one: greedy agreement on 16 prompts, the largest logit difference of one
    step (float32), against one rank float32 and against the default quantized CPU mode."""
    from glassbox.layers.attention import AttentionMetadata

    texts = prompts(16)
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)

    def logits(llm: LLM, ids: list[int]) -> torch.Tensor:
        runner, n = llm.engine.runner, len(ids)
        with torch.inference_mode():
            hidden = runner.run_forward(torch.tensor(ids), torch.arange(n), AttentionMetadata.for_prompts([n]))
            return runner.compute_logits(hidden).float()

    results = {}
    for label, quantization, tp in (("TP=1 float32", "none", 1), ("TP=1 auto", "auto", 1), ("TP=2 float32", "none", 2)):
        with LLM(model, quantization=quantization, tensor_parallel_size=tp, kv_cache_memory=256 << 20) as llm:
            ids = llm.tokenizer.encode(texts[0])
            results[label] = ([o.token_ids for o in llm.generate(texts, greedy)], logits(llm, ids))
    two_tokens, two_logits = results["TP=2 float32"]
    for label in ("TP=1 float32", "TP=1 auto"):
        tokens, reference = results[label]
        same = sum(a == b for a, b in zip(tokens, two_tokens))
        print(f"TP=2 vs {label}: {same}/16 prompts token for token (32 tokens each), "
              f"max |logit difference| {float((two_logits - reference).abs().max()):.2e}")


def _forward_command(num_seqs: int) -> object:
    """A decode step's command as rank 0 sends it: num_seqs sequences of ~120 tokens (8 blocks of 16)."""
    from glassbox.engine.step_metadata import SeqChunk, build_step_metadata
    from glassbox.engine.tp_runner import Forward

    chunks = [SeqChunk(list(range(8 * i, 8 * i + 8)), 120, 1) for i in range(num_seqs)]
    positions, meta = build_step_metadata(chunks, 16)
    return Forward(torch.arange(num_seqs), positions, meta)


def _channel_worker(port: int, memory_name: str, ready: object, done: object, steps: int) -> None:
    import pickle
    import torch.distributed as dist
    from multiprocessing import shared_memory

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=1, world_size=2)
    memory = shared_memory.SharedMemory(memory_name)
    for _ in range(steps):  # the barrier alone
        dist.barrier()
    for _ in range(2 * steps):  # through the broadcast
        box = [None]
        dist.broadcast_object_list(box, src=0)
        dist.barrier()
    for _ in range(2 * steps):  # through shared memory + events (nano-vllm's way)
        ready.wait()
        ready.clear()
        size = int.from_bytes(memory.buf[:4], "little")
        pickle.loads(memory.buf[4 : 4 + size])
        done.set()
        dist.barrier()
    memory.close()
    dist.destroy_process_group()


def channel(steps: int = 200) -> None:
    """Rank 0 -> worker, one decode step's command: a gloo broadcast of the pickled object (what glassbox
    does: it reaches other hosts) against shared memory + events (nano-vllm's way, one host). Each send is
    followed by the same gloo barrier, so the difference between the rows is the channel's."""
    import multiprocessing
    import pickle
    import socket
    from multiprocessing import shared_memory

    import torch.distributed as dist

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    ready, done = context.Event(), context.Event()
    memory = shared_memory.SharedMemory(create=True, size=1 << 20)
    worker = context.Process(target=_channel_worker, args=(port, memory.name, ready, done, steps))
    worker.start()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=2)
    print("| command | bytes pickled | broadcast + barrier (us) | shared memory + events + barrier (us) |")
    print("|---|---|---|---|")
    times = {}
    start = time.perf_counter()
    for _ in range(steps):
        dist.barrier()
    print(f"| (the barrier alone) | 0 | {(time.perf_counter() - start) / steps * 1e6:.0f} | |")
    for num_seqs in (1, 32):
        command = _forward_command(num_seqs)
        start = time.perf_counter()
        for _ in range(steps):
            dist.broadcast_object_list([command], src=0)
            dist.barrier()
        times[("broadcast", num_seqs)] = (time.perf_counter() - start) / steps * 1e6
    for num_seqs in (1, 32):
        command = _forward_command(num_seqs)
        start = time.perf_counter()
        for _ in range(steps):
            data = pickle.dumps(command)
            memory.buf[:4] = len(data).to_bytes(4, "little")
            memory.buf[4 : 4 + len(data)] = data
            ready.set()
            done.wait()
            done.clear()
            dist.barrier()
        times[("shm", num_seqs)] = (time.perf_counter() - start) / steps * 1e6
        size = len(pickle.dumps(command))
        print(f"| decode step, {num_seqs} seqs | {size} | {times[('broadcast', num_seqs)]:.0f} | {times[('shm', num_seqs)]:.0f} |")
    worker.join()
    dist.destroy_process_group()
    memory.close()
    memory.unlink()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--model", default=None)
    parser.add_argument("--parity", action="store_true", help="print TP=2's agreement with TP=1 instead of speed")
    parser.add_argument("--channel", action="store_true", help="time the command channel: broadcast vs shared memory")
    args = parser.parse_args()
    if args.parity:
        parity(args.model)
        return
    if args.channel:
        channel()
        return
    concurrency = [int(n) for n in args.concurrency.split(",")]
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads per rank, {args.new_tokens} new tokens")
    rows = []
    options = dict(kv_cache_memory=256 << 20, max_num_batched_tokens=4096)
    setups = (("TP=1 auto (Q4_1, native stack)", "auto", 1), ("TP=2 auto (Q4_1, per-layer kernel)", "auto", 2),
              ("TP=1 float32", "none", 1), ("TP=2 float32", "none", 2))  # fmt: skip
    for label, quantization, tp in setups:
        with LLM(args.model, quantization=quantization, tensor_parallel_size=tp, **options) as llm:
            rows.append(run(label, llm, args.new_tokens, concurrency))
    columns = list(dict.fromkeys(key for row in rows for key in row))
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        cells = [f"{row[c]:.1f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
