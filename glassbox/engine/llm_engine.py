"""The synchronous engine: requests in, one batched forward pass per `step()`, outputs out.

    engine = LLMEngine(load_model(None), EngineConfig())
    engine.add_request("r1", "Hello", SamplingParams(max_tokens=8))
    while engine.has_unfinished_requests():
        for out in engine.step(): ...
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from glassbox.config import EngineConfig
from glassbox.engine.block_manager import BlockManager
from glassbox.engine.cuda_graphs import DecodeGraphs
from glassbox.engine.kv_cache import KVCache
from glassbox.engine.model_runner import ModelRunner, PendingDecode, PromptLogprob
from glassbox.engine.optimize import compile_layers, optimize_model
from glassbox.engine.scheduler import Scheduler
from glassbox.engine.sequence import Sequence
from glassbox.kernels import cpu_native
from glassbox.layers.attention import TritonAttentionBackend, set_attention_backend
from glassbox.layers.sparsity import SparsityMethod, SparsityState
from glassbox.models.loader import LoadedModel
from glassbox.sampling import SampleRequest, SamplingParams, device_only

# One output token's logprobs: the sampled token's and the top alternatives, as {token_id: logprob}.
TokenLogprobs = dict[str, Any]


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    text: str  # the whole generated text so far (stop string removed)
    token_ids: list[int]  # generated tokens so far
    new_text: str  # what this step added to `text`
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    logprobs: list[TokenLogprobs] | None
    prompt_logprobs: list[PromptLogprob | None] | None
    num_cached_tokens: int
    timings: dict[str, float | None]  # filled in the finished output (empty before)
    sparsity: dict[str, Any] | None = None  # the mask applied and its realised density


@dataclass(eq=False)
class RequestState:
    """Engine-side state of a request beyond the scheduler's Sequence: sampling and detokenization."""

    seq: Sequence
    params: SamplingParams
    generator: torch.Generator | None
    stop_token_ids: set[int]
    text: str = ""
    emitted_text_len: int = 0
    # Incremental detokenization (vLLM's): `decoded` is the text of output tokens [0, read_offset), stable;
    # each step decodes only the window from prefix_offset on, so a step costs the same at any length.
    decoded: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    emitted_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[PromptLogprob | None] = field(default_factory=list)


class LLMEngine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None) -> None:
        self.loaded = loaded
        self.config = config or EngineConfig()
        self.tokenizer = loaded.tokenizer
        self.max_model_len = min(
            self.config.max_model_len or loaded.config.max_position_embeddings, loaded.config.max_position_embeddings
        )
        cfg = self.config
        on_cuda = loaded.device.type == "cuda"
        optimize_model(loaded.model, cfg.quantization)
        if loaded.device.type == "cpu":
            cpu_native.keep_freed_memory()
        if on_cuda:
            set_attention_backend(loaded.model, TritonAttentionBackend())
            if cfg.compile:
                compile_layers(loaded.model)
        kv_dtype = {"auto": loaded.dtype, "bfloat16": torch.bfloat16, "fp8": torch.float8_e4m3fn}[cfg.kv_cache_dtype]
        if kv_dtype == torch.float8_e4m3fn and on_cuda and torch.cuda.get_device_capability(loaded.device) < (8, 9):
            raise ValueError("kv_cache_dtype fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper)")
        if kv_dtype == torch.bfloat16 and on_cuda and loaded.dtype != torch.bfloat16:
            raise ValueError(
                "kv_cache_dtype bfloat16 on CUDA needs a bfloat16 model (the kernels read the cache in the model's dtype)"
            )
        if cfg.num_kv_blocks is not None:
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
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.scheduling_policy)
        graphs = None
        if on_cuda and not cfg.enforce_eager:
            max_blocks = -(-self.max_model_len // cfg.block_size)
            graphs = DecodeGraphs(loaded.model, cfg.max_num_seqs, max_blocks, cfg.block_size, loaded.device)
        self.runner = ModelRunner(loaded, self.kv_cache, cfg.seed, graphs)
        self.runner.overlap = graphs is not None if cfg.async_scheduling is None else cfg.async_scheduling
        if graphs is not None:
            graphs.capture()  # after the runner bound the KV pool: the graphs hold its addresses
        self.runner.warm_up()
        self.requests: dict[str, RequestState] = {}
        self.eos_token_ids = set(loaded.config.eos_token_ids) | (
            {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        )
        self._ids = itertools.count()
        self.num_steps = 0  # forward passes launched
        self._pending: PendingDecode | None = None  # a decode step whose tokens the host has not read yet
        # Applied to new requests that name no sparsity of their own (POST /optimization/sparsity_mask).
        self.default_sparsity: SparsityMethod | None = None

    # ---- requests
    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        vocab = self.loaded.config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
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
            raise ValueError("prompt is empty: it must hold at least one token")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context "
                f"length of {self.max_model_len} tokens"
            )
        blocks = -(-(len(prompt_ids) + params.max_tokens) // self.config.block_size)
        if blocks > self.kv_cache.num_blocks:
            raise ValueError(
                f"prompt + max_tokens needs {blocks} KV blocks but the pool has {self.kv_cache.num_blocks}; "
                "lower max_tokens or give the KV cache more memory"
            )
        seq = Sequence(request_id, prompt_ids, params, priority=priority)
        sparsity = sparsity or self.default_sparsity
        if sparsity is not None and sparsity.name != "dense":
            seq.sparsity, seq.prefix_cacheable = SparsityState(sparsity), False
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.loaded.device).manual_seed(params.seed)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        return RequestState(seq, params, generator, stop_ids)

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
        self._finish(state, "abort")
        return True

    def has_unfinished_requests(self) -> bool:
        """Requests not finished yet, or a launched step not read yet (whose rows may all have finished)."""
        return bool(self.requests) or self._pending is not None

    # ---- the step
    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward pass, sample, and report every request that advanced or finished.

        With async scheduling (the default on CUDA graphs), decode steps overlap with the host: step
        N + 1 is launched before the host reads step N's tokens (which it then reports), so the device does
        not wait for the host's bookkeeping (see `_launch_next`)."""
        if self._pending is not None:
            return self._step_pending()
        batch = self.scheduler.schedule()
        if not batch:
            return []
        now = time.perf_counter()
        sample_requests: dict[int, SampleRequest] = {}
        prompt_logprobs: dict[int, int] = {}
        for i, (seq, num_new) in enumerate(batch.items):
            state = self.requests[seq.request_id]
            if seq.timings.first_scheduled is None:
                seq.timings.first_scheduled = now
            if seq.num_computed_tokens + num_new == seq.num_tokens:
                sample_requests[i] = self._sample_request(state)
            if state.params.prompt_logprobs is not None and seq.num_computed_tokens < seq.num_prompt_tokens:
                prompt_logprobs[i] = state.params.prompt_logprobs
        self.num_steps += 1
        if self.runner.can_launch_decode(batch, sample_requests, prompt_logprobs):
            seqs = [seq for seq, _ in batch.items]
            requests = [sample_requests[i] for i in range(len(seqs))]
            self._pending = self.runner.launch_decode(seqs, requests, input_ids=[seq.token_ids[-1] for seq in seqs])
            for seq in seqs:
                seq.num_computed_tokens += 1
            return self._step_pending()
        result = self.runner.execute(batch, sample_requests, prompt_logprobs)

        now = time.perf_counter()
        outputs: list[RequestOutput] = []
        for i, (seq, num_new) in enumerate(batch.items):
            state = self.requests[seq.request_id]
            if i in result.prompt_logprobs:
                self._record_prompt_logprobs(state, seq.num_computed_tokens, result.prompt_logprobs[i])
            seq.num_computed_tokens += num_new
            self.block_manager.commit(seq)
            if i in result.sampled:
                self._advance(state, result.sampled[i], result.logprobs.get(i), now, outputs)
        return outputs

    def _step_pending(self) -> list[RequestOutput]:
        """Launch the next decode step if it needs nothing from the scheduler, then read and report the
        pending step's tokens while the device runs it."""
        pending = self._pending
        self._pending = self._launch_next(pending)
        tokens = pending.token_ids()
        now = time.perf_counter()
        outputs: list[RequestOutput] = []
        for seq, token in zip(pending.seqs, tokens):
            if seq.is_finished:  # aborted, or ended on its previous token while this step ran: a spare row
                continue
            self.block_manager.commit(seq)  # its tokens are all known now
            self._advance(self.requests[seq.request_id], token, None, now, outputs)
        return outputs

    def _launch_next(self, pending: PendingDecode) -> PendingDecode | None:
        """The decode step after `pending`, launched before `pending`'s tokens are known (each sequence's
        input is the token `pending` samples for it, still on the device), if it is the step the scheduler
        would make: nothing waiting or mid-prefill, no sequence that needs the host to sample (logprobs,
        penalties, min_tokens), a KV slot for each.
        Sequences that `pending`'s token ends by length drop out; one that it ends by a stop token costs
        a spare row, skipped when read. None: read `pending` and let the scheduler make the next step."""
        live = [seq for seq in pending.seqs if not seq.is_finished]
        if self.scheduler.waiting or len(live) != len(self.scheduler.running) or not self.runner.overlap:
            return None
        seqs, requests = [], []
        for seq in live:
            state = self.requests[seq.request_id]
            if seq.num_output_tokens + 1 >= state.params.max_tokens or seq.num_tokens + 1 >= self.max_model_len:
                continue  # `pending`'s token is its last
            request = self._sample_request(state, pending_tokens=1)
            if seq.sparsity is not None or not device_only(request):
                return None  # the host must see its logits (or ban stop tokens) first
            seqs.append(seq)
            requests.append(request)
        if not seqs:
            return None
        if not all(self.block_manager.allocate(seq, 1) for seq in seqs):
            return None  # the pool is short: the scheduler decides who is preempted
        self.num_steps += 1
        launched = self.runner.launch_decode(seqs, requests, previous=pending)
        for seq in seqs:
            seq.num_computed_tokens += 1
        return launched

    def _advance(
        self,
        state: RequestState,
        token: int,
        logprob: tuple[float, list[tuple[int, float]]] | None,
        now: float,
        outputs: list[RequestOutput],
    ) -> None:
        """Append a sampled token and report the request if it finished or streams."""
        seq = state.seq
        self._append_token(state, token, logprob, now)
        if seq.is_finished or state.params.output_kind == "cumulative":
            outputs.append(self._output(state))
        if seq.is_finished:
            del self.requests[seq.request_id]

    def _sample_request(self, state: RequestState, pending_tokens: int = 0) -> SampleRequest:
        """How to sample the request's next token; `pending_tokens`: tokens sampled before it that the host
        has not appended yet (a step launched ahead)."""
        seq, params = state.seq, state.params
        banned = []
        if seq.num_output_tokens + pending_tokens < params.min_tokens:
            banned = sorted(state.stop_token_ids)  # EOS is among them unless ignore_eos
        # The history is only read by the penalties: no per-step copy of it otherwise.
        history = seq.output_token_ids if params.needs_penalties else []
        return SampleRequest(params, seq.prompt_token_ids, history, state.generator, banned)

    def _record_prompt_logprobs(self, state: RequestState, start: int, entries: list[PromptLogprob]) -> None:
        if not state.prompt_logprobs:
            state.prompt_logprobs.append(None)  # the first prompt token has no context
        # After a preemption the prompt is recomputed: keep only positions not recorded yet.
        have = len(state.prompt_logprobs)
        for offset, entry in enumerate(entries):
            if start + 1 + offset >= have:
                state.prompt_logprobs.append(entry)

    def _append_token(
        self, state: RequestState, token: int, logprob: tuple[float, list[tuple[int, float]]] | None, now: float
    ) -> None:
        seq, params = state.seq, state.params
        seq.token_ids.append(token)
        if seq.timings.first_token is None:
            seq.timings.first_token = now
        seq.timings.token_times.append(now)
        if logprob is not None:
            state.logprobs.append({"token_id": token, "logprob": logprob[0], "top_logprobs": dict(logprob[1])})
        incremental = params.output_kind == "cumulative" or bool(params.stop)
        if incremental:
            self._detokenize(state)

        if token in state.stop_token_ids:  # never sampled before min_tokens: they are banned until then
            self._finish(state, "stop")
        elif params.stop and seq.num_output_tokens >= params.min_tokens and self._truncate_at_stop(state):
            self._finish(state, "stop")
        elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(state, "length")
        if seq.is_finished and not incremental:  # final_only: one decode of the whole output
            state.text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=params.skip_special_tokens)

    def _detokenize(self, state: RequestState) -> None:
        """Extend state.text by the new token's text. The window's text is the full text's tail only when
        decoded with the tokens before it (spaces, merged bytes); an incomplete UTF-8 character (U+FFFD)
        stays pending until the bytes that complete it arrive."""
        ids = state.seq.output_token_ids
        skip = state.params.skip_special_tokens
        before = self.tokenizer.decode(ids[state.prefix_offset : state.read_offset], skip_special_tokens=skip)
        window = self.tokenizer.decode(ids[state.prefix_offset :], skip_special_tokens=skip)
        new = window[len(before) :]
        if window.endswith("\ufffd"):
            state.text = state.decoded + new
            return
        state.decoded += new
        state.text = state.decoded
        state.prefix_offset, state.read_offset = state.read_offset, len(ids)

    def _truncate_at_stop(self, state: RequestState) -> bool:
        """If a stop string appeared, cut the text there (keeping it if asked) and say so."""
        params = state.params
        window_start = max(0, state.emitted_text_len - max(len(s) for s in params.stop))
        hits = [(state.text.find(s, window_start), s) for s in params.stop]
        hits = [(index, s) for index, s in hits if index >= 0]
        if not hits:
            return False
        index, stop = min(hits)
        state.text = state.text[: index + len(stop) if params.include_stop_str_in_output else index]
        return True

    def _finish(self, state: RequestState, reason: str) -> None:
        self.scheduler.finish(state.seq, reason)
        state.seq.timings.finished = time.perf_counter()

    def _output(self, state: RequestState) -> RequestOutput:
        seq = state.seq
        text = state.text
        # Hold back an incomplete UTF-8 character (decoded as U+FFFD) until its next byte arrives.
        visible = len(text) if seq.is_finished or not text.endswith("\ufffd") else len(text.rstrip("\ufffd"))
        new_text = text[state.emitted_text_len : visible] if visible > state.emitted_text_len else ""
        state.emitted_text_len = max(state.emitted_text_len, visible)
        output_ids = seq.output_token_ids
        new_ids = output_ids[state.emitted_tokens :]
        state.emitted_tokens = len(output_ids)
        params = state.params
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            text=text[:visible],
            token_ids=output_ids,  # a fresh list (a slice)
            new_text=new_text,
            new_token_ids=new_ids,
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            logprobs=list(state.logprobs) if params.logprobs is not None else None,
            prompt_logprobs=list(state.prompt_logprobs) if params.prompt_logprobs is not None else None,
            num_cached_tokens=seq.num_cached_tokens,
            timings=seq.timings.summary() if seq.is_finished else {},  # summed up once, at the end
            sparsity=seq.sparsity.report() if seq.sparsity is not None else None,
        )

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
            "prefix_cache": vars(bm.stats).copy(),
        }
