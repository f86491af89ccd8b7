"""Tensor splitting and sharded execution on parallel workers, checked against the unsplit computation.

`split` cuts a tensor (a model weight by name, or a seeded random tensor of a given shape, 1-D to 4-D)
into shards along one dimension; `execute` runs `shard @ other` for every shard on its own worker thread
(torch releases the GIL inside its kernels, so the shards really run at once), `other` a seeded random
[last dimension, other_columns] matrix, and gathers the results the way tensor parallelism does: a split
along any dimension but the last (rows, output features, a batch) is gathered by concatenation
(column-parallel linear), a split along the last, contracted, dimension by summing partial products, with
the other operand split to match (row-parallel linear). `gather: false` returns the shards' timings only.

Sizes are bounded by `limits.tensor_max_elements` for the random tensor, the other operand and the output.
"""

from __future__ import annotations

import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from glassbox.errors import FieldError
from glassbox.layers.quantized_linear import QLinear
from glassbox.research.limits import LimitError

MAX_ELEMENTS = 1 << 22  # the default of limits.tensor_max_elements (16 MiB in float32)


@dataclass
class SplitTensor:
    source: str
    full: torch.Tensor
    split_dim: int
    shards: list[torch.Tensor]
    key: str = field(default_factory=lambda: uuid.uuid4().hex)  # names the shards placed on ranks
    placement: dict[str, Any] | None = None  # where the shards live (research/parallel_ranks.py), None: here


def tensor_of(model: nn.Module, name: str) -> torch.Tensor:
    """The model's tensor `name` (a parameter, a buffer, or a quantized layer's weight as float32); ValueError
    naming the field if there is none."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    # A quantized layer's weight is named as it was: its float32 values, dequantized from the blocks.
    tensors |= {f"{n}.weight": m.dequantized for n, m in model.named_modules() if isinstance(m, QLinear)}
    if name not in tensors:
        examples = ", ".join(list(tensors)[:4])
        raise ValueError(f"weight: no tensor named {name!r} in the model (e.g. {examples})")
    tensor = tensors[name]
    return tensor() if callable(tensor) else tensor.detach()


def random_tensor(shape: list[int], seed: int, max_elements: int) -> torch.Tensor:
    if not 1 <= len(shape) <= 4 or any(d < 1 for d in shape):
        raise FieldError("tensor_shape", "give 1 to 4 positive dimensions")
    elements = math.prod(shape)  # Python ints: no overflow however large the dimensions
    if elements > max_elements:
        raise LimitError("tensor_max_elements", f"tensor_shape {shape} holds {elements} elements, over the limit of {max_elements}")
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def split(
    model: nn.Module,
    weight: str | None,
    tensor_shape: list[int] | None,
    split_dim: int,
    num_splits: int,
    seed: int = 0,
    max_elements: int = MAX_ELEMENTS,
) -> SplitTensor:
    if (weight is None) == (tensor_shape is None):
        raise FieldError("weight", "give exactly one of weight (a model tensor's name) and tensor_shape")
    full = tensor_of(model, weight) if weight is not None else random_tensor(tensor_shape, seed, max_elements)
    return cut(full, weight, split_dim, num_splits)


def cut(full: torch.Tensor, weight: str | None, split_dim: int, num_splits: int) -> SplitTensor:
    """`full` (the named weight, or a random tensor when `weight` is None) in `num_splits` shards."""
    if not full.is_floating_point():
        raise ValueError(f"weight: {weight!r} is {full.dtype} (quantized); pick a floating-point tensor")
    if not -full.dim() <= split_dim < full.dim():
        raise ValueError(f"split_dim: must be in [{-full.dim()}, {full.dim() - 1}] for shape {list(full.shape)}")
    split_dim %= full.dim()
    if not 1 <= num_splits <= full.shape[split_dim]:
        raise ValueError(f"num_splits: must be in [1, {full.shape[split_dim]}] (the size of dimension {split_dim})")
    shards = [s.contiguous() for s in torch.tensor_split(full, num_splits, dim=split_dim)]
    return SplitTensor(weight or f"random{list(full.shape)}", full, split_dim, shards)


def split_id_of(splits: str | list[str]) -> str:
    """The split a /parallel/execute request names: its split_id, or the shard ids ("<split_id>#<index>")
    of one split."""
    if isinstance(splits, str):
        return splits
    ids = {item.split("#", 1)[0] for item in splits}
    if len(ids) != 1:
        raise FieldError("splits", "name the shards of one split ('<split_id>#<index>'), or its split_id")
    return ids.pop()


def nbytes(parts: SplitTensor) -> int:
    """What a split holds beyond the model: shards that are copies (not views of the full tensor), and the
    full tensor unless it is a model weight."""
    full_storage = parts.full.untyped_storage().data_ptr()
    copies = sum(s.numel() * s.element_size() for s in parts.shards if s.untyped_storage().data_ptr() != full_storage)
    own = parts.full.numel() * parts.full.element_size() if parts.source.startswith("random[") else 0
    return copies + own


def execute(
    parts: SplitTensor, other_columns: int, seed: int = 0, gather: bool = True, max_elements: int = MAX_ELEMENTS
) -> dict[str, Any]:
    """matmul of every shard with a seeded random [last dim, other_columns] operand, one thread per shard."""
    inner = parts.full.shape[-1]
    outputs = parts.full.numel() // inner * other_columns
    for name, elements in (("the other operand", inner * other_columns), ("the output", outputs)):
        if elements > max_elements:
            raise LimitError("tensor_max_elements", f"{name} would hold {elements} elements (other_columns {other_columns}), over the limit of {max_elements}")
    other = torch.randn(inner, other_columns, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    last = parts.full.dim() - 1
    row_parallel = parts.split_dim == last
    if row_parallel:  # the contracted dimension is split: split the operand's rows the same way
        operands = list(torch.split(other, [s.shape[-1] for s in parts.shards], dim=0))
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
    report: dict[str, Any] = {
        "operation": "matmul",
        "gather": ("sum" if row_parallel else "concat") if gather else None,
        "shard_output_shapes": [list(r.shape) for r, _ in results],
        "shard_ms": [ms for _, ms in results],
        "parallel_ms": parallel_ms,
        "workers": f"{len(parts.shards)} threads",
    }
    if not gather:
        return report
    start = time.perf_counter()
    partials = [r for r, _ in results]
    gathered = torch.stack(partials).sum(0) if row_parallel else torch.cat(partials, parts.split_dim)
    gather_ms = (time.perf_counter() - start) * 1000
    start = time.perf_counter()
    reference = parts.full.float() @ other
    unsplit_ms = (time.perf_counter() - start) * 1000
    return {
        **report,
        "output_shape": list(gathered.shape),
        "gather_ms": gather_ms,
        "unsplit_ms": unsplit_ms,
        "max_abs_error": float((gathered - reference).abs().max()),
    }
