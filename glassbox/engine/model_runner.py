"""Runs one scheduled step on the model: builds the flattened inputs and `AttentionMetadata`, runs the
forward pass, computes logits only for the rows that are needed, and samples.

A decode step whose tokens need nothing from the host can instead be launched without waiting for it
(`launch_decode`): its tokens stay on the device, where the next decode step reads them, and the host reads
them later."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from glassbox.engine.cuda_graphs import DecodeGraphs
from glassbox.engine.kv_cache import KVCache
from glassbox.engine.scheduler import ScheduledBatch
from glassbox.engine.sequence import Sequence
from glassbox.engine.step_metadata import SeqChunk, build_step_metadata, filler_prompts
from glassbox.layers.sparsity import SparsityState
from glassbox.models.loader import LoadedModel
from glassbox.sampling import SampleRequest, SampleResult, SamplingParams, device_only, sample, sample_tokens

# (token id, logprob, [(alternative id, logprob)]) for one prompt position
PromptLogprob = tuple[int, float, list[tuple[int, float]]]

# Eager steps of at least this many tokens (long prefills) run the torch.compiled layers, as the decode graphs
# do: there the unfused norms, rotary and SiLU-mul cost more than the matmuls (a 16k-token Qwen3-0.6B step on
# an H100: 33 of 66 ms), while a short prefill would pay more for entering the compiled regions than it saves.
COMPILED_MIN_TOKENS = 1024


@dataclass
class StepResult:
    sampled: dict[int, int] = field(default_factory=dict)  # batch index -> sampled token
    logprobs: dict[int, tuple[float, list[tuple[int, float]]]] = field(default_factory=dict)
    prompt_logprobs: dict[int, list[PromptLogprob]] = field(default_factory=dict)  # batch index -> new entries


@dataclass
class PendingDecode:
    """A decode step launched without waiting for it: its tokens are on the device, where the next step
    can read them, and reach the host when `token_ids()` is called."""

    seqs: list[Sequence]  # batch order
    device_tokens: torch.Tensor  # [len(seqs)] int64 on the model's device
    host_tokens: torch.Tensor  # [len(seqs)] on the host: pinned and filled asynchronously on CUDA
    ready: torch.cuda.Event | None  # recorded after the copy to the host (None off CUDA: nothing to wait for)

    def token_ids(self) -> list[int]:
        """Wait for the step, then its tokens in batch order."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.host_tokens.tolist()


class ModelRunner:
    def __init__(
        self, loaded: LoadedModel, kv_cache: KVCache, seed: int | None = None, graphs: DecodeGraphs | None = None
    ) -> None:
        self.model = loaded.model
        self.config = loaded.config
        self.device = loaded.device
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        kv_cache.bind(self.model)
        self.graphs = graphs  # CUDA graphs of decode steps (captured over this KV pool), or None
        self.use_graphs = graphs is not None  # turned off while module hooks must fire (latency timers)
        # The native CPU layers (engine/optimize.py installs them for int8); off while module hooks must fire.
        self.use_native = getattr(self.model, "glassbox_native", False)
        # Whether decode steps may be launched ahead (`launch_decode`); the engine sets it.
        self.overlap = False
        self._host_tokens = [torch.empty(0, dtype=torch.int64)] * 2  # CUDA: pinned, grown on first use
        self._turn = 0
        self.generator = torch.Generator(device=self.device)  # for sampled rows without a seed of their own
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    @torch.inference_mode()
    def execute(
        self,
        batch: ScheduledBatch,
        sample_requests: dict[int, SampleRequest],
        prompt_logprobs: dict[int, int],
    ) -> StepResult:
        """Run the batch. `sample_requests`: batch index -> how to sample that row (only for sequences
        whose last token is computed this step). `prompt_logprobs`: batch index -> top-N wanted, for
        sequences still in their prompt."""
        # Bound per step, not once: several engines may take turns on one model (see research/schedule.py).
        self.kv_cache.bind(self.model)
        input_ids: list[int] = []
        chunks: list[SeqChunk] = []
        for seq, num_new in batch.items:
            start = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[start : start + num_new])
            chunks.append(SeqChunk(seq.block_table, start, num_new))
        sparse = self._masked_sequences(batch)
        result = StepResult()
        if not sparse and self._decode_step(batch, sample_requests, prompt_logprobs) and self._graphs_fit(len(chunks)):
            with torch.profiler.record_function("glassbox::forward_graph"):
                all_logits = self.graphs.run(chunks, input_ids)  # every row samples in a decode step
        else:
            positions, meta = build_step_metadata(chunks, self.block_size, self.device)
            meta.sparsity = sparse
            meta.compiled = self._compiled_step(len(input_ids))
            meta.native = self.use_native and not sparse
            ends = meta.query_start_loc_list[1:]
            with torch.profiler.record_function("glassbox::forward"):  # names the step in profiler traces
                hidden = self.model(torch.tensor(input_ids, device=self.device), positions, meta)
            all_logits = None
        if sample_requests:
            indices = list(sample_requests)
            with torch.profiler.record_function("glassbox::sample"):
                if all_logits is not None:  # a graph step: every row samples, in order
                    logits = all_logits
                else:
                    rows = torch.tensor([ends[i] - 1 for i in indices], device=self.device)
                    logits = self.model.compute_logits(hidden[rows])
                sampled = self.sample(logits, [sample_requests[i] for i in indices])
            for i, token, logprob in zip(indices, sampled.token_ids, sampled.logprobs):
                result.sampled[i] = token
                if logprob is not None:
                    result.logprobs[i] = logprob
        for i, top_n in prompt_logprobs.items():
            seq, num_new = batch.items[i]
            result.prompt_logprobs[i] = self._prompt_logprobs(seq, num_new, hidden[ends[i] - num_new : ends[i]], top_n)
        return result

    def can_launch_decode(
        self, batch: ScheduledBatch, sample_requests: dict[int, SampleRequest], prompt_logprobs: dict[int, int]
    ) -> bool:
        """Whether `batch` can run as `launch_decode`: a decode step whose every row is sampled with nothing
        the host must apply (penalties, banned tokens) or report (logprobs)."""
        return (
            self.overlap
            and all(device_only(r) for r in sample_requests.values())
            and all(seq.sparsity is None for seq, _ in batch.items)  # (masks_step counts density: not here)
            and self._decode_step(batch, sample_requests, prompt_logprobs)
        )

    @torch.inference_mode()
    def launch_decode(
        self,
        seqs: list[Sequence],
        requests: list[SampleRequest],
        input_ids: list[int] | None = None,
        previous: PendingDecode | None = None,
    ) -> PendingDecode:
        """Launch a decode step of `seqs` (each computes the token at position seq.num_computed_tokens and
        samples the next as `requests` say) and return without waiting for the device. The inputs are
        `input_ids`, or the tokens of `previous` (a step the host has not read yet: each sequence then
        computes the token that step samples for it)."""
        self.kv_cache.bind(self.model)
        chunks = [SeqChunk(seq.block_table, seq.num_computed_tokens, 1) for seq in seqs]
        rows = None
        if previous is not None:
            index = {id(seq): row for row, seq in enumerate(previous.seqs)}
            rows = [index[id(seq)] for seq in seqs]
        source = None if previous is None else previous.device_tokens
        if self._graphs_fit(len(seqs)):
            with torch.profiler.record_function("glassbox::forward_graph"):
                logits = self.graphs.run(chunks, input_ids, source, rows)
        else:  # beyond the graphs (or with them off): on CUDA its host-built inputs wait for the device
            positions, meta = build_step_metadata(chunks, self.block_size, self.device)
            if rows is None:
                ids = torch.tensor(input_ids, device=self.device)
            else:
                ids = source[torch.tensor(rows, device=self.device)]
            with torch.profiler.record_function("glassbox::forward"):
                logits = self.model.compute_logits(self.model(ids, positions, meta))
        with torch.profiler.record_function("glassbox::sample"):
            tokens = sample_tokens(logits, requests, self.generator)
        if tokens.device.type != "cuda":
            return PendingDecode(seqs, tokens, tokens, None)
        host = self._host_buffer(len(seqs))
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return PendingDecode(seqs, tokens, host, ready)

    def _host_buffer(self, n: int) -> torch.Tensor:
        """A pinned [n] int64 buffer for a step's tokens. Two alternate: step N + 2 is launched only after
        step N's tokens were read."""
        self._turn ^= 1
        if self._host_tokens[self._turn].numel() < n:
            self._host_tokens[self._turn] = torch.empty(max(n, 256), dtype=torch.int64).pin_memory()
        return self._host_tokens[self._turn][:n]

    @staticmethod
    def _decode_step(
        batch: ScheduledBatch, sample_requests: dict[int, SampleRequest], prompt_logprobs: dict[int, int]
    ) -> bool:
        """One new token per sequence, every one sampled, no prompt logprobs."""
        return (
            len(sample_requests) == len(batch.items)
            and not prompt_logprobs
            and all(num_new == 1 for _, num_new in batch.items)
        )

    def _graphs_fit(self, num_seqs: int) -> bool:
        return self.use_graphs and self.graphs.can_run(num_seqs)

    def _masked_sequences(self, batch: ScheduledBatch) -> dict[int, SparsityState]:
        """Batch index -> mask, for the sequences whose mask drops keys at this step's length; a mask that
        keeps everything lets its sequence take the plain path (and exactly the dense output)."""
        sparse = {}
        heads, windows = self.config.num_attention_heads, self.config.layer_windows
        for i, (seq, num_new) in enumerate(batch.items):
            state = seq.sparsity
            if state is not None and state.masks_step(num_new, seq.num_computed_tokens + num_new, heads, windows):
                sparse[i] = state
        return sparse

    def _compiled_step(self, num_tokens: int) -> bool:
        """Whether an eager step of `num_tokens` tokens runs the compiled layers (not while module hooks must
        fire: `use_graphs` is off then)."""
        return self.use_graphs and getattr(self.model, "glassbox_compiled", False) and num_tokens >= COMPILED_MIN_TOKENS

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compile now, not in the first steps that need it (call after the graph capture):
        - the layers for long eager steps (CUDA graphs on): a cache-less forward of COMPILED_MIN_TOKENS tokens;
        - CUDA: the sampler's Triton draw (1.6 s with cold caches on an H100, measured in nano-vllm's
          workload), once for rows drawn straight from the model's logits (temperature only), once for
          filtered float32 rows (top_k here)."""
        if self._compiled_step(COMPILED_MIN_TOKENS):
            ids, positions, meta = filler_prompts(COMPILED_MIN_TOKENS, self.config.max_position_embeddings, self.device)
            meta.compiled = True
            self.model(ids, positions, meta)
        if self.device.type == "cuda":
            weight = next(self.model.parameters())
            hidden = torch.zeros(1, self.config.hidden_size, dtype=weight.dtype, device=self.device)
            logits = self.model.compute_logits(hidden)
            for params in (SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_k=2)):
                sample_tokens(logits, [SampleRequest(params, [], [], None)], torch.Generator(self.device))

    def sample(self, logits: torch.Tensor, requests: list[SampleRequest]) -> SampleResult:
        """logits [N, vocab] (on the model's device) -> one token per row (a method, so instruments can wrap
        it from outside)."""
        return sample(logits, requests, self.generator)

    def _prompt_logprobs(self, seq: Sequence, num_new: int, hidden: torch.Tensor, top_n: int) -> list[PromptLogprob]:
        """Logprob of each prompt token given the tokens before it, for the prompt tokens this chunk predicts."""
        start = seq.num_computed_tokens
        # Row j (position start + j) predicts the token at start + j + 1, while that is a prompt token.
        count = min(num_new, seq.num_prompt_tokens - 1 - start)
        if count <= 0:
            return []
        logprobs = torch.log_softmax(self.model.compute_logits(hidden[:count]).float(), dim=-1).cpu()
        targets = seq.token_ids[start + 1 : start + 1 + count]
        entries = []
        for row, target in zip(logprobs, targets):
            top = []
            if top_n > 0:
                values, ids = torch.topk(row, top_n)
                top = list(zip(ids.tolist(), values.tolist()))
            entries.append((target, float(row[target]), top))
        return entries
