"""CUDA graphs for decode steps: the forward pass and the LM head of a batch of one-token sequences,
captured once per bucketed batch size and replayed with new inputs.

A decode step of a small model is hundreds of kernel launches of a few microseconds each; launching them
from Python costs more than running them. A graph replays them all with one launch. The graph reads its
inputs from static buffers (ids, positions, slots, block tables, context lengths) that each step fills;
rows beyond the real batch are padding: slot -1 (nothing stored), context length 0 (output zeros).

Captured graphs hold the addresses of the KV pool they were captured with, so they belong to one engine.
Steps with prefill tokens, masked sequences or attention capture run eagerly.
"""

from __future__ import annotations

import bisect

import torch
from torch import nn

from glassbox.layers.attention import AttentionMetadata

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256)


class DecodeGraphs:
    def __init__(self, model: nn.Module, max_batch_size: int, max_blocks_per_seq: int, device: torch.device) -> None:
        self.model = model
        self.buckets = [b for b in BUCKETS if b < max_batch_size] + [min(max_batch_size, BUCKETS[-1])]
        self.max_batch_size = self.buckets[-1]
        n = self.max_batch_size
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.context_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}  # bucket -> its output buffer [bucket, vocab]

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: size + 1],
            context_lens=self.context_lens[:size],
            slot_mapping=self.slot_mapping[:size],
            block_tables=self.block_tables[:size],
            query_start_loc_list=list(range(size + 1)),
            context_lens_list=[0] * size,  # the Triton path reads the device tensor only
            compiled=True,
        )

    def _forward(self, size: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:size], self.positions[:size], self._meta(size))
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first, sharing one memory pool (as vLLM does)."""
        pool = None
        for size in reversed(self.buckets):
            self._forward(size)  # warm-up: compiles the kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[size] = self._forward(size)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def can_run(self, num_seqs: int) -> bool:
        return num_seqs <= self.max_batch_size

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """A decode step's inputs (as built for the eager path) -> logits [num_seqs, vocab]."""
        n = input_ids.shape[0]
        size = self.buckets[bisect.bisect_left(self.buckets, n)]
        width = meta.block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.slot_mapping[n:size].fill_(-1)
        self.context_lens[:n].copy_(meta.context_lens)
        self.context_lens[n:size].fill_(0)
        self.block_tables[:n, :width].copy_(meta.block_tables)
        self.graphs[size].replay()
        return self.logits[size][:n]
