"""CUDA graphs for decode steps: the forward pass and the LM head of a batch of one-token sequences,
captured once per bucketed batch size and replayed with new inputs.

A decode step of a small model is hundreds of kernel launches of a few microseconds each; launching them
from Python costs more than running them. A graph replays them all with one launch. The graph reads its
inputs from static buffers (ids, positions, slots, block tables, context lengths) that each step fills;
rows beyond the real batch are padding: slot -1 (nothing stored), context length 0 (output zeros).

Captured graphs hold the addresses of the KV pool they were captured with, so they belong to one engine.
Steps with prefill tokens, masked sequences or attention capture run eagerly. A row whose cache lost tokens
to eviction (engine/eviction.py) stores and attends by its slot count; its rotary position stays its own.
A second set, made when the first request that reads Quest's blocks decodes (`quest`: the block summaries),
takes each row's block budget per layer as one more input and keeps the summaries up to date inside the
graph; its sizes are captured as steps need them.

A step can take its input ids from tokens still on the device (`run(previous_tokens=...)`), so it can be
launched before the host has read them — the host reads and reports step N's tokens while the device runs
step N + 1. The pinned input buffers come in pairs for that: a step's inputs are filled while the previous
step's copies may still be queued.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from glassbox.engine.quest import BlockSummaries
from glassbox.engine.step_metadata import SeqChunk
from glassbox.layers.attention import AttentionMetadata, QuestStep

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256)


class DecodeGraphs:
    def __init__(
        self,
        model: nn.Module,
        forward: Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor],
        max_batch_size: int,
        max_blocks_per_seq: int,
        block_size: int,
        device: torch.device,
        quest: BlockSummaries | None = None,
    ) -> None:
        """`forward`: what each capture records before the LM head (an executor's: the compiled layers where
        there are). `quest`: Quest's summaries, for graphs of steps whose rows read chosen blocks."""
        self.model = model
        self.model_forward = forward
        self.block_size = block_size
        self.buckets = [b for b in BUCKETS if b < max_batch_size] + [min(max_batch_size, BUCKETS[-1])]
        self.max_batch_size = self.buckets[-1]
        n = self.max_batch_size
        # Static inputs (rows: input ids, positions, KV slots, each row's index in the previous step when
        # its input is that step's sampled token), and two sets of pinned host copies of them that steps
        # fill in turn and copy over asynchronously (three copies per step instead of a tensor per field).
        self.ids_positions_slots = torch.zeros(4, n, dtype=torch.int64, device=device)
        self.context_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.quest = quest
        num_layers = quest.table.shape[0] if quest is not None else 0
        self.budgets = torch.zeros(num_layers, n, dtype=torch.int32, device=device)  # [L, rows] (Quest only)
        self.host = [[torch.zeros_like(t, device="cpu").pin_memory() for t in self._inputs()] for _ in range(2)]
        self.host_tables = [BlockTableRows(host[2].numpy()) for host in self.host]
        self._turn = 0
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}  # bucket -> its output buffer [bucket, vocab]
        self.pool = None  # the memory pool the captures share

    def _inputs(self) -> list[torch.Tensor]:
        return [self.ids_positions_slots, self.context_lens, self.block_tables, *([self.budgets] if self.quest else [])]

    def _meta(self, size: int) -> AttentionMetadata:
        quest = None if self.quest is None else QuestStep(self.quest.table, self.budgets[:, :size])
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: size + 1],
            context_lens=self.context_lens[:size],
            slot_mapping=self.ids_positions_slots[2, :size],
            block_tables=self.block_tables[:size],
            query_start_loc_list=list(range(size + 1)),
            context_lens_list=[0] * size,  # the Triton path reads the device tensor only
            quest=quest,
        )

    def _forward(self, size: int) -> torch.Tensor:
        ids, positions = self.ids_positions_slots[0, :size], self.ids_positions_slots[1, :size]
        logits = self.model.compute_logits(self.model_forward(ids, positions, self._meta(size)))
        if self.quest is not None:
            self.quest.update(self.ids_positions_slots[2, :size], one_per_block=True)
        return logits

    @torch.inference_mode()
    def capture(self, sizes: list[int] | None = None) -> None:
        """Capture these buckets (all by default), largest first, sharing one memory pool (as vLLM does).
        Padding rows (slot -1, context 0) are what every row is at capture time."""
        self.ids_positions_slots[2].fill_(-1)
        self.context_lens.zero_()
        for size in sorted(sizes or self.buckets, reverse=True):
            self._forward(size)  # warm-up: compiles the kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.logits[size] = self._forward(size)
            self.pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def can_run(self, num_seqs: int) -> bool:
        return num_seqs <= self.max_batch_size

    @torch.inference_mode()
    def run(
        self,
        chunks: list[SeqChunk],
        input_ids: list[int] | None = None,
        previous_tokens: torch.Tensor | None = None,
        previous_rows: list[int] | None = None,
        budgets: dict[int, list[int]] | None = None,
    ) -> torch.Tensor:
        """A decode step (one new token per sequence) -> logits [num_seqs, vocab]. The inputs are
        `input_ids` from the host, or tokens of an earlier step still on the device: row i reads
        previous_tokens[previous_rows[i]]. The host buffers alternate, so the caller waits for step N's
        output before launching step N + 2. `budgets` (Quest graphs): row -> its block budget per layer."""
        n = len(chunks)
        size = self.buckets[bisect.bisect_left(self.buckets, n)]
        if size not in self.graphs:
            self.capture([size])
        host, tables = self.host[self._turn], self.host_tables[self._turn]
        self._turn ^= 1
        ids_positions_slots, context_lens = host[0].numpy(), host[1].numpy()
        positions = np.fromiter((c.start for c in chunks), np.int64, n)
        # A row's KV slot is its position unless an evicting method dropped tokens from its cache.
        slots = np.fromiter((c.start if c.cache_start is None else c.cache_start for c in chunks), np.int64, n)
        blocks = np.fromiter((c.block_table[slot // self.block_size] for c, slot in zip(chunks, slots)), np.int64, n)
        if previous_rows is None:
            ids_positions_slots[0, :n] = input_ids
        else:
            ids_positions_slots[3, :n] = previous_rows
        ids_positions_slots[1, :n] = positions
        ids_positions_slots[2, :n] = blocks * self.block_size + slots % self.block_size
        ids_positions_slots[2, n:size] = -1  # padding rows store nothing...
        context_lens[:n] = slots + 1
        context_lens[n:size] = 0  # ...and attend to nothing
        tables.fill([chunk.block_table for chunk in chunks])
        if self.quest is not None:
            host_budgets = host[3].numpy()
            host_budgets[:, :size] = 0
            for row, per_layer in (budgets or {}).items():
                host_budgets[:, row] = per_layer
        for device_tensor, source in zip(self._inputs(), host):
            rows = size if device_tensor is self.block_tables else len(source)
            device_tensor[:rows].copy_(source[:rows], non_blocking=True)
        if previous_rows is not None:
            ids, rows = self.ids_positions_slots[0, :n], self.ids_positions_slots[3, :n]
            torch.index_select(previous_tokens, 0, rows, out=ids)
        self.graphs[size].replay()
        return self.logits[size][:n]


class BlockTableRows:
    """Fills the rows of a block-table array [max_seqs, max_blocks] from the step's block tables, writing
    only what changed since this array was last filled. A sequence's block table only grows (blocks are
    appended) until the sequence frees it, which replaces the list; so a row that holds the same list as
    before needs its new tail at most. Writing every row in full cost ~1.6 ms a step at 256 sequences of
    64 blocks on a 2-core host, which the device waited for. Entries past a row's table are stale and are
    never read (the kernels stop at the context length)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.tables: list[list[int] | None] = [None] * array.shape[0]  # held, so no other list reuses the id
        self.lengths = [0] * array.shape[0]

    def fill(self, tables: list[list[int]]) -> None:
        for row, table in enumerate(tables):
            length, written = len(table), self.lengths[row]
            if table is not self.tables[row]:
                self.array[row, :length] = table
                self.tables[row] = table
            elif length > written:
                self.array[row, written:length] = table[written:]
            self.lengths[row] = length
