"""Greedy generation for one prompt over the paged KV cache: prefill, then one token per step.

The CLI's path until the batching engine (glassbox.engine) serves it; also the simplest example of how a
step is described to the model (flattened tokens + AttentionMetadata).
"""

from __future__ import annotations

import torch

from glassbox.engine.kv_cache import KVCache
from glassbox.engine.step_metadata import SeqChunk, build_step_metadata
from glassbox.models.loader import LoadedModel

BLOCK_SIZE = 16


@torch.inference_mode()
def greedy_generate(
    loaded: LoadedModel, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int] | None = None
) -> list[int]:
    """The generated token ids (stop token included, as transformers does), at most `max_new_tokens`."""
    model, config, device = loaded.model, loaded.config, loaded.device
    total = len(prompt_ids) + max_new_tokens
    if total > config.max_position_embeddings:
        raise ValueError(
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_new_tokens}) exceeds the model's "
            f"context of {config.max_position_embeddings} tokens"
        )
    num_blocks = -(-total // BLOCK_SIZE)
    cache = KVCache(config, num_blocks, BLOCK_SIZE, loaded.dtype, device)
    cache.bind(model)
    block_table = list(range(num_blocks))
    stop_ids = set(config.eos_token_ids) if stop_ids is None else stop_ids
    tokens = torch.tensor(prompt_ids, device=device)
    generated: list[int] = []
    start = 0
    while len(generated) < max_new_tokens:
        positions, meta = build_step_metadata([SeqChunk(block_table, start, len(tokens))], BLOCK_SIZE, device)
        hidden = model(tokens, positions, meta)
        next_id = int(model.compute_logits(hidden[-1:]).argmax(-1))
        generated.append(next_id)
        if next_id in stop_ids:
            break
        start += len(tokens)
        tokens = torch.tensor([next_id], device=device)
    return generated
