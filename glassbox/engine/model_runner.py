"""Runs one scheduled step on the model: plans how it runs (engine/step_plan.py), builds the flattened inputs
and `AttentionMetadata`, runs the forward pass on the plan's executor, computes logits only for the rows
that are needed, and samples.

A decode step whose tokens need nothing from the host can instead be launched without waiting for it
(`launch_decode`): its tokens stay on the device, where the next decode step reads them, and the host reads
them later."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch

from glassbox.engine.cuda_graphs import DecodeGraphs
from glassbox.engine.executors import Executor, build_executors
from glassbox.engine.kv_cache import KVCache
from glassbox.engine.quest import BlockSummaries
from glassbox.engine.scheduler import ScheduledBatch
from glassbox.engine.sequence import Sequence
from glassbox.engine.step_metadata import SeqChunk, build_step_metadata, filler_prompts
from glassbox.engine.step_plan import StepPlan
from glassbox.kernels import cpu_native
from glassbox.layers.attention import AttentionMetadata, QuestStep, TritonAttentionBackend, attention_layers
from glassbox.layers.probe import StepProbe
from glassbox.layers.sparsity import SparsityMethod, SparsityState
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
    # Timed steps only (plan.timed): seconds of the forward pass and of sampling (logits included).
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class PendingDecode:
    """A decode step launched without waiting for it: its tokens are on the device, where the next step
    can read them, and reach the host when `token_ids()` is called."""

    plan: StepPlan
    batch: ScheduledBatch  # one token for each of its sequences, in row order
    device_tokens: torch.Tensor  # [rows] int64 on the model's device
    host_tokens: torch.Tensor  # [rows] on the host: pinned and filled asynchronously on CUDA
    ready: torch.cuda.Event | None  # recorded after the copy to the host (None off CUDA: nothing to wait for)

    def token_ids(self) -> list[int]:
        """Wait for the step, then its tokens in batch order."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.host_tokens.tolist()


class ModelRunner:
    def __init__(
        self,
        loaded: LoadedModel,
        kv_cache: KVCache,
        seed: int | None = None,
        compile: bool = False,
        executors: dict[str, Executor] | None = None,
    ) -> None:
        """`compile`: build the torch.compiled layers (CUDA). `executors`: these instead of the ones that
        apply to the model (a tensor-parallel rank 0 runs its own, engine/tp_runner.py)."""
        self.model = loaded.model
        self.config = loaded.config
        self.device = loaded.device
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.attention_layers = attention_layers(self.model)
        kv_cache.bind(self.attention_layers)
        # The fast paths that apply to this model here, by name; the plan of each step picks one.
        self.executors = executors if executors is not None else build_executors(self.model, self.device, compile)
        # hidden [N, hidden] -> logits [N, vocab]: the model's own method, bound once (a tensor-parallel runner
        # binds one that runs on every rank).
        self.compute_logits: Callable[[torch.Tensor], torch.Tensor] = self.model.compute_logits
        self.graphs: DecodeGraphs | None = None  # CUDA graphs of decode steps, once captured
        # Quest's block summaries, kept from the first request that reads blocks on (engine/quest.py).
        self.quest: BlockSummaries | None = None
        self.quest_graphs: DecodeGraphs | None = None  # CUDA graphs of decode steps that read Quest's blocks
        self._ahead_plans: dict[int, StepPlan] = {}  # batch size -> plan of a decode step launched ahead
        self._host_tokens = [torch.empty(0, dtype=torch.int64)] * 2  # CUDA: pinned, grown on first use
        self._turn = 0
        self.generator = torch.Generator(device=self.device)  # for sampled rows without a seed of their own
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def capture_graphs(self, max_batch_size: int, max_blocks_per_seq: int) -> None:
        """CUDA: capture decode steps of up to `max_batch_size` sequences (over this runner's KV pool, whose
        addresses the graphs keep), on the compiled layers where there are."""
        forward = (self.executors.get("compiled") or self.executors["eager"]).forward
        self.graphs = DecodeGraphs(self.model, forward, max_batch_size, max_blocks_per_seq, self.block_size, self.device)
        self.graphs.capture()
        self._graph_args = (forward, max_batch_size, max_blocks_per_seq)

    def _quest_graphs(self) -> DecodeGraphs:
        """The decode graphs of steps whose rows read Quest's blocks: made on the first such step, their sizes
        captured as steps need them (in the pool of the first)."""
        if self.quest_graphs is None:
            forward, max_batch_size, max_blocks_per_seq = self._graph_args
            self.quest_graphs = DecodeGraphs(
                self.model, forward, max_batch_size, max_blocks_per_seq, self.block_size, self.device, self.quest
            )
        return self.quest_graphs

    # ---- the plan
    def plan(
        self, batch: ScheduledBatch, num_sampled: int, prompt_logprob_rows: list[int], timed: bool = False
    ) -> StepPlan:
        """How this step runs (see engine/step_plan.py for the rule)."""
        masked, quest = self._sparse_rows(batch, timed)
        sizes, logprob_rows = (len(batch.items), batch.num_tokens, num_sampled), tuple(prompt_logprob_rows)
        observed = tuple(i for i in masked if batch.items[i][0].sparsity.observes)
        if observed and len(observed) == len(masked):  # masked only to observe: the native stack writes that
            plan = self._plan(*sizes, (), logprob_rows, timed, launched_ahead=False, quest=quest)
            if plan.executor == "native_stack":
                return dataclasses.replace(plan, observed_rows=observed)
        return self._plan(*sizes, masked, logprob_rows, timed, launched_ahead=False, quest=quest)

    def plan_ahead(self, num_seqs: int, quest: dict[int, list[int]] | None = None) -> StepPlan:
        """The plan of a decode step launched ahead of the host (`launch_decode`): every row sampled, none
        masked or timed (the engine checked); `quest`: rows that read Quest's blocks (row -> budget per
        layer). Without them the same at every step of a batch size, so made once per size: a CUDA-graph
        decode step of a small model feels every microsecond of the host's."""
        if quest:
            return self._plan(num_seqs, num_seqs, num_seqs, (), (), False, True, quest=quest)
        plan = self._ahead_plans.get(num_seqs)
        if plan is None:
            plan = self._ahead_plans[num_seqs] = self._plan(num_seqs, num_seqs, num_seqs, (), (), False, True)
        return plan

    def _plan(
        self,
        num_seqs: int,
        num_tokens: int,
        num_sampled: int,
        masked: tuple[int, ...],
        prompt_logprob_rows: tuple[int, ...],
        timed: bool,
        launched_ahead: bool,
        quest: dict[int, list[int]] | None = None,
    ) -> StepPlan:
        """`quest`: row -> its block budget per layer (reads only chosen blocks). Rows whose caches lost
        tokens to eviction run on the graphs too: they give each row's slot count (SeqChunk.cache_start)."""
        decode = num_tokens == num_seqs and num_sampled == num_seqs and not prompt_logprob_rows
        if timed:
            executor, reason = "eager", "latency timers on"
        elif masked and self._compiled_fits(num_tokens):
            executor, reason = "compiled", f"masked rows, {num_tokens} tokens >= {COMPILED_MIN_TOKENS}"
        elif masked:
            executor, reason = "eager", "masked rows need the readable attention"
        elif quest and decode and self.graphs is not None and self.graphs.can_run(num_seqs):
            executor, reason = "cuda_graph", "decode step reading Quest's blocks, on its own graphs"
        elif quest and self.graphs is not None:
            executor, reason = "eager", "rows read Quest's blocks beyond the graphs' sizes"
        elif decode and self.graphs is not None and self.graphs.can_run(num_seqs):
            executor, reason = "cuda_graph", "decode step within the captured sizes"
        elif "native_stack" in self.executors and self.kv_cache.dtype in cpu_native.CACHE_DTYPES:
            executor, reason = "native_stack", "native CPU layers"
        elif "native_layers" in self.executors:
            executor, reason = "native_layers", f"native CPU layers, one by one over a {self.kv_cache.dtype} cache"
        elif self._compiled_fits(num_tokens):
            executor, reason = "compiled", f"{num_tokens} tokens >= {COMPILED_MIN_TOKENS}"
        else:
            executor, reason = "eager", "no fast path applies"
        return StepPlan(
            executor, reason, num_seqs, num_tokens, num_sampled, masked, prompt_logprob_rows, timed, launched_ahead,
            quest or {},
        )  # fmt: skip

    def _compiled_fits(self, num_tokens: int) -> bool:
        """Long eager steps run the compiled layers where the decode graphs do (CUDA, compile on)."""
        return "compiled" in self.executors and self.graphs is not None and num_tokens >= COMPILED_MIN_TOKENS

    def _sparse_rows(self, batch: ScheduledBatch, timed: bool) -> tuple[tuple[int, ...], dict[int, list[int]]]:
        """The batch rows whose mask drops keys at this step's length (a mask that keeps everything lets its
        sequence take the plain path, and exactly the dense output), and the rows that read only chosen KV
        blocks (Quest's decode tokens on the kernels: row -> budget per layer). A method that reads blocks
        leaves the prompt dense; where the kernels cannot run a step (it is masked or timed anyway, or a
        mixed step on CUDA) its decode tokens take the mask form, which reads the same keys."""
        heads, windows = self.config.num_attention_heads, self.config.layer_windows
        masked, quest = [], {}
        for i, (seq, num_new) in enumerate(batch.items):
            state = seq.sparsity
            if state is None:
                continue
            context_len = seq.num_computed_tokens + num_new
            if state.method.declares_block_reads() and not state.evicting:
                if context_len <= seq.num_prompt_tokens:
                    state.count_dense(num_new, context_len, heads, windows)
                    continue
                if num_new == 1 and self.quest is not None and self.reads_blocks(state.method):
                    quest[i] = context_len
                    continue
            if state.masks_step(num_new, context_len, heads, windows):
                masked.append(i)
        mixed_on_cuda = self.device.type == "cuda" and batch.num_tokens != len(batch.items)
        if quest and (masked or timed or mixed_on_cuda):
            masked += [i for i in quest if batch.items[i][0].sparsity.masks_step(1, quest[i], heads, windows)]
            quest = {}
        budgets = {i: self.row_budgets(batch.items[i][0].sparsity, context_len) for i, context_len in quest.items()}
        return tuple(sorted(masked)), budgets

    def row_budgets(self, state: SparsityState, context_len: int) -> list[int]:
        """A decode row that reads Quest's chosen blocks: its block budget per layer (the keys it reads
        counted in `state`)."""
        cfg = self.config
        return state.read_blocks(context_len, cfg.num_hidden_layers, self.block_size, cfg.num_attention_heads)

    def reads_blocks(self, method: SparsityMethod) -> bool:
        """Whether `method`'s decode tokens read only their chosen blocks here: it reads blocks of the KV
        cache's block size, and a kernel that reads them runs this model (the native CPU attention over a
        float32/bfloat16 cache, or Triton), without sliding windows of its own."""
        kernels = (
            any(name in self.executors for name in ("native_stack", "native_layers"))
            and self.kv_cache.dtype in cpu_native.CACHE_DTYPES
        ) or isinstance(self.attention_layers[0].backend, TritonAttentionBackend)
        return (
            method.declares_block_reads()
            and getattr(method, "block_size", None) == self.block_size
            and kernels
            and not any(self.config.layer_windows)
        )

    def keep_block_summaries(self, running: list[Sequence]) -> None:
        """Keep Quest's block summaries from now on (`running`: the sequences whose blocks hold keys)."""
        if self.quest is None:
            self.quest = BlockSummaries(self.kv_cache, running)

    # ---- running it
    @torch.inference_mode()
    def execute(
        self,
        plan: StepPlan,
        batch: ScheduledBatch,
        sample_requests: dict[int, SampleRequest],
        prompt_logprobs: dict[int, int],
    ) -> StepResult:
        """Run the batch as `plan` says. `sample_requests`: batch index -> how to sample that row (only for
        sequences whose last token is computed this step). `prompt_logprobs`: batch index -> top-N wanted,
        for sequences still in their prompt."""
        # Bound per step, not once: several engines may take turns on one model (see research/schedule.py).
        self.kv_cache.bind(self.attention_layers)
        input_ids: list[int] = []
        chunks: list[SeqChunk] = []
        for seq, num_new in batch.items:
            start = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[start : start + num_new])
            chunks.append(SeqChunk(seq.block_table, start, num_new, seq.num_kv_slots))
        result = StepResult()
        clock = _Clock(plan.timed, self.device)
        meta = None
        if plan.executor == "cuda_graph":
            graphs = self._quest_graphs() if plan.quest else self.graphs
            with torch.profiler.record_function("glassbox::forward_graph"), _named(plan):
                all_logits = graphs.run(chunks, input_ids, budgets=plan.quest)  # every row samples in a decode step
        else:
            positions, meta = build_step_metadata(chunks, self.block_size, self.device)
            if plan.masked_rows:
                meta.probe = StepProbe(masks={i: batch.items[i][0].sparsity for i in plan.masked_rows})
            meta.quest = self._quest_step(plan)
            if plan.observed_rows:
                meta.observe = self._observe_buffers(plan.observed_rows, meta)
            ends = meta.query_start_loc_list[1:]
            # Names the step and its executor in profiler traces.
            with torch.profiler.record_function("glassbox::forward"), _named(plan):
                hidden = self.executors[plan.executor].forward(torch.tensor(input_ids, device=self.device), positions, meta)
            all_logits = None
            for row, i in enumerate(plan.observed_rows):  # [L, KV, context]: what each slot received
                received = meta.observe[1][:, row, :, : meta.context_lens_list[i]]
                batch.items[i][0].sparsity.slots.receive(received)
        self._summarize(plan, chunks, meta)
        clock.lap(result.seconds, "forward")
        if sample_requests:
            indices = list(sample_requests)
            with torch.profiler.record_function("glassbox::sample"):
                if all_logits is not None:  # a graph step: every row samples, in order
                    logits = all_logits
                else:
                    rows = torch.tensor([ends[i] - 1 for i in indices], device=self.device)
                    logits = self.compute_logits(hidden[rows])
                sampled = self.sample(logits, [sample_requests[i] for i in indices])
            for i, token, logprob in zip(indices, sampled.token_ids, sampled.logprobs):
                result.sampled[i] = token
                if logprob is not None:
                    result.logprobs[i] = logprob
            clock.lap(result.seconds, "sample")
        for i, top_n in prompt_logprobs.items():
            seq, num_new = batch.items[i]
            result.prompt_logprobs[i] = self._prompt_logprobs(seq, num_new, hidden[ends[i] - num_new : ends[i]], top_n)
        return result

    @torch.inference_mode()
    def launch_decode(
        self,
        plan: StepPlan,
        batch: ScheduledBatch,
        requests: list[SampleRequest],
        input_ids: list[int] | None = None,
        previous: PendingDecode | None = None,
    ) -> PendingDecode:
        """Launch a decode step of the batch's sequences (each computes the token at position
        seq.num_computed_tokens and samples the next as `requests` say) and return without waiting for the
        device. The inputs are `input_ids`, or the tokens of `previous` (a step the host has not read yet:
        each sequence then computes the token that step samples for it)."""
        self.kv_cache.bind(self.attention_layers)
        seqs = [seq for seq, _ in batch.items]
        # (A sequence that evicts is never launched ahead: its eviction runs on the host between steps.)
        chunks = [SeqChunk(seq.block_table, seq.num_computed_tokens, 1) for seq in seqs]
        rows = None
        if previous is not None:
            index = {id(seq): row for row, (seq, _) in enumerate(previous.batch.items)}
            rows = [index[id(seq)] for seq in seqs]
        source = None if previous is None else previous.device_tokens
        meta = None
        if plan.executor == "cuda_graph":
            graphs = self._quest_graphs() if plan.quest else self.graphs
            with torch.profiler.record_function("glassbox::forward_graph"), _named(plan):
                logits = graphs.run(chunks, input_ids, source, rows, budgets=plan.quest)
        else:  # beyond the graphs (or with them off): on CUDA its host-built inputs wait for the device
            positions, meta = build_step_metadata(chunks, self.block_size, self.device)
            meta.quest = self._quest_step(plan)
            if rows is None:
                ids = torch.tensor(input_ids, device=self.device)
            else:
                ids = source[torch.tensor(rows, device=self.device)]
            with torch.profiler.record_function("glassbox::forward"), _named(plan):
                logits = self.compute_logits(self.executors[plan.executor].forward(ids, positions, meta))
        self._summarize(plan, chunks, meta)
        with torch.profiler.record_function("glassbox::sample"):
            tokens = sample_tokens(logits, requests, self.generator)
        if tokens.device.type != "cuda":
            return PendingDecode(plan, batch, tokens, tokens, None)
        host = self._host_buffer(len(seqs))
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return PendingDecode(plan, batch, tokens, host, ready)

    def _observe_buffers(self, rows: tuple[int, ...], meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """The native stack's inputs for observed rows (their one token each): each token's row of the output
        or -1, and the output [num_layers, rows, KV, widest context] of zeros."""
        token_rows = torch.full((len(meta.slot_mapping),), -1, dtype=torch.int32)
        for row, i in enumerate(rows):
            token_rows[meta.query_start_loc_list[i]] = row
        width = max(meta.context_lens_list[i] for i in rows)
        num_layers, _, _, num_kv, _ = self.kv_cache.k.shape
        return token_rows, torch.zeros(num_layers, len(rows), num_kv, width)

    def _quest_step(self, plan: StepPlan) -> QuestStep | None:
        """The step's Quest inputs: the summaries once kept (the native attention keeps them up to date), and
        the budgets [num_layers, S] of its rows (0: all blocks) where some row reads blocks."""
        if self.quest is None:
            return None
        budgets = None
        if plan.quest:
            rows = torch.zeros(plan.num_seqs, self.config.num_hidden_layers, dtype=torch.int32)
            for i, per_layer in plan.quest.items():
                rows[i] = torch.tensor(per_layer, dtype=torch.int32)
            budgets = rows.T.contiguous().to(self.device)
        return QuestStep(self.quest.table, budgets)

    def _summarize(self, plan: StepPlan, chunks: list[SeqChunk], meta: AttentionMetadata | None) -> None:
        """Fold the step's new keys into Quest's block summaries where its attention did not (any path but
        the native CPU one). `meta`: the step's metadata, None for a graph step."""
        if self.quest is None or (plan.executor in ("native_stack", "native_layers") and self.kv_cache.dtype in cpu_native.CACHE_DTYPES):
            return
        if plan.executor == "cuda_graph" and plan.quest:  # (the Quest graphs update them themselves)
            return
        if meta is None:
            meta = build_step_metadata(chunks, self.block_size, self.device)[1]
        self.quest.update(meta.slot_mapping, one_per_block=plan.kind == "decode")

    @staticmethod
    def can_launch_ahead(plan: StepPlan, sample_requests: dict[int, SampleRequest]) -> bool:
        """Whether a planned step can run as `launch_decode`: a decode step, nothing masked or timed, whose
        every row is sampled with nothing the host must apply (penalties, banned tokens) or report
        (logprobs)."""
        return (
            plan.kind == "decode"
            and not plan.prompt_logprob_rows
            and not plan.masked_rows
            and (not plan.quest or plan.executor == "cuda_graph")  # (Quest's rows: on its graphs)
            and not plan.timed
            and all(device_only(r) for r in sample_requests.values())
        )

    def _host_buffer(self, n: int) -> torch.Tensor:
        """A pinned [n] int64 buffer for a step's tokens. Two alternate: step N + 2 is launched only after
        step N's tokens were read."""
        self._turn ^= 1
        if self._host_tokens[self._turn].numel() < n:
            self._host_tokens[self._turn] = torch.empty(max(n, 256), dtype=torch.int64).pin_memory()
        return self._host_tokens[self._turn][:n]

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compile now, not in the first steps that need it (call after the graph capture):
        - the layers for long eager steps (CUDA graphs on): a cache-less forward of COMPILED_MIN_TOKENS tokens;
        - CUDA: the sampler's Triton draw (1.6 s with cold caches on an H100, measured in nano-vllm's
          workload), once for rows drawn straight from the model's logits (temperature only), once for
          filtered float32 rows (top_k here)."""
        if self._compiled_fits(COMPILED_MIN_TOKENS):
            ids, positions, meta = filler_prompts(COMPILED_MIN_TOKENS, self.config.max_position_embeddings, self.device)
            self.executors["compiled"].forward(ids, positions, meta)
        if self.device.type == "cuda":
            weight = next(self.model.parameters())
            hidden = torch.zeros(1, self.config.hidden_size, dtype=weight.dtype, device=self.device)
            logits = self.compute_logits(hidden)
            for params in (SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_k=2)):
                sample_tokens(logits, [SampleRequest(params, [], [], None)], torch.Generator(self.device))

    def run_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """A forward pass outside the step loop, on the model's readable path (research tools: attention
        capture); hidden [T, hidden]. Under tensor parallelism it runs on every rank."""
        return self.model(input_ids, positions, meta)

    def check_alive(self) -> None:
        """Raise if the runner cannot run another step (a tensor-parallel rank is gone); checked while idle."""

    def shutdown(self) -> None:
        """Release what the runner started (a tensor-parallel runner's worker processes)."""

    def sample(self, logits: torch.Tensor, requests: list[SampleRequest]) -> SampleResult:
        """logits [N, vocab] (on the model's device) -> one token per row."""
        return sample(logits, requests, self.generator)

    def _prompt_logprobs(self, seq: Sequence, num_new: int, hidden: torch.Tensor, top_n: int) -> list[PromptLogprob]:
        """Logprob of each prompt token given the tokens before it, for the prompt tokens this chunk predicts."""
        start = seq.num_computed_tokens
        # Row j (position start + j) predicts the token at start + j + 1, while that is a prompt token.
        count = min(num_new, seq.num_prompt_tokens - 1 - start)
        if count <= 0:
            return []
        logprobs = torch.log_softmax(self.compute_logits(hidden[:count]).float(), dim=-1).cpu()
        targets = seq.token_ids[start + 1 : start + 1 + count]
        entries = []
        for row, target in zip(logprobs, targets):
            top = []
            if top_n > 0:
                values, ids = torch.topk(row, top_n)
                top = list(zip(ids.tolist(), values.tolist()))
            entries.append((target, float(row[target]), top))
        return entries


def _named(plan: StepPlan) -> AbstractContextManager:
    """A profiler region named after the step's executor, while a profiler runs (a region costs ~5 us a
    step, which a CUDA-graph decode step of a small model would feel)."""
    return torch.profiler.record_function(plan.label) if torch.autograd._profiler_enabled() else nullcontext()


class _Clock:
    """Laps of a timed step (plan.timed), in seconds; on CUDA the device is synchronized before each reading.
    Does nothing for untimed steps."""

    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.enabled = enabled
        self.sync = torch.cuda.synchronize if device.type == "cuda" and enabled else None
        if self.sync is not None:
            self.sync()
        self.last = time.perf_counter() if enabled else 0.0

    def lap(self, into: dict[str, float], name: str) -> None:
        if not self.enabled:
            return
        if self.sync is not None:
            self.sync()
        now = time.perf_counter()
        into[name] = now - self.last
        self.last = now
