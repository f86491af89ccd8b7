"""Tensor splitting and sharded execution on parallel workers, checked against the unsplit computation.

`split` cuts a tensor (a model weight by name, or a seeded random tensor of a given shape) into shards
along one dimension; `execute` runs `shard @ other` for every shard on its own worker thread (torch
releases the GIL inside its kernels, so the shards really run at once) and gathers the results the way
tensor parallelism does: a split along the rows (output features) is gathered by concatenation
(column-parallel linear), a split along the contracted dimension by summing partial products, with the
other operand split to match (row-parallel linear).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

MAX_ELEMENTS = 1 << 26  # 64M elements (256 MiB in float32) for a random tensor or an operand


@dataclass
class SplitTensor:
    source: str
    full: torch.Tensor
    split_dim: int
    shards: list[torch.Tensor]


def _tensor_of(model: nn.Module, name: str) -> torch.Tensor:
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    if name not in tensors:
        examples = ", ".join(list(tensors)[:4])
        raise ValueError(f"weight: no tensor named {name!r} in the model (e.g. {examples})")
    return tensors[name].detach()


def _random(shape: list[int], seed: int) -> torch.Tensor:
    if not shape or any(d < 1 for d in shape) or torch.Size(shape).numel() > MAX_ELEMENTS:
        raise ValueError(f"tensor_shape: dimensions must be positive and hold at most {MAX_ELEMENTS} elements")
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def split(
    model: nn.Module, weight: str | None, tensor_shape: list[int] | None, split_dim: int, num_splits: int, seed: int = 0
) -> SplitTensor:
    if (weight is None) == (tensor_shape is None):
        raise ValueError("give exactly one of weight (a model tensor's name) and tensor_shape")
    full = _tensor_of(model, weight) if weight is not None else _random(tensor_shape, seed)
    if not full.is_floating_point():
        raise ValueError(f"weight: {weight!r} is {full.dtype} (quantized); pick a floating-point tensor")
    if not -full.dim() <= split_dim < full.dim():
        raise ValueError(f"split_dim: must be in [{-full.dim()}, {full.dim() - 1}] for shape {list(full.shape)}")
    split_dim %= full.dim()
    if not 1 <= num_splits <= full.shape[split_dim]:
        raise ValueError(f"num_splits: must be in [1, {full.shape[split_dim]}] (the size of dimension {split_dim})")
    shards = [s.contiguous() for s in torch.tensor_split(full, num_splits, dim=split_dim)]
    return SplitTensor(weight or f"random{list(full.shape)}", full, split_dim, shards)


def execute(parts: SplitTensor, other_columns: int, seed: int = 0) -> dict[str, Any]:
    """matmul of every 2-D shard with a seeded random [in, other_columns] operand, on one thread per shard."""
    if parts.full.dim() != 2:
        raise ValueError("operation matmul needs a 2-D split tensor")
    rows, inner = parts.full.shape
    if other_columns < 1 or inner * other_columns > MAX_ELEMENTS:
        raise ValueError(f"other_columns: must be in [1, {MAX_ELEMENTS // inner}]")
    other = torch.randn(inner, other_columns, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    full = parts.full.float()
    row_parallel = parts.split_dim == 1
    if row_parallel:  # the contracted dimension is split: split the operand's rows the same way
        sizes = [s.shape[1] for s in parts.shards]
        operands = list(torch.split(other, sizes, dim=0))
    else:
        operands = [other] * len(parts.shards)

    def run(i: int) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        result = parts.shards[i].float() @ operands[i]
        return result, (time.perf_counter() - start) * 1000

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(parts.shards), thread_name_prefix="glassbox-shard") as pool:
        results = list(pool.map(run, range(len(parts.shards))))
    parallel_ms = (time.perf_counter() - start) * 1000
    start = time.perf_counter()
    gathered = torch.stack([r for r, _ in results]).sum(0) if row_parallel else torch.cat([r for r, _ in results], 0)
    gather_ms = (time.perf_counter() - start) * 1000
    start = time.perf_counter()
    reference = full @ other
    unsplit_ms = (time.perf_counter() - start) * 1000
    return {
        "operation": "matmul",
        "gather": "sum" if row_parallel else "concat",
        "output_shape": list(gathered.shape),
        "shard_ms": [ms for _, ms in results],
        "parallel_ms": parallel_ms,
        "gather_ms": gather_ms,
        "unsplit_ms": unsplit_ms,
        "max_abs_error": float((gathered - reference).abs().max()),
        "workers": f"{len(parts.shards)} threads",
    }
