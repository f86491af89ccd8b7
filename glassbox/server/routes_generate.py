"""The design's user API: /generate, /batch_generate, /tokenize, /detokenize, /model_info, /health."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from glassbox.engine.llm_engine import RequestOutput, RequestState
from glassbox.server.deps import SSE_DONE, engine_client, json_body, sparsity_of, sse, with_error_event
from glassbox.server.engine_client import EngineClient
from glassbox.server.errors import APIError
from glassbox.server.schemas import (
    BatchGenerateRequest,
    BatchGenerateResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    GenerateRequest,
    GenerateResponse,
    HealthResponse,
    TokenizeRequest,
    TokenizeResponse,
    Usage,
)

router = APIRouter()
STREAMED = {200: {"content": {"text/event-stream": {}}, "description": "JSON, or server-sent events with stream: true"}}


def response_of(out: RequestOutput) -> GenerateResponse:
    completion = len(out.token_ids)
    return GenerateResponse(
        text=out.text,
        token_ids=out.token_ids,
        finish_reason=out.finish_reason,
        usage=Usage(
            prompt_tokens=len(out.prompt_token_ids),
            completion_tokens=completion,
            total_tokens=len(out.prompt_token_ids) + completion,
        ),
        timings=out.timings,
        logprobs=out.logprobs,
        prompt_logprobs=out.prompt_logprobs,
        cached_tokens=out.num_cached_tokens,
        sparsity=out.sparsity,
    )


async def stream_events(client: EngineClient, state: RequestState) -> AsyncIterator[str]:
    """Server-sent events: one per step with the new text and ids; the last carries the full result."""
    async for out in client.stream(state):
        event = {"text": out.new_text, "token_ids": out.new_token_ids, "finished": out.finished}
        if out.finished:
            event["result"] = response_of(out).model_dump()
        yield sse(event)
    yield SSE_DONE


@router.post("/generate", response_model=GenerateResponse, responses=STREAMED)
async def generate(
    request: Request,
    body: GenerateRequest = Depends(json_body(GenerateRequest)),
    client: EngineClient = Depends(engine_client),
) -> object:
    # Made (validated, tokenized) before the 200 goes out: errors must still be 4xx.
    state = client.make_request(body.prompt, body.sampling_params(), body.priority, sparsity_of(body.sparsity))
    if body.stream:
        return StreamingResponse(with_error_event(stream_events(client, state)), media_type="text/event-stream")
    out = await client.final_output(state, request.is_disconnected)
    if out is None:
        return Response(status_code=499)  # the client left before any token: nobody reads this
    return response_of(out)


@router.post("/batch_generate", response_model=BatchGenerateResponse)
async def batch_generate(
    request: Request,
    body: BatchGenerateRequest = Depends(json_body(BatchGenerateRequest)),
    client: EngineClient = Depends(engine_client),
) -> BatchGenerateResponse:
    """All prompts go to the engine at once and share its batches; results come back in order."""
    states = client.make_batch(body.prompts, body.sampling_params(), sparsity=sparsity_of(body.sparsity), field="prompts")
    outputs = await client.final_outputs(states, request.is_disconnected)
    if any(out is None for out in outputs):
        return Response(status_code=499)  # the client left
    return BatchGenerateResponse(results=[response_of(out) for out in outputs])


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(
    body: TokenizeRequest = Depends(json_body(TokenizeRequest)), client: EngineClient = Depends(engine_client)
) -> TokenizeResponse:
    ids = client.tokenizer.encode(body.text, add_special_tokens=body.add_special_tokens)
    pieces = [client.tokenizer.id_to_piece(i) for i in ids] if body.with_pieces else None
    return TokenizeResponse(tokens=ids, count=len(ids), pieces=pieces)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(
    body: DetokenizeRequest = Depends(json_body(DetokenizeRequest)), client: EngineClient = Depends(engine_client)
) -> DetokenizeResponse:
    vocab = client.facts.vocab_size
    if any(not 0 <= t < vocab for t in body.tokens):
        raise APIError(400, f"tokens: every id must be in [0, {vocab})", "tokens")
    return DetokenizeResponse(text=client.tokenizer.decode(body.tokens, skip_special_tokens=body.skip_special_tokens))


@router.get("/model_info")
async def model_info(client: EngineClient = Depends(engine_client)) -> dict:
    """The model, the KV pool, the serving policy, and the budgets of every call (`limits`)."""
    return await client.model_info()


@router.get("/limits")
async def limits(request: Request) -> dict:
    """The budgets of every call (research/limits.py) and what the handles hold now."""
    return {**request.app.state.settings.limits.describe(), "handles_in_use": request.app.state.handles.usage()}


@router.get("/health", response_model=HealthResponse, responses={503: {"description": "the engine is dead", "content": {"application/json": {"schema": {"type": "object"}}}}})
async def health(client: EngineClient = Depends(engine_client)) -> object:
    if not client.is_alive:
        return JSONResponse({"status": "dead", "error": repr(client.error)}, status_code=503)
    return HealthResponse(status="ok")
