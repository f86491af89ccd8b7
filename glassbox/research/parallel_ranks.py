"""/parallel/tensor_split and /parallel/execute on the real ranks of a tensor-parallel engine
(tensor_parallel_size > 1); with one rank, research/parallel.py runs the shards on threads instead.

- split: the tensor (a random one, or a model weight by name: every rank's piece gathered and put back
  together, models/tensor_parallel.unshard) is cut on rank 0, and shard i is placed on rank i mod N
  (`PlaceShards`, sent once; the time and bytes it took are reported);
- execute: every rank multiplies its shards by the same seeded random operand (made on each rank from the
  seed: nothing sent), then the results meet on rank 0 through a real collective of the data group (gloo /
  NCCL): a `reduce` (sum) for a split along the contracted dimension, a `gather` (concatenation) otherwise.
  Each rank reports its compute time, its time and bytes in the collective; rank 0 checks the gathered
  result against the unsplit product.
These run on the engine's thread between steps: the ranks take the same commands in the same order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from glassbox.engine.llm_engine import LLMEngine
from glassbox.engine.tp_runner import RankContext, RankTask, keep
from glassbox.errors import FieldError
from glassbox.models.tensor_parallel import unshard
from glassbox.research.limits import LimitError
from glassbox.research.parallel import SplitTensor, cut, random_tensor, split, tensor_of


@dataclass
class GatherTensor(RankTask):
    """Every rank's piece of the model tensor `name`, put back together on rank 0."""

    name: str

    def run_on_rank(self, rank: RankContext) -> torch.Tensor | None:
        try:
            mine = tensor_of(rank.model, self.name).cpu()
        except ValueError:  # a row-parallel layer's bias lives on rank 0 alone
            mine = None
        parts = rank.group.gather_objects(mine)
        return None if parts is None else unshard(self.name, parts, rank.model.config)


@dataclass
class PlaceShards(RankTask):
    key: str
    shards: list[torch.Tensor]  # all of them: each rank keeps those it owns (index mod world size)

    def run_on_rank(self, rank: RankContext) -> None:
        size = rank.group.world_size
        keep(rank.kept, self.key, {i: s for i, s in enumerate(self.shards) if i % size == rank.group.rank})


@dataclass
class RunShards(RankTask):
    key: str
    output_shapes: list[list[int]]  # every shard's product, by shard index
    widths: list[int]  # every shard's last dimension (the operand's rows it takes when the split is row-parallel)
    row_parallel: bool  # split along the contracted dimension: partial products summed
    gather: bool
    other_columns: int
    seed: int

    def run_on_rank(self, rank: RankContext) -> tuple[torch.Tensor | None, list[dict[str, Any]]] | None:
        group, mine = rank.group, rank.kept[self.key]
        inner = sum(self.widths) if self.row_parallel else self.widths[0]
        other = torch.randn(inner, self.other_columns, generator=torch.Generator().manual_seed(self.seed))
        offsets = [sum(self.widths[:i]) for i in range(len(self.widths))]
        shard_ms, results = {}, {}
        start = time.perf_counter()
        for i, shard in mine.items():
            began = time.perf_counter()
            operand = other[offsets[i] : offsets[i] + self.widths[i]] if self.row_parallel else other
            results[i] = shard.float() @ operand
            shard_ms[i] = (time.perf_counter() - began) * 1000
        compute_ms = (time.perf_counter() - start) * 1000
        gathered, comm_ms, comm_bytes = None, 0.0, 0
        if self.gather:
            start = time.perf_counter()
            if self.row_parallel:  # this rank's partials summed here, then one reduce over the ranks
                partial = torch.zeros(self.output_shapes[0])
                for result in results.values():
                    partial += result
                dist.reduce(partial, dst=0)
                gathered, comm_bytes = partial, partial.numel() * 4
            else:  # every rank's products flattened and padded to one length, gathered on rank 0
                sizes = [self._owned_size(r, group.world_size) for r in range(group.world_size)]
                buffer = torch.zeros(max(sizes))
                flat = torch.cat([results[i].flatten() for i in sorted(results)]) if results else torch.zeros(0)
                buffer[: flat.numel()] = flat
                buffers = [torch.empty_like(buffer) for _ in sizes] if group.rank == 0 else None
                dist.gather(buffer, buffers, dst=0)
                gathered, comm_bytes = buffers, buffer.numel() * 4
            comm_ms = (time.perf_counter() - start) * 1000
        report = {"rank": group.rank, "shards": sorted(mine), "compute_ms": compute_ms, "comm_ms": comm_ms,
                  "comm_bytes": comm_bytes, "shard_ms": shard_ms}  # fmt: skip
        reports = group.gather_objects(report)
        return None if reports is None else (gathered, reports)

    def _owned_size(self, rank: int, world_size: int) -> int:
        shapes = self.output_shapes[rank::world_size]
        return sum(int(torch.Size(shape).numel()) for shape in shapes)


def split_for_engine(
    engine: LLMEngine,
    weight: str | None,
    tensor_shape: list[int] | None,
    split_dim: int,
    num_splits: int,
    seed: int,
    max_elements: int,
) -> SplitTensor:
    """On the engine's ranks under tensor parallelism (`split_on_ranks`), else here (research/parallel.py)."""
    if engine.distributed:
        return split_on_ranks(engine, weight, tensor_shape, split_dim, num_splits, seed, max_elements)
    return split(engine.loaded.model, weight, tensor_shape, split_dim, num_splits, seed, max_elements)


def split_on_ranks(
    engine: LLMEngine,
    weight: str | None,
    tensor_shape: list[int] | None,
    split_dim: int,
    num_splits: int,
    seed: int,
    max_elements: int,
) -> SplitTensor:
    """Cut the tensor on rank 0 and place shard i on rank i mod N."""
    if (weight is None) == (tensor_shape is None):
        raise FieldError("weight", "give exactly one of weight (a model tensor's name) and tensor_shape")
    runner = engine.runner
    if weight is not None:
        tensor_of(engine.loaded.model, weight)  # raises, naming the field, before any rank is asked
        full = runner.run_task(GatherTensor(weight))
    else:
        full = random_tensor(tensor_shape, seed, max_elements)  # the same seeded tensor as one rank makes
    parts = cut(full, weight, split_dim, num_splits)
    start = time.perf_counter()
    runner.run_task(PlaceShards(parts.key, parts.shards))
    size = runner.group.world_size
    parts.placement = {
        "ranks": [{"rank": r, "shards": list(range(r, num_splits, size))} for r in range(size)],
        "backend": runner.group.backend,
        "ms": (time.perf_counter() - start) * 1000,
        "bytes_sent": sum(s.numel() * s.element_size() for s in parts.shards) * (size - 1),
    }
    return parts


def execute_on_ranks(
    engine: LLMEngine, parts: SplitTensor, other_columns: int, seed: int, gather: bool, max_elements: int
) -> dict[str, Any]:
    """matmul of every shard on the rank holding it; the results gathered on rank 0 and checked."""
    runner = engine.runner
    if parts.key not in runner.rank_context.kept:
        raise FieldError("splits", "its shards are no longer placed on the ranks (newer splits took their place); split again")
    inner = parts.full.shape[-1]
    outputs = parts.full.numel() // inner * other_columns
    for name, elements in (("the other operand", inner * other_columns), ("the output", outputs)):
        if elements > max_elements:
            raise LimitError("tensor_max_elements", f"{name} would hold {elements} elements (other_columns {other_columns}), over the limit of {max_elements}")
    row_parallel = parts.split_dim == parts.full.dim() - 1
    shapes = [list(s.shape[:-1]) + [other_columns] for s in parts.shards]
    task = RunShards(parts.key, shapes, [s.shape[-1] for s in parts.shards], row_parallel, gather, other_columns, seed)
    start = time.perf_counter()
    gathered, reports = runner.run_task(task)
    parallel_ms = (time.perf_counter() - start) * 1000
    report: dict[str, Any] = {
        "operation": "matmul",
        "gather": ("sum" if row_parallel else "concat") if gather else None,
        "workers": f"{runner.group.world_size} ranks ({runner.group.backend})",
        "ranks": [{k: v for k, v in r.items() if k != "shard_ms"} for r in reports],
        "shard_output_shapes": shapes,
        "shard_ms": [next(r["shard_ms"][i] for r in reports if i in r["shard_ms"]) for i in range(len(shapes))],
        "parallel_ms": parallel_ms,
        "placement": parts.placement,
    }
    if not gather:
        return report
    if row_parallel:
        result = gathered
    else:  # each rank's buffer holds its shards' products in index order
        products: dict[int, torch.Tensor] = {}
        size = runner.group.world_size
        for rank, buffer in enumerate(gathered):
            offset = 0
            for i in range(rank, len(shapes), size):
                count = int(torch.Size(shapes[i]).numel())
                products[i] = buffer[offset : offset + count].view(shapes[i])
                offset += count
        result = torch.cat([products[i] for i in range(len(shapes))], parts.split_dim)
    other = torch.randn(inner, other_columns, generator=torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    reference = parts.full.float() @ other
    unsplit_ms = (time.perf_counter() - start) * 1000
    return {
        **report,
        "output_shape": list(result.shape),
        "comm_ms": max(r["comm_ms"] for r in reports),
        "comm_bytes": sum(r["comm_bytes"] for r in reports),
        "unsplit_ms": unsplit_ms,
        "max_abs_error": float((result - reference).abs().max()),
    }
