"""A tensor-parallel worker (ranks 1..N-1): load the model rank 0 names, keep this rank's shard and KV heads,
then make every model call rank 0 sends (engine/tp_runner.py) until it sends Stop.

    python -m glassbox.engine.tp_worker --store HOST:PORT --rank R --world-size N [--device cpu] [--threads T]

`TensorParallelGroup.launch` starts these; under torchrun `python -m glassbox.worker` calls `serve_commands`
on every rank but 0. A worker that fails exits: rank 0's next collective then raises and the engine stops
(a worker never waits for a rank 0 that is gone: its sockets close with it).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

import torch

from glassbox.engine.tp_group import Stop, TensorParallelGroup
from glassbox.engine.tp_runner import Forward, Logits, RankContext, RankTask, WorkerSpec, prepare_rank, worker_probe
from glassbox.layers.attention import AttentionMetadata
from glassbox.models.loader import load_model

logger = logging.getLogger(__name__)


@torch.inference_mode()
def serve_commands(group: TensorParallelGroup) -> None:
    """Receive the WorkerSpec, build this rank, then run rank 0's commands until Stop."""
    spec: WorkerSpec = group.receive()
    loaded = load_model(spec.model, dtype=spec.dtype, device=group.device, progress=False)
    kv_cache = prepare_rank(loaded, group, spec)
    kv_cache.bind(loaded.model)
    group.barrier()
    model = loaded.model
    context = RankContext(group, model, kv_cache, {})
    while True:
        command = group.receive()
        if isinstance(command, Stop):
            return
        if isinstance(command, Forward):
            meta = on_device(command.meta, group.device)
            meta.probe = worker_probe(command.capture_layers)
            model(command.input_ids.to(group.device), command.positions.to(group.device), meta)
            if meta.probe is not None:
                group.gather_objects({layer: [p.cpu() for p in probs] for layer, probs in meta.probe.captured.items()})
        elif isinstance(command, Logits):
            model.compute_logits(command.hidden.to(group.device))
        elif isinstance(command, RankTask):
            command.run_on_rank(context)
        else:
            raise TypeError(f"unknown command {type(command).__name__} from rank 0")


def on_device(meta: AttentionMetadata, device: torch.device) -> AttentionMetadata:
    """Rank 0's step metadata with its tensors on this rank's device (CUDA: rank 0 pickled them on its own)."""
    if meta.query_start_loc.device == device:
        return meta
    moved = {f.name: getattr(meta, f.name) for f in dataclasses.fields(meta)}
    for name, value in moved.items():
        if isinstance(value, torch.Tensor):
            moved[name] = value.to(device)
    return AttentionMetadata(**moved)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glassbox.engine.tp_worker")
    parser.add_argument("--store", required=True, help="HOST:PORT of rank 0's TCPStore")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of this rank")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return run_rank(TensorParallelGroup.join(args.store, args.rank, args.world_size, args.device), args.rank)


def run_rank(group: TensorParallelGroup, rank: int) -> int:
    """A worker rank's life once in its group: rank 0's commands until Stop; the exit status (1: failed)."""
    try:
        serve_commands(group)
    except Exception:
        logger.exception("tensor-parallel rank %d failed", rank)
        return 1
    finally:
        group.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
