"""Attention in plain PyTorch: the CPU path, the oracle for GPU kernels, and the only path that can hand
out the attention probabilities.

Layout of the paged KV cache (per layer): k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim].
A token's slot is block_id * block_size + offset. The cache may be an 8-bit float (kv_cache_dtype="fp8"):
values are saturated to its range when stored and widened to the query's dtype when read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection

import torch
import torch.nn.functional as F


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as the cache stores it: an 8-bit float saturates at its largest value instead of overflowing."""
    if dtype in FP8_DTYPES:
        limit = torch.finfo(dtype).max
        x = x.clamp(-limit, limit)
    return x.to(dtype)


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write the step's keys/values ([T, KV, D]) into their slots ([T]) of the paged cache."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    for new, cache in ((k, k_cache), (v, v_cache)):
        new = to_cache_dtype(new, cache.dtype)
        if cache.dtype in FP8_DTYPES:  # index_copy_ has no 8-bit float kernel on the CPU: copy the bytes
            cache, new = cache.view(torch.uint8), new.view(torch.uint8)
        cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, new)


def select_blocks(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """cache[blocks] ([len(blocks), block_size, KV, D]). index_select, not cache[blocks]: advanced indexing
    takes a generic path several times slower on the CPU; an 8-bit float cache is selected as bytes (not
    every torch build has an index_select kernel for it)."""
    if cache.dtype in FP8_DTYPES:
        return torch.index_select(cache.view(torch.uint8), 0, blocks).view(cache.dtype)
    return torch.index_select(cache, 0, blocks)


def gather_kv(
    cache: torch.Tensor, block_table: torch.Tensor, context_len: int
) -> torch.Tensor:
    """The first `context_len` cached rows of one sequence, in order: [context_len, KV, D]."""
    block_size = cache.shape[1]
    num_blocks = (context_len + block_size - 1) // block_size
    return select_blocks(cache, block_table[:num_blocks].long()).flatten(0, 1)[:context_len]


def causal_mask(
    q_len: int, context_len: int, sliding_window: int | None, device: torch.device
) -> torch.Tensor:
    """[q_len, context_len] bool, True = may attend. Query i sits at position context_len - q_len + i."""
    q_pos = torch.arange(context_len - q_len, context_len, device=device)[:, None]
    k_pos = torch.arange(context_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed &= q_pos - k_pos < sliding_window
    return allowed


# A sparsity mask for one sequence: (scores [H, Lq, Lk] float32 with -inf where not allowed, allowed [Lq, Lk],
# q [Lq, H, D], keys [Lk, KV, D]) -> keep [H, Lq, Lk] bool. See layers/sparsity.py.
Selector = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    return_probs: bool = False,
    select: Selector | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One sequence. q: [Lq, H, D]; k, v: [Lk, KV, D] with Lk >= Lq (the queries are the last Lq
    positions). Returns out [Lq, H, D] and, if asked, the probabilities [H, Lq, Lk] in float32.
    `select` masks further keys (sparse attention); dropped scores become -inf before the softmax."""
    q_len, num_heads, head_dim = q.shape
    context_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    if not return_probs and select is None:
        qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [heads, L, D]
        mask = None
        is_causal = False
        if sliding_window is not None or (q_len > 1 and q_len != context_len):
            mask = causal_mask(q_len, context_len, sliding_window, q.device)
        elif q_len > 1:
            is_causal = True
        out = F.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=group > 1
        )
        return out.transpose(0, 1), None
    # The readable path: scores in float32, softmax, weighted sum.
    qg = q.float().view(q_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)  # [KV, G, Lq, D]
    kf = k.float().permute(1, 0, 2)[:, None]  # [KV, 1, Lk, D]
    vf = v.float().permute(1, 0, 2)[:, None]  # [KV, 1, Lk, D]
    scores = (qg @ kf.transpose(-1, -2)) * scale  # [KV, G, Lq, Lk]
    allowed = causal_mask(q_len, context_len, sliding_window, q.device)
    scores = scores.masked_fill(~allowed, float("-inf"))
    if select is not None:
        heads = scores.view(num_heads, q_len, context_len)
        keep = select(heads, allowed, q, k).reshape(num_kv_heads, group, q_len, context_len)
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = (probs @ vf).permute(2, 0, 1, 3).reshape(q_len, num_heads, head_dim)
    return out.to(q.dtype), probs.reshape(num_heads, q_len, context_len)


def attend_cached(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_len: int,
    scale: float,
    sliding_window: int | None = None,
    return_probs: bool = False,
    select: Selector | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`attend` for one sequence over its first `context_len` cached keys/values (q: its last Lq positions)."""
    keys = gather_kv(k_cache, block_table, context_len).to(q.dtype)
    values = gather_kv(v_cache, block_table, context_len).to(q.dtype)
    return attend(q, keys, values, scale, sliding_window, return_probs, select)


@dataclass
class DecodeBatch:
    """The step's decode sequences (one new token each), gathered once per step and shared by every
    layer, so that a layer's decode attention is a dozen tensor ops whatever the batch size."""

    seq_indices: list[int]  # which sequences of the step
    rows: torch.Tensor | None  # [Sd] their rows in q; None when every row is a decode
    tables: torch.Tensor  # [Sd, nb] int64 block ids (padding clamped to block 0, masked below)
    lens: torch.Tensor  # [Sd, 1] context lengths
    key_positions: torch.Tensor  # [L] = arange(nb * block_size)
    allowed: torch.Tensor  # [Sd, 1, 1, L] bool: False where the key is past the context

    @classmethod
    def build(
        cls,
        query_start_loc: list[int],
        context_lens: list[int],
        block_tables: torch.Tensor,
        block_size: int,
        exclude: Collection[int] = (),
    ) -> DecodeBatch | None:
        """`exclude`: sequences that must take the per-sequence path (sparsity masks)."""
        seqs = [
            i
            for i in range(len(context_lens))
            if query_start_loc[i + 1] - query_start_loc[i] == 1 and i not in exclude
        ]
        if not seqs:
            return None
        device = block_tables.device
        all_decode = len(seqs) == len(context_lens)
        rows = None if all_decode else torch.tensor([query_start_loc[i] for i in seqs], device=device)
        num_blocks = -(-max(context_lens[i] for i in seqs) // block_size)
        tables = block_tables if all_decode else block_tables[torch.tensor(seqs, device=device)]
        tables = tables[:, :num_blocks].clamp(min=0).long()
        lens = torch.tensor([[context_lens[i]] for i in seqs], device=device)
        key_positions = torch.arange(num_blocks * block_size, device=device)
        return cls(seqs, rows, tables, lens, key_positions, (key_positions[None, :] < lens)[:, None, None, :])


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: DecodeBatch,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """One query per sequence, batched: the decode step. q: [Sd, H, D], each query at position
    lens[i] - 1. Keys are gathered from the sequences' blocks into a padded [Sd, L, KV, D] batch and
    the padding masked. Returns [Sd, H, D].

    One SDPA call over views of the gathered blocks, the G query heads that share a KV head passed as G
    queries of that head: its CPU flash kernel then reads each key once and copies nothing (its GQA path
    would copy the keys per query head, and two batched matmuls over permuted keys copied them twice:
    ~1.9 -> ~1.0 ms a layer at 32 sequences of SmolLM2)."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    blocks = batch.tables.view(-1)
    keys = select_blocks(k_cache, blocks).view(num_seqs, -1, num_kv_heads, head_dim)  # [Sd, L, KV, D]
    values = select_blocks(v_cache, blocks).view(num_seqs, -1, num_kv_heads, head_dim)
    allowed = batch.allowed
    if sliding_window is not None:
        allowed = allowed & (batch.key_positions > batch.lens - 1 - sliding_window)[:, None, None, :]
    grouped_q = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [Sd, KV, G, D]
    out = F.scaled_dot_product_attention(
        grouped_q, keys.transpose(1, 2).to(q.dtype), values.transpose(1, 2).to(q.dtype), attn_mask=allowed, scale=scale
    )  # [Sd, KV, G, D]
    return out.reshape(num_seqs, num_heads, head_dim)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor | None,
    v_cache: torch.Tensor | None,
    block_tables: torch.Tensor | None,
    query_start_loc: list[int],
    context_lens: list[int],
    scale: float,
    sliding_window: int | None = None,
    return_probs: bool = False,
    decode_batch: DecodeBatch | None = None,
    selectors: dict[int, Selector] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Attention for a flattened batch. q: [T, H, D]; k, v: [T, KV, D] (this step's tokens).

    With a cache, sequence i attends over its first context_lens[i] cached tokens (this step's already
    stored); without one, over its own new tokens only. The decode sequences of `decode_batch` are done
    together in one batched call; the others one by one. Returns out [T, H, D] and, if asked, one
    probability tensor [H, q_len, context_len] per sequence. `selectors`: sequence index -> its sparsity
    mask (those sequences take the readable per-sequence path).
    """
    selectors = selectors or {}
    if decode_batch is not None and decode_batch.rows is None:  # a pure decode step
        return paged_decode_attention(q, k_cache, v_cache, decode_batch, scale, sliding_window), []
    out = torch.empty_like(q)
    all_probs: list[torch.Tensor] = []
    skip: set[int] = set()
    if decode_batch is not None:
        rows = decode_batch.rows
        out[rows] = paged_decode_attention(q[rows], k_cache, v_cache, decode_batch, scale, sliding_window)
        skip = set(decode_batch.seq_indices)
    for i, context_len in enumerate(context_lens):
        if i in skip:
            continue
        rows = slice(query_start_loc[i], query_start_loc[i + 1])
        if k_cache is not None:
            out[rows], probs = attend_cached(
                q[rows], k_cache, v_cache, block_tables[i], context_len, scale, sliding_window, return_probs,
                selectors.get(i),
            )
        else:
            out[rows], probs = attend(q[rows], k[rows], v[rows], scale, sliding_window, return_probs, selectors.get(i))
        if probs is not None:
            all_probs.append(probs)
    return out, all_probs
