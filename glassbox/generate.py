"""Greedy generation for one prompt over the paged KV cache: prefill, then one token per step.

The CLI's path until the batching engine (glassbox.engine) serves it; also the simplest example of how a
step is described to the model (flattened tokens + AttentionMetadata).
"""

from __future__ import annotations

import torch

from glassbox.engine.kv_cache import KVCache
from glassbox.layers.attention import AttentionMetadata
from glassbox.models.loader import LoadedModel

BLOCK_SIZE = 16


def step_metadata(
    block_table: torch.Tensor, start: int, num_new: int, block_size: int
) -> tuple[torch.Tensor, AttentionMetadata]:
    """Positions [num_new] and metadata for one sequence whose tokens [start, start + num_new) are new."""
    device = block_table.device
    positions = torch.arange(start, start + num_new, device=device)
    slots = block_table[positions // block_size].long() * block_size + positions % block_size
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, num_new], dtype=torch.int32, device=device),
        context_lens=torch.tensor([start + num_new], dtype=torch.int32, device=device),
        slot_mapping=slots,
        block_tables=block_table[None],
        query_start_loc_list=[0, num_new],
        context_lens_list=[start + num_new],
    )
    return positions, meta


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
    block_table = torch.arange(num_blocks, dtype=torch.int32, device=device)
    stop_ids = set(config.eos_token_ids) if stop_ids is None else stop_ids
    tokens = torch.tensor(prompt_ids, device=device)
    generated: list[int] = []
    start = 0
    while len(generated) < max_new_tokens:
        positions, meta = step_metadata(block_table, start, len(tokens), BLOCK_SIZE)
        hidden = model(tokens, positions, meta)
        next_id = int(model.compute_logits(hidden[-1:]).argmax(-1))
        generated.append(next_id)
        if next_id in stop_ids:
            break
        start += len(tokens)
        tokens = torch.tensor([next_id], device=device)
    return generated
