"""Stacking checkpoint tensors into our fused parameters (q/k/v -> qkv_proj, gate/up -> gate_up_proj), as a
family's `packed_modules_mapping` says (models/checkpoint_format.py).

`pack` works on any (name, value) stream — tensors, numpy arrays or just shapes — so the GGUF converter
can compute the file header from shapes and then stream the data in the same order.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from glassbox.errors import ModelLoadError
from glassbox.models.checkpoint_format import PackedModulesMapping

T = TypeVar("T")


def _part_of(name: str, mapping: PackedModulesMapping, sizes: Counter[str]) -> tuple[str, int, int] | None:
    """(stacked name, part index, number of parts) if `name` is one part of a stacked parameter."""
    for part, (stacked, index) in mapping.items():
        marker = f".{part}."
        if marker in name:
            return name.replace(marker, f".{stacked}.", 1), index, sizes[stacked]
    return None


def pack(
    items: Iterable[tuple[str, T]], mapping: PackedModulesMapping, stack: Callable[[list[T]], T]
) -> Iterator[tuple[str, T]]:
    """The items with each stacked parameter's parts replaced by stack(parts in order), yielded when the
    last part arrives."""
    sizes = Counter(stacked for stacked, _ in mapping.values())  # stacked module -> number of parts
    pending: dict[str, dict[int, T]] = {}
    for name, value in items:
        part = _part_of(name, mapping, sizes)
        if part is None:
            yield name, value
            continue
        stacked, index, count = part
        group = pending.setdefault(stacked, {})
        group[index] = value
        if len(group) == count:
            del pending[stacked]
            yield stacked, stack([group[i] for i in range(count)])
    if pending:
        raise ModelLoadError(f"the checkpoint lacks parts of {sorted(pending)[:3]} (e.g. a k_proj without its q_proj)")


def stack_shapes(shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    return (sum(s[0] for s in shapes), *shapes[0][1:])
