"""Stacking checkpoint tensors into our fused parameters (q/k/v -> qkv_proj, gate/up -> gate_up_proj).

`pack` works on any (name, value) stream — tensors, numpy arrays or just shapes — so the GGUF converter
can compute the file header from shapes and then stream the data in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from glassbox.errors import ModelLoadError

T = TypeVar("T")
PackedModules = dict[str, tuple[str, ...]]

# Per family: our stacked parameter -> the checkpoint tensors it is made of (stacked along dim 0).
# Kept here, free of torch, so the GGUF converter process does not import torch.
_LLAMA_PACKING: PackedModules = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
PACKED_MODULES: dict[str, PackedModules] = {
    "llama": _LLAMA_PACKING,
    "qwen2": _LLAMA_PACKING,
    "qwen3": _LLAMA_PACKING,
    "gpt2": {},  # the checkpoint already stacks q, k, v in c_attn
}


def _part_of(name: str, packed: PackedModules) -> tuple[str, int, int] | None:
    """(stacked name, part index, number of parts) if `name` is one part of a stacked parameter."""
    for fused, parts in packed.items():
        for index, part in enumerate(parts):
            marker = f".{part}."
            if marker in name:
                return name.replace(marker, f".{fused}.", 1), index, len(parts)
    return None


def pack(items: Iterable[tuple[str, T]], packed: PackedModules, stack: Callable[[list[T]], T]) -> Iterator[tuple[str, T]]:
    """The items with each stacked parameter's parts replaced by stack(parts in order), yielded when the
    last part arrives."""
    pending: dict[str, dict[int, T]] = {}
    for name, value in items:
        part = _part_of(name, packed)
        if part is None:
            yield name, value
            continue
        fused, index, count = part
        group = pending.setdefault(fused, {})
        group[index] = value
        if len(group) == count:
            del pending[fused]
            yield fused, stack([group[i] for i in range(count)])
    if pending:
        raise ModelLoadError(f"the checkpoint lacks parts of {sorted(pending)[:3]} (e.g. a k_proj without its q_proj)")


def stack_shapes(shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    return (sum(s[0] for s in shapes), *shapes[0][1:])
