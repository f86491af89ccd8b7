"""The synchronous engine core: requests in, one batched forward pass per `step()`, outputs out.

    engine = LLMEngine(load_model(None), EngineConfig())
    engine.add_request("Hello", SamplingParams(max_tokens=8))
    while engine.has_unfinished_requests():
        for out in engine.step(): ...

A step is vLLM v1's `EngineCore.step`: the scheduler picks the batch, the runner plans and executes it,
`scheduler.update_from_output` appends the tokens and ends finished sequences, and the output processor
turns tokens into text and outputs. With async scheduling the next decode step is launched before the
host reads the previous one's tokens (`_step_launched`), still scheduled by the scheduler.

A step that raises fails the requests it was running (their blocks freed, each output carrying a
`RequestError` that says whose fault it was) and the engine goes on; an algorithm of the plugin file that
raised is reported (`ALGORITHMS.report_fault`) so that it is unloaded. Only when failures repeat step after
step, or the device is lost, does `step()` raise `EngineFatalError`: the engine cannot go on.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

import torch

from glassbox.algorithms import ALGORITHMS, AlgorithmFault
from glassbox.config import EngineConfig
from glassbox.engine.batch_invariant import apply_batch_invariant
from glassbox.engine.block_manager import BlockManager, PrefixCacheStats
from glassbox.engine.eviction import KVEvictor
from glassbox.engine.executors import Executor
from glassbox.engine.kv_cache import KVCache
from glassbox.engine.model_runner import COMPILED_MIN_TOKENS, ModelRunner, PendingDecode
from glassbox.engine.optimize import num_parameters, optimize_model, resolve_activations, resolve_kv_cache_dtype
from glassbox.engine.output_processor import OutputProcessor, RequestError, RequestOutput, RequestState, TokenLogprobs
from glassbox.engine.scheduler import ScheduledBatch, Scheduler
from glassbox.engine.sequence import Sequence
from glassbox.engine.step_plan import StepPlan
from glassbox.errors import FieldError, RankLostError
from glassbox.kernels import cpu_native
from glassbox.layers.attention import TritonAttentionBackend, set_attention_backend
from glassbox.layers.sparsity import SparsityMethod, SparsityState
from glassbox.models.loader import LoadedModel
from glassbox.sampling import SampleRequest, SamplingParams, device_only

logger = logging.getLogger(__name__)

__all__ = ["EngineFatalError", "LLMEngine", "RequestError", "RequestOutput", "RequestState", "StepObserver", "TokenLogprobs"]

# Steps failing one after another: past this many the fault is not in the requests (they were failed) but
# in the engine, and it stops instead of failing every request that arrives.
MAX_CONSECUTIVE_FAILED_STEPS = 8
# An error whose message says the device is gone: nothing on it can be trusted any more.
DEVICE_LOST = ("CUDA error", "device-side assert", "CUBLAS_STATUS", "illegal memory access")


NO_MASKS_UNDER_TENSOR_PARALLELISM = "masks do not run under tensor parallelism yet; serve with tensor_parallel_size=1"


class EngineFatalError(RuntimeError):
    """The engine cannot go on: its steps keep failing, or its device is lost. The server must stop."""


class StepObserver(Protocol):
    """A research instrument that watches steps (research/latency.py). While one is attached, steps are
    timed: they run the eager executor, so module hooks fire, and report their stages' seconds."""

    def on_stage(self, stage: str, seconds: float) -> None: ...

    def on_step(self, plan: StepPlan, seconds: dict[str, float]) -> None: ...


class LLMEngine:
    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig | None = None,
        beside: LLMEngine | None = None,
        kv_cache: KVCache | None = None,
        executors: dict[str, Executor] | None = None,
    ) -> None:
        """`beside`: a serving engine over the same model, this one being a research run's private engine:
        the model is prepared already and its facts are taken from there, not walked again (each walk of
        the model's modules is ~1-3 ms on the engine thread, and thousands of events in a with_stack
        profile). `kv_cache`: this pool instead of one sized from the config (a research run allocates it
        off the engine thread). `executors`: the runner's, instead of those that apply to the model."""
        if beside is not None and beside.loaded is not loaded:
            raise ValueError("beside: an engine over another model")
        if kv_cache is not None and (kv_cache.block_size != (config or EngineConfig()).block_size):
            raise ValueError(f"kv_cache: blocks of {kv_cache.block_size} tokens, the config's are {(config or EngineConfig()).block_size}")
        self.loaded = loaded
        config = config or EngineConfig()
        # ("auto" activations resolved once: /model_info and the tensor-parallel ranks report what runs)
        self.config = replace(config, activations=resolve_activations(config.activations, config.quantization, loaded.device))
        self.tokenizer = loaded.tokenizer
        self.max_model_len = min(
            self.config.max_model_len or loaded.config.max_position_embeddings, loaded.config.max_position_embeddings
        )
        cfg = self.config
        on_cuda = loaded.device.type == "cuda"
        self.tensor_parallel_size = cfg.tensor_parallel_size
        # The whole model's, read before quantizing or sharding (/model_info; quantized weights count as the
        # weights they stand for, a tied head once).
        self.num_parameters = (
            beside.num_parameters if beside is not None else num_parameters(loaded.model, loaded.config.tie_word_embeddings)
        )
        tensor_parallel = cfg.tensor_parallel_size > 1 or cfg.distributed
        if tensor_parallel and (beside is not None or kv_cache is not None or executors is not None):
            raise ValueError("beside, kv_cache and executors are for a private engine in the serving process, not tensor parallelism")
        # Rank 0 of a process group: every model call goes through the runner, which sends it to the ranks.
        self.distributed = tensor_parallel
        if beside is not None:
            if (cfg.quantization, cfg.activations) != (beside.config.quantization, beside.config.activations):
                raise ValueError("beside: the model is prepared for the serving engine's quantization and activations")
        elif not tensor_parallel:  # tensor-parallel ranks shard the float weights first (engine/tp_runner.py)
            optimize_model(loaded.model, cfg.quantization, cfg.activations)
        if loaded.device.type == "cpu" and beside is None:
            cpu_native.keep_freed_memory()
        if on_cuda:
            set_attention_backend(loaded.model, TritonAttentionBackend())
        if cfg.batch_invariant:  # after the layout and the backend, before the runner builds executors and graphs
            apply_batch_invariant(loaded.model, loaded.device)
        kv_dtype = resolve_kv_cache_dtype(cfg.kv_cache_dtype, cfg.activations, loaded.dtype)
        if kv_dtype == torch.float8_e4m3fn and on_cuda and torch.cuda.get_device_capability(loaded.device) < (8, 9):
            raise ValueError("kv_cache_dtype fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper)")
        if kv_dtype != torch.float8_e4m3fn and on_cuda and loaded.dtype != kv_dtype:
            raise ValueError(
                f"kv_cache_dtype {cfg.kv_cache_dtype} on CUDA needs a {cfg.kv_cache_dtype} model "
                "(the kernels read the cache in the model's dtype)"
            )
        self.runner: ModelRunner
        if tensor_parallel:
            from glassbox.engine.tp_runner import start_tensor_parallel

            self.kv_cache, self.runner = start_tensor_parallel(loaded, cfg, kv_dtype, cfg.seed)
        elif kv_cache is not None:
            self.kv_cache = kv_cache
        elif cfg.num_kv_blocks is not None:
            self.kv_cache = KVCache(loaded.config, cfg.num_kv_blocks, cfg.block_size, kv_dtype, loaded.device)
        elif cfg.kv_cache_memory is None and on_cuda:
            self.kv_cache = KVCache.for_free_device_memory(
                loaded.config, loaded.model, cfg.gpu_memory_utilization, cfg.max_num_batched_tokens,
                cfg.block_size, kv_dtype, loaded.device,
            )
        else:
            self.kv_cache = KVCache.for_memory(
                loaded.config, cfg.kv_cache_memory or 1 << 30, cfg.block_size, kv_dtype, loaded.device
            )
        self.block_manager = BlockManager(self.kv_cache.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.scheduling_policy, self.max_model_len
        )
        # Frees the blocks of what sliding_window and h2o drop, after each step (engine/eviction.py).
        self.evictor = KVEvictor(self.kv_cache, self.block_manager, loaded.config.num_attention_heads)
        if not tensor_parallel:
            self.runner = ModelRunner(loaded, self.kv_cache, cfg.seed, compile=on_cuda and cfg.compile, executors=executors)
        graphs = on_cuda and not cfg.enforce_eager and not tensor_parallel
        if graphs:
            self.runner.capture_graphs(cfg.max_num_seqs, -(-self.max_model_len // cfg.block_size))
        # Launch decode step N + 1 before the host reads step N's tokens (see step()).
        self.async_scheduling = graphs if cfg.async_scheduling is None else cfg.async_scheduling
        self.runner.warm_up()
        self.output_processor = OutputProcessor(self.tokenizer)
        self.observers: list[StepObserver] = []  # attached instruments: their steps are timed
        # Called after every step, changing nothing in how it runs (the profiler counts its steps with one).
        self.step_hooks: list[Callable[[LLMEngine], None]] = []
        self.last_plan: StepPlan | None = None
        self.executor_counts: Counter[str] = Counter()  # steps run by each executor, since start
        self.requests: dict[str, RequestState] = {}
        self.eos_token_ids = set(loaded.config.eos_token_ids) | (
            {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        )
        self._ids = itertools.count()
        self.num_steps = 0  # forward passes launched
        self._pending: PendingDecode | None = None  # a decode step whose tokens the host has not read yet
        # Applied to new requests that name no sparsity of their own (POST /optimization/sparsity_mask).
        self.default_sparsity: SparsityMethod | None = None
        self.num_failed_steps = 0
        self._consecutive_failed_steps = 0
        self._step_seqs: list[Sequence] | None = None  # the sequences the step in progress runs
        if graphs:
            self._warm_up_chunked_prefill()

    def _warm_up_chunked_prefill(self) -> None:
        """CUDA: one prompt longer than the step budget, so that its prefill is split and its second chunk
        runs the compiled layers over cached keys. Otherwise the first real workload builds that path in
        its third step (0.6-0.9 s on the H200 with cold caches; bench/gpu_cold.py's cold/warm ratio went
        from 0.87-0.95 to 0.995). The engine's counters and prefix cache are reset after it."""
        budget = self.scheduler.max_num_batched_tokens
        length = budget + COMPILED_MIN_TOKENS
        blocks = -(-(length + 1) // self.config.block_size)
        if budget < COMPILED_MIN_TOKENS or length + 1 > self.max_model_len or blocks > self.kv_cache.num_blocks:
            return
        self.add_request([0] * length, SamplingParams(max_tokens=1, ignore_eos=True), request_id="warm-up")
        while self.has_unfinished_requests():
            self.step()
        self.block_manager.reset_prefix_cache()
        self.block_manager.stats = PrefixCacheStats()
        self.num_steps, self.last_plan = 0, None
        self.executor_counts.clear()

    # ---- requests
    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not self.observers:
                return self.tokenizer.encode(prompt)
            start = time.perf_counter()
            ids = self.tokenizer.encode(prompt)
            self._report_stage("tokenize", time.perf_counter() - start)
            return ids
        vocab = self.loaded.config.vocab_size
        if any(type(t) is not int or not 0 <= t < vocab for t in prompt):
            raise FieldError("prompt", f"token ids must be integers in [0, {vocab})")
        return list(prompt)

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        sparsity: SparsityMethod | None = None,
    ) -> str:
        """Validate and queue a request; raises ValueError naming the problem. Returns its id."""
        state = self.make_request(prompt, params, request_id, priority, sparsity)
        self.enqueue(state)
        return state.seq.request_id

    def make_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        sparsity: SparsityMethod | None = None,
    ) -> RequestState:
        """Tokenize and validate without touching the engine's queues (safe from another thread).
        `sparsity`: a mask for this request's attention; None = the engine's default (usually none)."""
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        prompt_ids = self.encode_prompt(prompt)
        if not prompt_ids:
            raise FieldError("prompt", "is empty: it must hold at least one token")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise FieldError(
                "max_tokens",
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context "
                f"length of {self.max_model_len} tokens",
            )
        sparsity = sparsity or self.default_sparsity
        evicting = sparsity is not None and self.evicts(sparsity)
        held = len(prompt_ids) + params.max_tokens
        if evicting:  # the whole prompt first (computed in the mask form), then what the method keeps
            held = max(len(prompt_ids), sparsity.max_kv_tokens(held))
        blocks = -(-held // self.config.block_size)
        if blocks > self.kv_cache.num_blocks:
            raise FieldError(
                "max_tokens",
                f"prompt + max_tokens needs {blocks} KV blocks but the pool has {self.kv_cache.num_blocks}; "
                "lower max_tokens or give the KV cache more memory",
            )
        vocab = self.loaded.config.vocab_size
        if params.top_k > vocab:
            raise FieldError("top_k", f"must be -1, 0 (off) or in [1, {vocab}] (the vocabulary), got {params.top_k}")
        if any(type(t) is not int or not 0 <= t < vocab for t in params.stop_token_ids):
            raise FieldError("stop_token_ids", f"token ids must be integers in [0, {vocab})")
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        seq = Sequence(
            request_id, prompt_ids, params, priority=priority, stop_token_ids=stop_ids, max_tokens=params.max_tokens
        )
        if sparsity is not None and sparsity.name != "dense" and self.distributed:
            raise FieldError("sparsity", NO_MASKS_UNDER_TENSOR_PARALLELISM)
        if sparsity is not None and sparsity.name != "dense":
            seq.sparsity = SparsityState(sparsity, evicting=evicting)
            seq.prefix_cacheable = False
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.loaded.device).manual_seed(params.seed)
        return RequestState(seq, params, generator)

    def evicts(self, method: SparsityMethod) -> bool:
        """Whether a request under `method` has what the method drops evicted from its KV cache (its blocks
        freed), or runs the mask form only: a method that evicts, that drops something within this
        engine's context length, on a model without sliding windows of its own (their masks count
        positions as slots), on one rank."""
        return (
            method.declares_eviction()
            and not method.is_dense(self.max_model_len)
            and not any(self.loaded.config.layer_windows)
            and not self.distributed
        )

    def enqueue(self, state: RequestState) -> None:
        request_id = state.seq.request_id
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self.requests[request_id] = state
        self.scheduler.add(state.seq)

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks. False if it is unknown or already finished."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return False
        self.scheduler.finish(state.seq, "abort")
        return True

    def has_unfinished_requests(self) -> bool:
        """Requests not finished yet, or a launched step not read yet (whose rows may all have finished)."""
        return bool(self.requests) or self._pending is not None

    def has_waiting_requests(self) -> bool:
        """Requests waiting to be scheduled (new ones before their first step, or preempted ones)."""
        return bool(self.scheduler.waiting)

    def fail_requests(self, request_ids: list[str] | None, error: RequestError) -> list[RequestOutput]:
        """End requests now with `error` (all of them if None), blocks freed; their final outputs."""
        ids = list(self.requests) if request_ids is None else request_ids
        seqs = [self.requests[i].seq for i in ids if i in self.requests]
        if request_ids is None:
            self._pending = None  # nothing is left to read a launched step into
        return self._fail(seqs, error)

    # ---- the step
    def step(self) -> list[RequestOutput]:
        """One step (see `_step`); a step that raises fails its requests instead (see the module's doc)."""
        self._step_seqs = None
        try:
            outputs = self._step()
        except Exception as error:
            return self._recover(error)
        finally:
            self._report_policy_faults()
            for hook in list(self.step_hooks):
                hook(self)
        self._consecutive_failed_steps = 0
        return self._fail_masks_that_raised(outputs)

    def _recover(self, error: Exception) -> list[RequestOutput]:
        """Fail the requests of the step that raised and go on; raise EngineFatalError if it cannot."""
        self.num_failed_steps += 1
        self._consecutive_failed_steps += 1
        text = f"{type(error).__name__}: {error}"
        if isinstance(error, RankLostError):
            raise EngineFatalError(f"a tensor-parallel rank was lost: {error}") from error
        if any(marker in str(error) for marker in DEVICE_LOST):
            raise EngineFatalError(f"the device failed: {text}") from error
        if self._consecutive_failed_steps >= MAX_CONSECUTIVE_FAILED_STEPS:
            raise EngineFatalError(f"{self._consecutive_failed_steps} steps failed in a row, the last with {text}") from error
        culprit = ALGORITHMS.plugin_in_traceback(error.__traceback__)
        if culprit is not None:
            table, name = culprit
            ALGORITHMS.report_fault(AlgorithmFault(table.kind, name, text, from_plugin=True))
            param = "sparsity" if table is ALGORITHMS.sparsity_methods else None
            failure = RequestError("plugin", f"the plugin's {table.kind} {name!r} raised {text}; it was unloaded", param)
        else:
            logger.exception("a step failed; its requests are failed, the engine goes on")
            failure = RequestError("internal", f"the engine failed this request's step: {text}")
        seqs = self._step_seqs if self._step_seqs is not None else list(self.scheduler.running)
        self._pending = None  # a launched step's tokens cannot be trusted after a failure
        return self._fail(seqs, failure)

    def _fail(self, seqs: list[Sequence], error: RequestError) -> list[RequestOutput]:
        outputs = []
        for seq in seqs:
            state = self.requests.pop(seq.request_id, None)
            if state is None:
                continue  # finished or aborted before the failure
            self.scheduler.finish(seq, "error")
            state.error = error
            outputs.append(self.output_processor.output(state))
        return outputs

    def _report_policy_faults(self) -> None:
        """A policy the scheduler replaced (it raised): report it, so a plugin's is unloaded."""
        faults, self.scheduler.policy_faults = self.scheduler.policy_faults, []
        for fault in faults:
            logger.error("scheduling policy %r raised %r; FCFS serves from now on", fault.policy, fault.error)
            ALGORITHMS.report_fault(ALGORITHMS.fault(ALGORITHMS.scheduling_policies, fault.policy, fault.error))

    def _fail_masks_that_raised(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """A request whose sparsity method raised in this step (layers/sparsity.py caught it and ran that
        layer dense) did not get the attention it asked for: it fails, naming the method, which is reported."""
        seqs = [seq for seq in self._step_seqs or () if seq.sparsity is not None and seq.sparsity.error]
        if not seqs:
            return outputs
        by_id = {out.request_id: out for out in outputs}
        for seq in seqs:
            method = seq.sparsity.method
            fault = ALGORITHMS.fault(ALGORITHMS.sparsity_methods, method.name, seq.sparsity.error)
            ALGORITHMS.report_fault(fault)
            if fault.from_plugin:
                error = RequestError("plugin", f"the plugin's sparsity method {method.name!r} raised {fault.error}; it was unloaded", "sparsity")
            else:
                error = RequestError("internal", f"sparsity method {method.name!r} raised {fault.error}")
            if self.default_sparsity is method:
                self.default_sparsity = None  # the global mask raised: new requests run dense
            seq.sparsity.error = None  # reported once
            if seq.request_id in self.requests:
                by_id.update({out.request_id: out for out in self._fail([seq], error)})
            elif seq.request_id in by_id:  # it finished in this very step: its final output carries the error
                by_id[seq.request_id].error, by_id[seq.request_id].finish_reason = error, "error"
        return list(by_id.values())

    def _step(self) -> list[RequestOutput]:
        """Schedule, plan and run one forward pass, sample, and report every request that advanced or
        finished.

        With async scheduling (the default on CUDA graphs), decode steps overlap with the host: step
        N + 1 is launched before the host reads step N's tokens (which it then reports), so the device does
        not wait for the host's bookkeeping."""
        start = time.perf_counter()
        if self._pending is not None:
            return self._step_launched(start)
        batch = self.scheduler.schedule()
        if not batch:
            return []
        self._step_seqs = [seq for seq, _ in batch.items]
        sample_requests: dict[int, SampleRequest] = {}
        prompt_logprobs: dict[int, int] = {}
        for i, (seq, num_new) in enumerate(batch.items):
            state = self.requests[seq.request_id]
            if seq.timings.first_scheduled is None:
                seq.timings.first_scheduled = start
            if seq.num_computed_tokens + num_new == seq.num_tokens:
                sample_requests[i] = self._sample_request(state)
            if state.params.prompt_logprobs is not None and seq.num_computed_tokens < seq.num_prompt_tokens:
                prompt_logprobs[i] = state.params.prompt_logprobs
        if self.runner.quest is None and any(
            seq.sparsity is not None and self.runner.reads_blocks(seq.sparsity.method) for seq in self._step_seqs
        ):  # the first request whose decode reads only Quest's chosen blocks: summarize them from now on
            self.runner.keep_block_summaries(self.scheduler.running)
        plan = self.runner.plan(batch, len(sample_requests), list(prompt_logprobs), timed=bool(self.observers))
        evicting = any(seq.sparsity is not None and seq.sparsity.evicting for seq in self._step_seqs)
        if self.async_scheduling and not evicting and self.runner.can_launch_ahead(plan, sample_requests):
            plan = self._record(self.runner.plan_ahead(plan.num_seqs, plan.quest))
            requests = [sample_requests[i] for i in range(len(batch.items))]
            input_ids = [seq.token_ids[-1] for seq, _ in batch.items]
            self._pending = self.runner.launch_decode(plan, batch, requests, input_ids=input_ids)
            self.scheduler.mark_launched(batch)
            return self._step_launched(start)
        result = self.runner.execute(self._record(plan), batch, sample_requests, prompt_logprobs)
        for i, entries in result.prompt_logprobs.items():
            seq = batch.items[i][0]
            self.output_processor.record_prompt_logprobs(self.requests[seq.request_id], seq.num_computed_tokens, entries)
        advanced = self.scheduler.update_from_output(batch, result.sampled)
        self.evictor.after_step(batch.items)
        outputs = self._process(batch, advanced, result.sampled, result.logprobs, result.seconds)
        self._report_step(plan, start, result.seconds)
        return outputs

    def _step_launched(self, start: float) -> list[RequestOutput]:
        """Launch the next decode step if the scheduler can schedule it ahead, then read and report the
        launched step's tokens while the device runs the next."""
        pending = self._pending
        self._step_seqs = [seq for seq, _ in pending.batch.items]
        self._pending = self._launch_ahead(pending)
        sampled = dict(enumerate(pending.token_ids()))
        advanced = self.scheduler.update_from_output(pending.batch, sampled, launched=True)
        return self._process(pending.batch, advanced, sampled, {}, {})

    def _launch_ahead(self, pending: PendingDecode) -> PendingDecode | None:
        """The decode step after `pending`, launched before `pending`'s tokens are known (each sequence's
        input is the token `pending` samples for it, still on the device), if the scheduler schedules it
        (`schedule_ahead`) and no row needs the host to sample (logprobs, penalties, min_tokens), to mask
        or to time it."""
        if self.observers:
            return None
        batch = self.scheduler.schedule_ahead(pending.batch)
        if batch is None:
            return None
        requests = []
        for seq, _ in batch.items:
            request = self._sample_request(self.requests[seq.request_id], 1)
            if not device_only(request) or not self._reads_blocks_ahead(seq):
                return None  # its KV slots stay allocated: the scheduled step uses them
            requests.append(request)
        quest = {
            row: self.runner.row_budgets(seq.sparsity, seq.num_computed_tokens + 1)
            for row, (seq, _) in enumerate(batch.items)
            if seq.sparsity is not None
        }
        plan = self._record(self.runner.plan_ahead(len(requests), quest))
        launched = self.runner.launch_decode(plan, batch, requests, previous=pending)
        self.scheduler.mark_launched(batch)
        return launched

    def _reads_blocks_ahead(self, seq: Sequence) -> bool:
        """Whether a decode step launched ahead can run this sequence: no sparsity, or a method whose decode
        tokens read Quest's chosen blocks (the Quest graphs take their budgets; nothing is masked)."""
        state = seq.sparsity
        return state is None or (not state.evicting and self.runner.quest is not None and self.runner.reads_blocks(state.method))

    def _record(self, plan: StepPlan) -> StepPlan:
        """Count a step about to run, and keep its plan (`glassbox serve --log-level debug` logs each one)."""
        self.num_steps += 1
        self.last_plan = plan
        self.executor_counts[plan.executor] += 1
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s", plan)
        return plan

    def _process(
        self,
        batch: ScheduledBatch,
        advanced: list[int],
        sampled: dict[int, int],
        logprobs: dict[int, tuple[float, list[tuple[int, float]]]],
        seconds: dict[str, float],
    ) -> list[RequestOutput]:
        """Hand the rows that got a token to the output processor; end those a stop string ended."""
        start = time.perf_counter()
        processor = self.output_processor
        outputs = []
        for i in advanced:
            seq = batch.items[i][0]
            state = self.requests[seq.request_id]
            if processor.process_token(state, sampled[i], logprobs.get(i), start):
                if seq.is_finished:  # it also reached its length: the stop string is the reason
                    seq.finish_reason = "stop"
                else:
                    self.scheduler.finish(seq, "stop")
            if seq.is_finished or state.params.output_kind != "final_only":
                outputs.append(processor.output(state))
            if seq.is_finished:
                del self.requests[seq.request_id]
        if self.observers:
            seconds["detokenize"] = time.perf_counter() - start
        return outputs

    def _report_stage(self, stage: str, seconds: float) -> None:
        for observer in self.observers:
            observer.on_stage(stage, seconds)

    def _report_step(self, plan: StepPlan, start: float, seconds: dict[str, float]) -> None:
        if self.observers:
            seconds["step"] = time.perf_counter() - start
            for observer in self.observers:
                observer.on_step(plan, seconds)

    def _sample_request(self, state: RequestState, pending_tokens: int = 0) -> SampleRequest:
        """How to sample the request's next token; `pending_tokens`: tokens sampled before it that the host
        has not appended yet (a step launched ahead)."""
        seq, params = state.seq, state.params
        banned = []
        if params.min_tokens and seq.num_output_tokens + pending_tokens < params.min_tokens:
            banned = sorted(seq.stop_token_ids)  # EOS is among them unless ignore_eos
        # The history is only read by the penalties: no per-step copy of it otherwise.
        history = seq.output_token_ids if params.needs_penalties else []
        return SampleRequest(params, seq.prompt_token_ids, history, state.generator, banned)

    def check_alive(self) -> None:
        """Raise EngineFatalError if the engine cannot run another step (a tensor-parallel rank died while
        idle); the serving loop calls it between waits, so /health turns 503 without a request."""
        try:
            self.runner.check_alive()
        except RankLostError as error:
            raise EngineFatalError(f"a tensor-parallel rank was lost: {error}") from error

    def shutdown(self) -> None:
        """Stop what the engine started outside this process (tensor-parallel workers); idempotent."""
        self.runner.shutdown()

    # ---- introspection
    def stats(self) -> dict[str, Any]:
        bm = self.block_manager
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_blocks": bm.num_blocks,
            "num_free_blocks": bm.num_free_blocks,
            "kv_cache_usage": bm.usage(),
            "num_preemptions": self.scheduler.num_preemptions,
            "num_steps": self.num_steps,
            "steps_by_executor": dict(self.executor_counts),
            "last_plan": str(self.last_plan) if self.last_plan is not None else None,
            "prefix_cache": vars(bm.stats).copy(),
        }
