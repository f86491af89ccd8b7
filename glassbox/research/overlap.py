"""/pipeline/schedule with `overlap_comm: true`: does overlapping communication with compute pay on these
ranks? Under tensor parallelism every layer ends in all-reduces; with two micro-batches in flight, one's
all-reduce can run while the other computes.

On every rank, the schedule's steps run over `micro_batches` micro-batches (each a copy of the input, its
own sequence), twice:
- serial: the micro-batches one after the other, every all-reduce waited for before the next compute;
- overlapped: each micro-batch on its own thread with its own process group (async with respect to the
  other: while one thread waits in its all-reduce, the GIL is free and the other computes — torch and gloo
  release it), so micro-batch i's communication overlaps micro-batch i + 1's compute. Each group keeps its
  collectives in its thread's order, which is the same on every rank.
Reported: both times (the median of `repeats` runs, ranks started together by a barrier), the time rank 0
spent in collectives in the serial run, the overlap (serial - overlapped) and its share of that time, and
the largest difference between the two runs' outputs (0: the same arithmetic).
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from glassbox.engine.llm_engine import LLMEngine
from glassbox.engine.tp_runner import RankContext, RankTask
from glassbox.errors import FieldError
from glassbox.research.pipeline import Activation, check_step, run_step

MAX_MICRO_BATCHES = 8


@dataclass
class OverlapSchedule(RankTask):
    steps: list[tuple[str, int | None]]
    activation: Activation
    micro_batches: int
    repeats: int

    def run_on_rank(self, rank: RankContext) -> dict[str, Any]:
        comm = rank.group.comm  # the layers' communicator
        groups = rank.kept.get(f"overlap-groups-{self.micro_batches}")
        if groups is None:  # made once, by every rank in the same order
            groups = [dist.new_group(backend=dist.get_backend()) for _ in range(self.micro_batches)]
            rank.kept[f"overlap-groups-{self.micro_batches}"] = groups
        serial_ms, overlapped_ms, comm_ms = [], [], []
        for _ in range(self.repeats):
            dist.barrier()
            comm.reset()
            start = time.perf_counter()
            serial = [self._run(rank) for _ in range(self.micro_batches)]
            serial_ms.append((time.perf_counter() - start) * 1000)
            comm_ms.append(comm.reset()[0] * 1000)
            dist.barrier()
            outputs: list[torch.Tensor | None] = [None] * self.micro_batches
            errors: list[BaseException] = []

            def micro_batch(i: int) -> None:
                try:
                    with torch.inference_mode(), comm.using(groups[i]):
                        outputs[i] = self._run(rank)
                except BaseException as error:  # re-raised on the task's thread below
                    errors.append(error)

            start = time.perf_counter()
            threads = [threading.Thread(target=micro_batch, args=(i,)) for i in range(self.micro_batches)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            overlapped_ms.append((time.perf_counter() - start) * 1000)
            if errors:
                raise errors[0]
        difference = max(float((a - b).abs().max()) if a.numel() else 0.0 for a, b in zip(serial, outputs))
        mine = {"rank": rank.group.rank, "serial_ms": statistics.median(serial_ms),
                "overlapped_ms": statistics.median(overlapped_ms), "comm_ms": statistics.median(comm_ms)}  # fmt: skip
        reports = rank.group.gather_objects(mine)
        return {"ranks": reports, "max_abs_diff": difference, "output": serial[-1]} if reports is not None else {}

    def _run(self, rank: RankContext) -> torch.Tensor:
        activation = self.activation
        for step, layer_idx in self.steps:
            activation = Activation(run_step(rank.model, step, layer_idx, activation), activation.token_ids)
        return activation.tensor


@torch.inference_mode()
def overlap_schedule(
    engine: LLMEngine, steps: list[tuple[str, int | None]], activation: Activation, micro_batches: int, repeats: int = 3
) -> dict[str, Any]:
    """The serial and the overlapped schedule of `steps` on every rank (see the module's doc)."""
    if engine.tensor_parallel_size == 1:
        raise FieldError("overlap_comm", "needs tensor_parallel_size > 1: one rank has no communication to overlap")
    if not 2 <= micro_batches <= MAX_MICRO_BATCHES:
        raise FieldError("micro_batches", f"must be in [2, {MAX_MICRO_BATCHES}] to overlap, got {micro_batches}")
    current = activation
    for step, layer_idx in steps:  # checked here, before any rank starts; later steps take hidden states [T, ·]
        check_step(engine.loaded.model, step, layer_idx, current)
        current = Activation(torch.empty(len(activation.token_ids), 1), activation.token_ids)
    result = engine.runner.run_task(OverlapSchedule(steps, activation, micro_batches, repeats))
    ranks = result["ranks"]
    serial = max(r["serial_ms"] for r in ranks)  # the schedule ends when its slowest rank does
    overlapped = max(r["overlapped_ms"] for r in ranks)
    comm = ranks[0]["comm_ms"]
    output = result["output"]
    return {
        "token_ids": activation.token_ids,
        "overlap_comm": True,
        "workers": f"{engine.runner.group.world_size} ranks ({engine.runner.group.backend})",
        "micro_batches": micro_batches,
        "steps": [{"step": step, "layer_idx": layer_idx} for step, layer_idx in steps],
        "output_shape": list(output.shape),
        "serial_ms": serial,
        "overlapped_ms": overlapped,
        "overlap_ms": serial - overlapped,
        "serial_comm_ms": comm,  # rank 0 inside collectives in the serial run (waiting for the others included)
        "overlap_share_of_comm": (serial - overlapped) / comm if comm > 0 else 0.0,
        "speedup": serial / overlapped if overlapped > 0 else None,
        "max_abs_diff": result["max_abs_diff"],
        "ranks": ranks,
        "repeats": repeats,
    }
