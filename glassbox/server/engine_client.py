"""The routes' one way into the engine, as vLLM's serving objects are: one per app, on `app.state.client`.

- A request is made once, on the event loop's thread (tokenizing and checking are thread-safe and touch no
  engine queue), and that same object is streamed: a bad request is a 4xx before any 200 goes out, and a
  prompt is tokenized once. Its outputs are deltas (what each step added, the whole result at the end), so
  a step's output costs the same at any length.
- What never changes while serving (tokenizer, model config, context length, the KV pool's size) is read
  once at start-up; everything live (the serving policy, the global mask, counters) is read or changed on
  the engine's loop thread between two steps, so a route never sees a half-made step.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from glassbox.engine.async_engine import AsyncLLMEngine, RequestFailedError
from glassbox.engine.llm_engine import NO_MASKS_UNDER_TENSOR_PARALLELISM, LLMEngine, RequestError, RequestOutput, RequestState
from glassbox.engine.optimize import weight_format
from glassbox.errors import FieldError
from glassbox.layers.sparsity import SparsityMethod
from glassbox.research.limits import Limits, check
from glassbox.research.schedule import set_serving_policy
from glassbox.sampling import SamplingParams
from glassbox.tokenizer import Tokenizer

SHUTTING_DOWN = RequestError("shutdown", "the server is shutting down: send the request to another server or retry later")


@dataclass(frozen=True)
class ModelFacts:
    """What never changes while serving; read on the loop thread once, at start-up."""

    tokenizer: Tokenizer  # thread-safe: the routes tokenize on the event loop's thread
    vocab_size: int
    max_model_len: int
    model_info: dict[str, Any]  # /model_info without its live field (the serving policy)

    @classmethod
    def read(cls, engine: LLMEngine, model_name: str) -> ModelFacts:
        loaded, config = engine.loaded, engine.loaded.config
        info = {
            "model": model_name,
            "source": loaded.source,
            "architecture": config.architecture,
            "model_type": config.model_type,
            "num_parameters": engine.num_parameters,
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "quantization": engine.config.quantization,
            "tensor_parallel_size": engine.tensor_parallel_size,
            "weight_format": weight_format(loaded.model),  # what the CPU runs: q4_1, q8_0, ... or float
            "activations": engine.config.activations,
            # Whether a request's numbers are independent of the batch it ran in (engine/batch_invariant.py).
            "batch_invariant": engine.config.batch_invariant,
            "device": str(loaded.device),
            "context_length": engine.max_model_len,
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "num_layers": config.num_hidden_layers,
            "num_heads": config.num_attention_heads,
            "num_kv_heads": config.num_key_value_heads,
            "head_dim": config.head_dim,
            "kv_cache_dtype": str(engine.kv_cache.dtype).removeprefix("torch."),
            "kv_block_size": engine.config.block_size,
            "kv_num_blocks": engine.kv_cache.num_blocks,
            "kv_cache_bytes": engine.kv_cache.nbytes,  # rank 0's share under tensor parallelism
            "loaded_at": loaded.loaded_at,
        }
        return cls(engine.tokenizer, config.vocab_size, engine.max_model_len, info)


def _streamed(params: SamplingParams) -> SamplingParams:
    """The routes read each step's new text and ids, and the whole result from the last output only."""
    return dataclasses.replace(params, output_kind="delta")


class EngineClient:
    def __init__(self, engine: AsyncLLMEngine, model_name: str, limits: Limits | None = None) -> None:
        """`engine` must be started (its model built)."""
        self._engine = engine
        self.model_name = model_name
        self.limits = limits or Limits()
        self.facts: ModelFacts = engine.call_blocking(lambda llm: ModelFacts.read(llm, model_name))
        self.tokenizer = self.facts.tokenizer
        self.draining = False  # set when a shutdown begins: new requests are refused (503)

    # ---- requests
    def make_request(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        priority: int = 0,
        sparsity: SparsityMethod | None = None,
    ) -> RequestState:
        """Tokenize and validate (FieldError naming the field; EngineDeadError once the engine died)."""
        return self.make_batch([prompt], params, priority, sparsity)[0]

    def make_batch(
        self,
        prompts: list[str | list[int]],
        params: SamplingParams,
        priority: int = 0,
        sparsity: SparsityMethod | None = None,
        field: str = "prompt",
    ) -> list[RequestState]:
        """One request per prompt (/batch_generate), all checked before any runs; a bad prompt's error
        names it (prompts[2]), and their tokens together are bounded by max_request_tokens."""
        self._refuse_if_draining()
        states = []
        for i, prompt in enumerate(prompts):
            try:
                states.append(self._engine.make_request(prompt, _streamed(params), priority=priority, sparsity=sparsity))
            except FieldError as error:
                raise error.renamed(f"{field}[{i}]") if len(prompts) > 1 and error.field == "prompt" else error from None
        self._check_tokens(states)
        return states

    def make_requests(
        self, prompt: str | list[int], params: list[SamplingParams], sparsity: SparsityMethod | None = None
    ) -> list[RequestState]:
        """One request per SamplingParams on the same prompt (the n choices of /v1/*), tokenized once."""
        self._refuse_if_draining()
        token_ids = self._engine.encode_prompt(prompt)
        states = [self._engine.make_request(token_ids, _streamed(sp), sparsity=sparsity) for sp in params]
        self._check_tokens(states)
        return states

    def _check_tokens(self, states: list[RequestState]) -> None:
        tokens = sum(len(s.seq.prompt_token_ids) + s.params.max_tokens for s in states)
        what = "prompt + max_tokens summed over the request's sequences (n choices, prompts)"
        check("max_request_tokens", tokens, self.limits.max_request_tokens, what, 400)

    def _refuse_if_draining(self) -> None:
        if self.draining:
            raise RequestFailedError(SHUTTING_DOWN)

    async def final_outputs(
        self, states: list[RequestState], is_disconnected: Callable[[], Awaitable[bool]]
    ) -> list[RequestOutput]:
        """Every request's last output, in order; if one fails the others are aborted at once."""
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self.final_output(state, is_disconnected)) for state in states]
        except ExceptionGroup as failed:
            raise failed.exceptions[0] from None  # the first failure is the answer (one error per response)
        return [task.result() for task in tasks]

    def fail_all(self, error: RequestError = SHUTTING_DOWN) -> None:
        """End every request in the engine now with `error` (a shutdown's drain timeout)."""
        self._engine.fail_all(error)

    async def num_unfinished(self) -> int:
        return await self._engine.call(lambda engine: len(engine.requests))

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a text, or the given ids checked against the vocabulary (ValueError)."""
        return self._engine.encode_prompt(prompt)

    def stream(self, state: RequestState) -> AsyncIterator[RequestOutput]:
        """The request's outputs as tokens arrive; leaving the iteration early aborts it."""
        return self._engine.stream(state)

    async def final_output(
        self, state: RequestState, is_disconnected: Callable[[], Awaitable[bool]]
    ) -> RequestOutput | None:
        """The request's last output; aborted (blocks freed) if the client goes away meanwhile."""
        final = None
        outputs = self.stream(state)
        try:
            async for out in outputs:
                final = out
                if await is_disconnected():
                    break
        finally:
            await outputs.aclose()  # leaving the stream aborts the request, now
        return final

    # ---- live engine state, read and changed on the loop thread
    def call(self, fn: Callable[[LLMEngine], Any]) -> Awaitable[Any]:
        """Run an instrument fn(engine) on the loop thread between steps; await its result."""
        return self._engine.call(fn)

    def serving_waits(self) -> bool:
        """Whether a serving request waits to be taken in (AsyncLLMEngine.serving_waits): research work run in
        slices on the loop thread asks it to hand the thread back early."""
        return self._engine.serving_waits()

    async def model_info(self) -> dict[str, Any]:
        policy = await self._engine.call(lambda engine: engine.scheduler.policy.name)
        return {**self.facts.model_info, "scheduling_policy": policy, "limits": self.limits.describe()}

    async def stats(self) -> dict[str, Any]:
        """Running and waiting requests, KV blocks, preemptions, prefix-cache counters."""
        return await self._engine.call(lambda engine: engine.stats())

    async def scheduling_policy(self) -> dict[str, str]:
        def read(engine: LLMEngine) -> dict[str, str]:
            policy = engine.scheduler.policy
            return {"algorithm": policy.name, "description": policy.description}

        return await self._engine.call(read)

    async def set_scheduling_policy(self, algorithm: str) -> dict[str, str]:
        """The policy of all traffic from the next step on (a name from the registry)."""
        return await self._engine.call(lambda engine: set_serving_policy(engine, algorithm))

    async def sparsity_mask(self) -> SparsityMethod | None:
        """The mask new requests get when they name none of their own."""
        return await self._engine.call(lambda engine: engine.default_sparsity)

    async def set_sparsity_mask(self, method: SparsityMethod | None) -> SparsityMethod | None:
        def apply(engine: LLMEngine) -> SparsityMethod | None:
            if engine.distributed and method is not None and method.name != "dense":
                raise FieldError("body", NO_MASKS_UNDER_TENSOR_PARALLELISM)
            engine.default_sparsity = None if method is None or method.name == "dense" else method
            return engine.default_sparsity

        return await self._engine.call(apply)

    # ---- liveness
    @property
    def is_alive(self) -> bool:
        return self._engine.is_alive

    @property
    def error(self) -> BaseException | None:
        return self._engine.error

