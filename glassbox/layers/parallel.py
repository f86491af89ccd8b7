"""Tensor-parallel layers (Megatron-LM's split, as vLLM and nano-vllm run it), and the communicator they call.

Each rank holds a slice of every weight and the hidden states between layers are whole on every rank:
- column-parallel (q/k/v, gate/up): a plain `nn.Linear` over this rank's output rows; its output stays
  split (this rank's heads, this rank's intermediate features) and needs no communication;
- row-parallel (o_proj, down_proj): a linear over this rank's input columns gives a partial product, and
  `AllReduceOutput` (a forward hook) sums the ranks' partials; the bias lives on rank 0 only, so it is summed
  in once;
- `VocabParallelEmbedding`: this rank's rows of the vocabulary; ids outside it give zeros, an all-reduce
  fills them in from the rank that holds them;
- the LM head: a linear over this rank's vocabulary rows, its logits gathered on rank 0 (the one that
  samples) by `GatherLogits` (a forward hook).
The linears themselves stay plain `nn.Linear` until the engine makes them float column-major or
block-quantized (engine/optimize.py), which is why the collectives are hooks around them, attached after.

The layers and hooks take their `Communicator` as an argument (no process-group global read deep in a layer).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def shard_range(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of rank's share of `size` items split as evenly as can be, the first ranks taking one more
    (3 KV heads over 2 ranks: [0, 2) and [2, 3))."""
    base, extra = divmod(size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class Communicator:
    """The collectives of one tensor-parallel group, counting the seconds and bytes they take (for the
    comm share of a step: research/latency.py and bench/parallel.py read `seconds` and `bytes`)."""

    def __init__(self, group: dist.ProcessGroup | None, rank: int, world_size: int) -> None:
        self.default_group = group
        # A thread may run its collectives on a group of its own (`using`): two micro-batches on two threads
        # then overlap one's all-reduce with the other's compute (research/overlap.py), each group keeping
        # its collectives in its thread's order.
        self._thread = threading.local()
        self.rank = rank
        self.world_size = world_size
        self.seconds = 0.0  # spent inside collectives since the last `reset`
        self.bytes = 0  # sent by this rank's collectives since the last `reset` (payload, not the wire)
        self.calls = 0
        # Rank 0 runs collectives only inside a step it has sent to the workers (`in_step`); one outside
        # (a research tool calling the sharded model directly) would wait for ever for ranks that never come.
        self.open = rank != 0

    @property
    def group(self) -> dist.ProcessGroup | None:
        return getattr(self._thread, "group", self.default_group)

    @contextmanager
    def using(self, group: dist.ProcessGroup) -> Iterator[None]:
        """This thread's collectives go to `group` inside the block."""
        self._thread.group = group
        try:
            yield
        finally:
            del self._thread.group

    @contextmanager
    def in_step(self) -> Iterator[None]:
        """Rank 0: the workers were sent the call made inside this block."""
        self.open = True
        try:
            yield
        finally:
            self.open = self.rank != 0

    def reset(self) -> tuple[float, int, int]:
        """(seconds, bytes, calls) since the last reset, and start counting again."""
        counts = (self.seconds, self.bytes, self.calls)
        self.seconds, self.bytes, self.calls = 0.0, 0, 0
        return counts

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place; every rank gets the same result."""
        self._check_open()
        start = time.perf_counter()
        with _profiled("glassbox::communication[all_reduce]"):
            dist.all_reduce(x, group=self.group)
        self._count(start, x)
        return x

    def gather_to_first(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """Rank 0 gets every rank's x (same shape on all ranks), in rank order; the others get None."""
        self._check_open()
        start = time.perf_counter()
        parts = [torch.empty_like(x) for _ in range(self.world_size)] if self.rank == 0 else None
        group = self.group
        with _profiled("glassbox::communication[gather]"):
            dist.gather(x.contiguous(), parts, dst=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
        self._count(start, x)
        return parts

    def _check_open(self) -> None:
        if not self.open:
            raise RuntimeError(
                "a tensor-parallel layer ran on rank 0 alone, outside a step sent to the workers: under "
                "tensor parallelism call the model through the engine's runner (runner.run_forward)"
            )

    def _count(self, start: float, x: torch.Tensor) -> None:
        self.seconds += time.perf_counter() - start
        self.bytes += x.numel() * x.element_size()
        self.calls += 1


def _profiled(name: str) -> AbstractContextManager:
    """A profiler region (communication as its own row in a trace), only while a profiler runs."""
    return torch.profiler.record_function(name) if torch.autograd._profiler_enabled() else nullcontext()


class AllReduceOutput:
    """A forward hook that makes a linear row-parallel: its output x_r · W_rᵀ (x_r [T, in_local] this rank's
    slice of the input features — its heads' attention output, its intermediate features — W_r
    [out, in_local], the bias on rank 0 only) summed over the ranks, whole on every rank. A hook, not a
    subclass: the linear stays whatever the engine made of it (float column-major, or block-quantized
    QLinear: engine/optimize.py swaps nn.Linear modules), and this sums its output."""

    def __init__(self, comm: Communicator) -> None:
        self.comm = comm

    def __call__(self, module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(output)


class GatherLogits:
    """A forward hook on the LM head over this rank's vocabulary rows ([rows, hidden], rows = ceil(vocab /
    ranks), the last rank's padded with zeros): the logits [N, vocab] gathered on rank 0; the other ranks get
    an empty [N, 0] tensor (they do not sample)."""

    def __init__(self, comm: Communicator, vocab_size: int) -> None:
        self.comm = comm
        self.vocab_size = vocab_size

    def __call__(self, module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        parts = self.comm.gather_to_first(output)
        if parts is None:
            return output.new_empty(output.shape[0], 0)
        return torch.cat(parts, dim=-1)[:, : self.vocab_size]


def vocab_rows(full: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """This rank's rows [rank * rows, (rank + 1) * rows) of a [vocab, hidden] table, rows = ceil(vocab / ranks),
    zero-padded on the last rank so that every rank's slice has the same shape (a gather needs it)."""
    rows = -(-full.shape[0] // comm.world_size)
    shard = torch.zeros(rows, full.shape[1], dtype=full.dtype, device=full.device)
    local = full[comm.rank * rows : (comm.rank + 1) * rows]
    shard[: local.shape[0]] = local
    return shard


class VocabParallelEmbedding(nn.Embedding):
    """This rank's rows of the embedding table (`vocab_rows`): ids outside them look up zeros, and an
    all-reduce fills them in from the rank that holds them."""

    def __init__(self, full: torch.Tensor, comm: Communicator) -> None:
        shard = vocab_rows(full, comm)
        self.vocab_size = full.shape[0]
        self.start = comm.rank * shard.shape[0]
        super().__init__(shard.shape[0], full.shape[1], _weight=shard)
        self.weight.requires_grad_(False)
        self.comm = comm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] -> [T, hidden], whole on every rank."""
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.comm.all_reduce(x.masked_fill_(outside[:, None], 0))
