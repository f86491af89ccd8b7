"""The design's user API: /generate, /batch_generate, /tokenize, /detokenize, /model_info, /health."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from glassbox.engine.async_engine import AsyncLLMEngine
from glassbox.engine.llm_engine import RequestOutput
from glassbox.layers.sparsity import SparsityMethod
from glassbox.sampling import SamplingParams
from glassbox.server.app import APIError, json_body, sparsity_of
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


async def run_to_end(
    engine: AsyncLLMEngine,
    request: Request,
    prompt: str | list[int],
    params: SamplingParams,
    priority: int = 0,
    sparsity: SparsityMethod | None = None,
) -> RequestOutput:
    """The final output of one request; aborted (blocks freed) if the client goes away meanwhile."""
    final = None
    async for out in engine.generate(prompt, params, priority=priority, sparsity=sparsity):
        final = out
        if await request.is_disconnected():
            break  # leaving the stream aborts the request
    return final


def sse(data: object) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def stream_events(
    engine: AsyncLLMEngine, body: GenerateRequest, params: SamplingParams, sparsity: SparsityMethod | None
) -> AsyncIterator[str]:
    """Server-sent events: one per step with the new text and ids; the last carries the full result."""
    async for out in engine.generate(body.prompt, params, priority=body.priority, sparsity=sparsity):
        event = {"text": out.new_text, "token_ids": out.new_token_ids, "finished": out.finished}
        if out.finished:
            event["result"] = response_of(out).model_dump()
        yield sse(event)
    yield "data: [DONE]\n\n"


@router.post("/generate", response_model=GenerateResponse)
async def generate(request: Request, body: GenerateRequest = Depends(json_body(GenerateRequest))) -> object:
    engine: AsyncLLMEngine = request.app.state.engine
    params = body.sampling_params()
    sparsity = sparsity_of(request, body.sparsity)
    if body.stream:
        # Validate before the 200 goes out: errors must still be 4xx.
        engine.engine.make_request(body.prompt, params)
        return StreamingResponse(stream_events(engine, body, params, sparsity), media_type="text/event-stream")
    return response_of(await run_to_end(engine, request, body.prompt, params, body.priority, sparsity))


@router.post("/batch_generate", response_model=BatchGenerateResponse)
async def batch_generate(
    request: Request, body: BatchGenerateRequest = Depends(json_body(BatchGenerateRequest))
) -> BatchGenerateResponse:
    """All prompts go to the engine at once and share its batches; results come back in order."""
    engine: AsyncLLMEngine = request.app.state.engine
    params = body.sampling_params()
    sparsity = sparsity_of(request, body.sparsity)
    for prompt in body.prompts:  # validate all before starting any
        engine.engine.make_request(prompt, params)
    outputs = await asyncio.gather(*(run_to_end(engine, request, p, params, sparsity=sparsity) for p in body.prompts))
    return BatchGenerateResponse(results=[response_of(out) for out in outputs])


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(request: Request, body: TokenizeRequest = Depends(json_body(TokenizeRequest))) -> TokenizeResponse:
    tokenizer = request.app.state.engine.engine.tokenizer
    ids = tokenizer.encode(body.text, add_special_tokens=body.add_special_tokens)
    pieces = [tokenizer.id_to_piece(i) for i in ids] if body.with_pieces else None
    return TokenizeResponse(tokens=ids, count=len(ids), pieces=pieces)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(
    request: Request, body: DetokenizeRequest = Depends(json_body(DetokenizeRequest))
) -> DetokenizeResponse:
    engine = request.app.state.engine.engine
    vocab = engine.loaded.config.vocab_size
    if any(not 0 <= t < vocab for t in body.tokens):
        raise APIError(400, f"tokens: every id must be in [0, {vocab})", "tokens")
    return DetokenizeResponse(text=engine.tokenizer.decode(body.tokens, skip_special_tokens=body.skip_special_tokens))


@router.get("/model_info")
async def model_info(request: Request) -> dict:
    engine = request.app.state.engine.engine
    loaded, config = engine.loaded, engine.loaded.config
    params = sum(p.numel() for p in loaded.model.parameters())
    return {
        "model": request.app.state.settings.model_name,
        "source": loaded.source,
        "architecture": config.architecture,
        "model_type": config.model_type,
        "num_parameters": params,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "quantization": engine.config.quantization,
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
        "kv_cache_bytes": engine.kv_cache.nbytes,
        "scheduling_policy": engine.scheduler.policy.name,
        "loaded_at": loaded.loaded_at,
    }


@router.get("/health", response_model=HealthResponse)
async def health(request: Request) -> object:
    engine: AsyncLLMEngine = request.app.state.engine
    if not engine.is_alive:
        return JSONResponse({"status": "dead", "error": repr(engine.error)}, status_code=503)
    return HealthResponse(status="ok")
