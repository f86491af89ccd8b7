"""OpenAI-compatible API: /v1/completions, /v1/chat/completions, /v1/models (the official `openai` client
works against it unchanged). Streams are server-sent events ending with `data: [DONE]`."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from glassbox.engine.llm_engine import RequestOutput, RequestState
from glassbox.sampling import SamplingParams
from glassbox.server.deps import SSE_DONE, engine_client, json_body, sparsity_of, sse, with_error_event
from glassbox.server.engine_client import EngineClient
from glassbox.server.errors import APIError
from glassbox.server.schemas import ChatCompletionRequest, CompletionRequest, OpenAICommon

router = APIRouter(prefix="/v1")
STREAMED = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or server-sent events with stream: true"}}


def _check_model(client: EngineClient, body: OpenAICommon) -> str:
    served = client.model_name
    if body.model not in (None, "", served):
        raise APIError(404, f"model: unknown model {body.model!r}; this server serves {served!r}", "model", "not_found_error")
    return served


def _params(body: OpenAICommon, logprobs: int | None, index: int) -> SamplingParams:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return SamplingParams(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        # n choices with a seed must differ from each other yet repeat across calls
        seed=None if body.seed is None else body.seed + index,
        stop=stop,
        stop_token_ids=list(body.stop_token_ids or []),
        max_tokens=body.max_completion_tokens or body.max_tokens or 16,
        min_tokens=body.min_tokens,
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
    )


def _usage(outputs: list[RequestOutput]) -> dict[str, int]:
    prompt = len(outputs[0].prompt_token_ids) if outputs else 0
    completion = sum(len(o.token_ids) for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion_logprobs(client: EngineClient, out: RequestOutput) -> dict[str, Any] | None:
    if out.logprobs is None:
        return None
    piece = client.tokenizer.decode
    return {
        "tokens": [piece([e["token_id"]]) for e in out.logprobs],
        "token_logprobs": [e["logprob"] for e in out.logprobs],
        "top_logprobs": [{piece([t]): lp for t, lp in e["top_logprobs"].items()} for e in out.logprobs],
        "text_offset": [],
    }


def _chat_logprobs(client: EngineClient, out: RequestOutput) -> dict[str, Any] | None:
    if out.logprobs is None:
        return None
    piece = client.tokenizer.decode
    return {
        "content": [
            {
                "token": piece([e["token_id"]]),
                "logprob": e["logprob"],
                "top_logprobs": [{"token": piece([t]), "logprob": lp} for t, lp in e["top_logprobs"].items()],
            }
            for e in out.logprobs
        ]
    }


async def _merged(client: EngineClient, states: list[RequestState]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(choice index, output) from n concurrent requests, as they arrive."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, state: RequestState) -> None:
        try:
            async for out in client.stream(state):
                await queue.put((index, out))
        except BaseException as error:  # handed to the consumer
            await queue.put((index, error))

    tasks = [asyncio.create_task(pump(i, state)) for i, state in enumerate(states)]
    finished = 0
    try:
        while finished < len(tasks):
            index, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.finished:
                finished += 1
            yield index, item
    finally:
        for task in tasks:
            task.cancel()  # a client gone mid-stream: every choice's request is aborted


def _sparsity_field(out: RequestOutput) -> dict[str, Any]:
    """glassbox's addition to a choice: the mask applied and its realised density, when there was one."""
    return {"sparsity": out.sparsity} if out.sparsity is not None else {}


@router.get("/models")
async def models(client: EngineClient = Depends(engine_client)) -> dict[str, Any]:
    name = client.model_name
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "glassbox"}]}


@router.post("/completions", responses=STREAMED)
async def completions(
    request: Request,
    body: CompletionRequest = Depends(json_body(CompletionRequest)),
    client: EngineClient = Depends(engine_client),
) -> object:
    model = _check_model(client, body)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise APIError(400, "prompt: send one prompt per request (use n for several completions)", "prompt")
        prompt = prompt[0]
    params = [_params(body, body.logprobs, i) for i in range(body.n)]
    states = client.make_requests(prompt, params, sparsity_of(body.sparsity))
    request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    prefix = prompt if body.echo and isinstance(prompt, str) else ""

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            finals: dict[int, RequestOutput] = {}
            started: set[int] = set()
            async for index, out in _merged(client, states):
                text = out.new_text if index in started else prefix + out.new_text
                started.add(index)
                choice = {"index": index, "text": text, "logprobs": None, "finish_reason": out.finish_reason}
                choice.update(_sparsity_field(out) if out.finished else {})
                yield sse({"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": [choice]})
                if out.finished:
                    finals[index] = out
            if include_usage:
                usage = _usage([finals[i] for i in sorted(finals)])
                yield sse({"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": [], "usage": usage})
            yield SSE_DONE

        return StreamingResponse(with_error_event(events()), media_type="text/event-stream")

    outputs = await client.final_outputs(states, request.is_disconnected)
    if any(out is None for out in outputs):
        return Response(status_code=499)  # the client left
    choices = [
        {
            "index": i,
            "text": prefix + out.text,
            "logprobs": _completion_logprobs(client, out),
            "finish_reason": out.finish_reason,
            **_sparsity_field(out),
        }
        for i, out in enumerate(outputs)
    ]
    return {"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": choices, "usage": _usage(outputs)}


@router.post("/chat/completions", responses=STREAMED)
async def chat_completions(
    request: Request,
    body: ChatCompletionRequest = Depends(json_body(ChatCompletionRequest)),
    client: EngineClient = Depends(engine_client),
) -> object:
    model = _check_model(client, body)
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        prompt = client.tokenizer.encode_chat(messages)
    except ValueError as error:
        raise APIError(400, f"messages: {error}", "messages") from None
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = [_params(body, logprobs, i) for i in range(body.n)]
    states = client.make_requests(prompt, params, sparsity_of(body.sparsity))
    request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            return sse({"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices, **extra})

        async def events() -> AsyncIterator[str]:
            for index in range(body.n):
                yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
            finals: dict[int, RequestOutput] = {}
            async for index, out in _merged(client, states):
                delta = {"content": out.new_text} if out.new_text or not out.finished else {}
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": out.finish_reason}
                yield chunk([{**choice, **(_sparsity_field(out) if out.finished else {})}])
                if out.finished:
                    finals[index] = out
            if include_usage:
                yield chunk([], usage=_usage([finals[i] for i in sorted(finals)]))
            yield SSE_DONE

        return StreamingResponse(with_error_event(events()), media_type="text/event-stream")

    outputs = await client.final_outputs(states, request.is_disconnected)
    if any(out is None for out in outputs):
        return Response(status_code=499)  # the client left
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": out.text},
            "logprobs": _chat_logprobs(client, out),
            "finish_reason": out.finish_reason,
            **_sparsity_field(out),
        }
        for i, out in enumerate(outputs)
    ]
    return {"id": request_id, "object": "chat.completion", "created": created, "model": model, "choices": choices, "usage": _usage(outputs)}
