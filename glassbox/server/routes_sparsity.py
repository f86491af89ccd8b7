"""Sparse attention over REST: the global mask (/optimization/sparsity_mask) and its measured effect on
quality (/optimization/evaluate). Per-request masks are the `sparsity` field of /generate and /v1/*."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Request

from glassbox.errors import FieldError
from glassbox.layers.sparsity import SparsityMethod, available_methods
from glassbox.research.decode_speed import decode_speed
from glassbox.research.evaluate import evaluate
from glassbox.research.limits import check
from glassbox.server.deps import engine_client, json_body, sparsity_of
from glassbox.server.engine_client import EngineClient
from glassbox.server.schemas import EvaluateRequest, SparsityMaskRequest

if TYPE_CHECKING:
    from glassbox.engine.llm_engine import LLMEngine

router = APIRouter(prefix="/optimization")

COMPUTE_NOTE = (
    "sliding_window and h2o evict what they drop from a request's KV cache once its prompt is computed (in "
    "the mask form): its blocks go back to the pool and sliding_window's decode steps run the fast path over "
    "the keys kept. The other methods are masks over the dense scores on the readable PyTorch path "
    "(simulated sparsity): they change the attention, not its cost. Each method's `saves` says which; "
    "sequences without a mask keep the fast path"
)


def _describe(method: SparsityMethod | None, evicts: bool | None) -> dict[str, Any]:
    return {
        "active": method.spec() if method is not None else None,
        # Whether this engine evicts under the active method (not on models with sliding windows of their
        # own, nor under tensor parallelism: the mask form runs there).
        "evicts": evicts,
        "applies_to": "requests that arrive from now on and name no sparsity of their own",
        "compute": COMPUTE_NOTE,
    }


def _active(engine: LLMEngine) -> tuple[SparsityMethod | None, bool | None]:
    """The global mask and whether this engine evicts under it (run on the engine thread)."""
    method = engine.default_sparsity
    return method, None if method is None else engine.evicts(method)


@router.get("/sparsity_mask")
async def get_sparsity_mask(client: EngineClient = Depends(engine_client)) -> dict[str, Any]:
    """The global mask (or null) and the methods a request may name (built in and the plugin's), with what
    each selects keys from and what it saves when served (KV memory by eviction, or nothing yet)."""
    methods = [
        {
            "method": name,
            "description": cls.description,
            "selects_from": cls.selects_from,
            "saves": cls.saves,
            "evicts": cls.declares_eviction(),
        }
        for name, cls in available_methods().items()
    ]
    return {**_describe(*await client.call(_active)), "methods": methods}


@router.post("/sparsity_mask")
async def set_sparsity_mask(
    body: SparsityMaskRequest = Depends(json_body(SparsityMaskRequest)), client: EngineClient = Depends(engine_client)
) -> dict[str, Any]:
    """Set the mask for all new requests: {"method": "top_k", "k": 32}, {"mask_pattern": "top_k", "k": 32,
    "threshold": 0.1} or {"sparsity_ratio": 0.8, "method": "top_k"}."""
    method = sparsity_of(body.model_dump(), field="body")
    active = await client.set_sparsity_mask(method)
    evicts = None if active is None else await client.call(lambda engine: engine.evicts(active))
    return _describe(active, evicts)


@router.delete("/sparsity_mask")
async def clear_sparsity_mask(client: EngineClient = Depends(engine_client)) -> dict[str, Any]:
    return _describe(await client.set_sparsity_mask(None), None)


@router.post("/evaluate")
async def evaluate_sparsity(
    request: Request, body: EvaluateRequest = Depends(json_body(EvaluateRequest)), client: EngineClient = Depends(engine_client)
) -> dict[str, Any]:
    """Teacher-forced dense vs sparse on the same texts: perplexity both ways, KL(dense‖sparse), top-1
    agreement, realised density, per-layer attention-output error. At most limits.evaluate_max_tokens
    tokens over the texts. With `speed`, what the method buys served: decode ms/token, attention ms/step and KV
    blocks at the end of a long prompt + decode steps, dense vs sparse (research/decode_speed.py)."""
    method = sparsity_of(body.sparsity)
    texts = []
    for i, text in enumerate(body.texts):
        try:
            ids = client.tokenizer.encode(text, add_special_tokens=body.add_special_tokens) if isinstance(text, str) else client.encode_prompt(text)
        except FieldError as error:
            raise error.renamed(f"texts[{i}]") from None
        texts.append(ids)
    limits = request.app.state.settings.limits
    check("evaluate_max_tokens", sum(len(ids) for ids in texts), limits.evaluate_max_tokens, "the texts' tokens together")
    speed = body.speed
    if speed is not None:
        check("evaluate_max_context", speed.context_tokens, limits.evaluate_max_context, "speed.context_tokens", 400)
        check("evaluate_max_decode_steps", speed.decode_steps, limits.evaluate_max_decode_steps, "speed.decode_steps", 400)
        facts = client.facts
        if speed.context_tokens + speed.decode_steps + 2 > facts.max_model_len:
            raise FieldError(
                "speed.context_tokens",
                f"context_tokens + decode_steps + 2 must fit the context length of {facts.max_model_len} tokens",
            )
        info = facts.model_info
        pool = -(-(speed.context_tokens + speed.decode_steps + 2) // info["kv_block_size"]) + 1
        pool_bytes = pool * info["kv_cache_bytes"] // info["kv_num_blocks"]
        check("schedule_max_pool_bytes", pool_bytes, limits.schedule_max_pool_bytes, "the speed part's private KV pool (bytes)")
        stream = [t for ids in texts for t in ids]
        if not stream:
            raise FieldError("texts", "the speed part's prompt is made of the texts' tokens: give at least one")
        prompt = (stream * -(-speed.context_tokens // len(stream)))[: speed.context_tokens]
    return await client.call(
        lambda engine: {
            **evaluate(engine, texts, method),
            **({"speed": decode_speed(engine, prompt, method, speed.decode_steps)} if speed is not None else {}),
        }
    )
