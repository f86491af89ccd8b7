"""Prefix-cache and KV-pool statistics, and clearing the cache, read from the engine's block manager.
Call these on the engine's loop thread (AsyncLLMEngine.call) so that a step is never half-counted."""

from __future__ import annotations

from typing import Any

from glassbox.engine.kv_cache import bytes_per_block
from glassbox.engine.llm_engine import LLMEngine


def cache_stats(engine: LLMEngine) -> dict[str, Any]:
    bm = engine.block_manager
    s = bm.stats
    block_bytes = bytes_per_block(engine.loaded.config, bm.block_size, engine.kv_cache.dtype)
    return {
        "prefix_cache": {
            "enabled": bm.enable_prefix_caching,
            "lookups": s.lookups,
            "queried_tokens": s.queried_tokens,
            "hit_tokens": s.hit_tokens,
            "token_hit_rate": s.hit_tokens / s.queried_tokens if s.queried_tokens else 0.0,
            "queried_blocks": s.queried_blocks,
            "hit_blocks": s.hit_blocks,
            "block_hit_rate": s.hit_blocks / s.queried_blocks if s.queried_blocks else 0.0,
            "evictions": s.evictions,
            "cached_blocks": len(bm.cached),
        },
        "blocks": {
            "block_size": bm.block_size,
            "total": bm.num_blocks,
            "in_use": bm.num_used_blocks,  # referenced by running or waiting-with-prefix requests
            "cached_free": len(bm.evictable),  # unreferenced, contents kept for reuse
            "free": len(bm.free_blocks),
            "bytes_per_block": block_bytes,
        },
        "kv_cache_usage": bm.usage(),
    }


def clear_prefix_cache(engine: LLMEngine) -> dict[str, Any]:
    """Drop every unreferenced cached block; blocks of running requests are untouched."""
    freed = engine.block_manager.reset_prefix_cache()
    return {"freed_blocks": freed, "cache": cache_stats(engine)}
