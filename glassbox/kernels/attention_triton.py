"""Attention over the paged KV cache in Triton: the GPU path. `attention_torch.py` is the reference.

Layout of the paged KV cache (per layer): k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim],
contiguous. A token's slot is block_id * block_size + offset; sequence i's token at position p lives in block
block_tables[i, p // block_size] at offset p % block_size.

Three kernels, each with a launcher that checks its arguments:
  store_kv                -- write the step's keys/values into their slots (slot < 0: padding row, skipped)
  paged_decode_attention  -- one query per sequence; split-K ("flash decoding") when the batch is small;
                             optionally stores the step's keys/values itself (one launch fewer per layer),
                             and, unsplit, makes Quest's choice of blocks itself (`quest_tables` otherwise)
  prefill_attention       -- varlen causal attention of a flattened batch of query chunks over the cache

Every kernel reads lengths from device tensors, never on the host, and its grid depends only on tensor
shapes, so a step can be captured in a CUDA graph. On Hopper and later the decode-step kernels launch with
programmatic dependent launch (`_pdl`). Scores and softmax are float32 whatever the input dtype;
the softmax uses exp2 on scores pre-multiplied by log2(e). The grouped-query heads that share a KV head are
computed in one program so that each key/value tile is loaded once. Every tl.dot operand is at least 16 in
each dimension (a GPU requirement; the interpreter does not check it): groups and head_dim are padded to 16.

An 8-bit float cache (float8_e4m3fn, vLLM's kv_cache_dtype="fp8", scale 1) halves the bytes that decode
reads: keys/values are stored saturated to its range, and tiles are widened before the products (the query is
never rounded to 8 bits). Decode widens them to float16, which holds every e4m3 value exactly and converts a
pair in one instruction, with a bfloat16 query rounded to float16 (exact within its range) and the
probabilities in float16: 12% faster than widening to bfloat16 (H100, nano-vllm's mid-run batch: 234 -> 205
us a layer). Prefill widens to the query's dtype.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from glassbox.kernels.attention_torch import FP8_DTYPES

try:  # programmatic dependent launch (Triton >= 3.3): see _pdl
    from triton.language.extra.cuda import gdc_wait
except ImportError:
    gdc_wait = None

LOG2_E = 1.4426950408889634
# Keys per step of the decode loop: longer tiles once each program holds a whole sequence, shorter ones to split a
# few sequences finely, and again from LONG_TILE_MAX_PROGRAMS programs on. The H200, bfloat16, unsplit, us a
# layer at 1k / 4k tokens, 64- vs 128-key tiles: SmolLM2's heads at 96 sequences (288 programs) 33.6 / 117.8 vs
# 27.1 / 90.7, at 256 (768 programs) 52.8 / 194.6 vs 67.6 / 252.4; Llama-3-8B's at 32 (256 programs) 41.9 / 148.6
# vs 37.3 / 127.3, at 64 (512) 65.9 / 241.6 vs 78.3 / 294.9, at 128 (1024) 128.4 / 482.1 vs 132.5 / 501.3.
DECODE_BLOCK_N = 64
DECODE_BLOCK_N_UNSPLIT = 128
LONG_TILE_MAX_PROGRAMS = 512
PREFILL_BLOCK_M = 64  # (query, head) rows per prefill program
PREFILL_BLOCK_N = 64  # keys per step of the prefill loop
# Split-K for decode: split the keys of a sequence over programs only while the batch alone launches fewer
# than TARGET_DECODE_PROGRAMS programs, then into about SPLIT_DECODE_PROGRAMS programs at head_dim 64, half as
# many at 128 (a tile holds twice the bytes), at most a split per DECODE_BLOCK_N keys of the table. Splits
# past a sequence's context exit at once and the merge skips them, so a graph's splits, sized for its longest
# context, cost little at short ones. The H200, bfloat16, 8 layers in a CUDA graph, batches 1-64 at 1k-8k
# tokens, against a grid of 1-64 splits of 64 or 128 keys (2026-12-03), us a layer: SmolLM2's heads at batch
# 32 and 8k 78.8 -> 53.6 (3 splits -> 8; the grid's best 54.5), Llama-3-8B's at batch 8 79.2 -> 70.1 (4 -> 6;
# best 68.8); at 1k-2k tokens and batches 1-4, up to 0.8 slower (Llama-3-8B's at batch 2 and 2k: 10.9 -> 11.7;
# the splits past the context and their merge). From 256 programs on, splitting loses (Llama-3-8B's heads at
# batch 32 and 1k: 37.8 unsplit, 39.0-44.2 in 2).
TARGET_DECODE_PROGRAMS = 256
SPLIT_DECODE_PROGRAMS = 768
MAX_DECODE_SPLITS = 64  # the merge kernel holds [splits, head_dim] float32 in registers
# Quest's choice: programs per sequence and KV head that bound its blocks (each a tile of them at a time), and
# keys per tile of the search's passes.
QUEST_BOUND_PARTS = 16
QUEST_SCAN = 512
# Decode over Quest's tables: split as dense, but into at most QUEST_DECODE_SPLITS per row (their keys are a
# fraction of the context): the H200, 1/8 of 8k tokens, Llama-3-8B's heads at batch 1: 7.4 us a layer in 32
# splits, 6.6 in 16. Unsplit, the decode kernel makes Quest's choice itself, bounding QUEST_FUSED_TILE blocks a
# step (Llama-3-8B's heads at batch 32 and 8k: 59.1 us a layer with 64, 64.7 with 32, 79.6 with 16).
QUEST_DECODE_SPLITS = 16
QUEST_FUSED_TILE = 64
F16_MAX = tl.constexpr(65504.0)  # a bfloat16 query beyond float16's range is clamped, not made infinite
NO_MAX = tl.constexpr(-1e30)  # running-max start: finite, so fully masked tiles give exp2(-inf - NO_MAX) = 0, never NaN


class TritonAttentionError(ValueError):
    """Arguments the Triton kernels cannot take; the message says which and what was expected."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise TritonAttentionError(message)


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    _check(k_cache.dim() == 4, f"k_cache must be [num_blocks, block_size, KV, D], got {tuple(k_cache.shape)}")
    _check(v_cache.shape == k_cache.shape, f"v_cache {tuple(v_cache.shape)} != k_cache {tuple(k_cache.shape)}")
    _check(k_cache.is_contiguous() and v_cache.is_contiguous(), "k_cache and v_cache must be contiguous")
    block_size = k_cache.shape[1]
    _check(block_size & (block_size - 1) == 0, f"block_size must be a power of two, got {block_size}")


def _fp8_max(cache: torch.Tensor) -> float:
    """The cache dtype's largest value if it is an 8-bit float (stores saturate to it), else 0."""
    return torch.finfo(cache.dtype).max if cache.dtype in FP8_DTYPES else 0.0


def _ieee(q: torch.Tensor, cache: torch.Tensor) -> bool:
    """Whether the kernels' products are float32 (full precision wanted): the compute dtype is the cache's,
    or the query's over an 8-bit cache."""
    return (q.dtype if _fp8_max(cache) else cache.dtype) == torch.float32


@triton.jit
def _to_cache(x, cache_ptr, FP8_MAX: tl.constexpr):
    """x in the cache's dtype, saturated to an 8-bit float's range (whose casts would overflow to NaN).
    (tl.maximum/minimum drop NaN, where the torch path's clamp keeps it: a model already producing NaN
    keys shows it on the CPU path only.)"""
    if FP8_MAX > 0:
        x = tl.minimum(tl.maximum(x.to(tl.float32), -FP8_MAX), FP8_MAX)
    return x.to(cache_ptr.dtype.element_ty)


@functools.cache
def _pdl(device: torch.device) -> bool:
    """Whether the decode-step kernels launch with programmatic dependent launch (Hopper and later, compiled:
    not in the interpreter): a kernel's programs are launched while the kernel before it finishes and wait
    for it (gdc_wait, before anything else), so the launch latency (~1 us a kernel on the H200) overlaps the
    previous kernel's tail; captured CUDA graphs keep it. The H200, batch 32 at 8k, a layer: Quest 24.5 ->
    23.4 us (SmolLM2's heads), 66.4 -> 64.5 (Llama-3-8B's); dense unchanged. Letting the next kernel launch
    from each program's start too (gdc_launch_dependents) slowed dense Llama-3-8B by 14%: its waiting
    programs take the SMs' slots."""
    return gdc_wait is not None and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _block_d(head_dim: int) -> int:
    """Head dim padded to a power of two and to the 16 that tl.dot needs."""
    return max(16, triton.next_power_of_2(head_dim))


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # float32 inputs: full-precision products (the default would round them to tf32 on the GPU).
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


# ---------------------------------------------------------------------------------------------------------
# store_kv
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _store_kv_kernel(
    k_ptr,  # [T, KV, D]
    v_ptr,  # [T, KV, D]
    k_cache_ptr,  # [num_blocks * block_size, KV, D] (the cache, seen as slots)
    v_cache_ptr,
    slot_mapping_ptr,  # [T] int64, < 0 = padding row
    stride_k_token,
    stride_k_head,
    stride_v_token,
    stride_v_head,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    FP8_MAX: tl.constexpr,  # 0 unless the cache is an 8-bit float
    BLOCK_KV: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    heads = tl.arange(0, BLOCK_KV)
    dims = tl.arange(0, BLOCK_D)
    # The padding test as a tensor like the others (a scalar bool in a mask trips Triton 3.9's interpreter).
    slots = tl.zeros([BLOCK_KV, BLOCK_D], tl.int64) + slot
    mask = (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HEAD_DIM) & (slots >= 0)
    k = tl.load(k_ptr + token * stride_k_token + heads[:, None] * stride_k_head + dims[None, :], mask=mask)
    v = tl.load(v_ptr + token * stride_v_token + heads[:, None] * stride_v_head + dims[None, :], mask=mask)
    cache_offsets = slot * (NUM_KV_HEADS * HEAD_DIM) + heads[:, None] * HEAD_DIM + dims[None, :]
    tl.store(k_cache_ptr + cache_offsets, _to_cache(k, k_cache_ptr, FP8_MAX), mask=mask)
    tl.store(v_cache_ptr + cache_offsets, _to_cache(v, v_cache_ptr, FP8_MAX), mask=mask)


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write the step's keys/values ([T, KV, D]) into their slots ([T]) of the paged cache; slots < 0 are skipped."""
    _check_cache(k_cache, v_cache)
    num_tokens, num_kv_heads, head_dim = k.shape
    _check(v.shape == k.shape, f"v {tuple(v.shape)} != k {tuple(k.shape)}")
    _check(k_cache.shape[2:] == (num_kv_heads, head_dim), f"k {tuple(k.shape)} does not fit {tuple(k_cache.shape)}")
    _check(k.stride(-1) == 1 and v.stride(-1) == 1, "k and v need a contiguous last (head_dim) axis")
    _check(slot_mapping.shape == (num_tokens,), f"slot_mapping must be [{num_tokens}], got {tuple(slot_mapping.shape)}")
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        FP8_MAX=_fp8_max(k_cache),
        BLOCK_KV=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# decode: one query per sequence
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _load_kv_tile(
    table,
    k_cache_ptr,
    v_cache_ptr,
    start,
    hi,
    kv_head,
    dims,
    dim_mask,
    stride_cache_block,
    stride_cache_token,
    stride_cache_head,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One sequence's keys and values at positions [start, start + BLOCK_N) (those < hi), through its block
    table `table`: positions [BLOCK_N], their mask, k and v [BLOCK_N, BLOCK_D]."""
    positions = start + tl.arange(0, BLOCK_N)
    key_mask = positions < hi
    # Each key's block through the table; masked keys read block 0 (never a -1 padding entry).
    block = tl.load(table + positions // BLOCK_SIZE, mask=key_mask, other=0).to(tl.int64)
    offsets = (
        block[:, None] * stride_cache_block
        + (positions % BLOCK_SIZE)[:, None] * stride_cache_token
        + kv_head * stride_cache_head
        + dims[None, :]
    )  # [BLOCK_N, BLOCK_D]
    kv_mask = key_mask[:, None] & dim_mask[None, :]
    k = tl.load(k_cache_ptr + offsets, mask=kv_mask, other=0.0)
    v = tl.load(v_cache_ptr + offsets, mask=kv_mask, other=0.0)
    return positions, key_mask, k, v


@triton.jit
def _decode_kernel(
    q_ptr,  # [S, H, D]
    k_cache_ptr,  # [num_blocks, block_size, KV, D]
    v_cache_ptr,
    block_tables_ptr,  # [S, max_blocks], or [S, KV, max_blocks] (a table per KV head: Quest's choices)
    context_lens_ptr,  # [S]
    out_ptr,  # [S, H, D]; written when not SPLIT
    partial_acc_ptr,  # [S, H, num_splits, D] float32: unnormalised output of each split (SPLIT only)
    partial_max_ptr,  # [S, H, num_splits] float32: each split's running max (log2 units)
    partial_sum_ptr,  # [S, H, num_splits] float32: each split's sum of exp2(score - max)
    k_new_ptr,  # [S, KV, D]: this step's keys and values (STORE only)
    v_new_ptr,
    slot_mapping_ptr,  # [S] int64: where they go, < 0 = padding row (STORE only)
    summaries_ptr,  # [num_blocks, KV, 2, D]: each block's key min and max (QUEST only)
    budgets_ptr,  # [S] int32: blocks to read, 0: all (QUEST only)
    quest_keys_ptr,  # [S, KV, max_blocks] int32 scratch: the candidate blocks' bounds (QUEST only)
    chosen_ptr,  # [S, KV, max_blocks] int32 scratch: the blocks each KV head reads (QUEST only)
    qk_scale,  # softmax scale * log2(e)
    num_heads,
    num_splits,
    stride_sum_block,
    stride_sum_head,
    stride_sum_side,
    stride_scratch_seq,
    stride_scratch_head,
    stride_q_seq,
    stride_q_head,
    stride_k_new_seq,
    stride_k_new_head,
    stride_v_new_seq,
    stride_v_new_head,
    stride_out_seq,
    stride_out_head,
    stride_table_seq,
    stride_table_head,  # 0: one table for all KV heads
    stride_cache_block,
    stride_cache_token,
    stride_cache_head,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    SLIDING_WINDOW: tl.constexpr,  # 0 = none
    SPLIT: tl.constexpr,
    STORE: tl.constexpr,  # store k_new/v_new into the cache (the store_kv kernel's work) and attend to them
    FP8_MAX: tl.constexpr,  # 0 unless the cache is an 8-bit float (then tiles are widened to q's dtype)
    IEEE: tl.constexpr,
    BLOCK_G: tl.constexpr,  # GROUP padded to >= 16
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,  # launched dependent on the previous kernel: wait for it first
    QUEST: tl.constexpr,  # choose Quest's blocks here (unsplit launches: one program per row and KV head)
    QUEST_IEEE: tl.constexpr,  # the bounds' products in float32
    QUEST_TILE: tl.constexpr,  # blocks per step of the bounds' loop
    SCAN: tl.constexpr,  # keys per tile of the choice's passes
):
    if PDL:
        gdc_wait()
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    table = block_tables_ptr + seq * stride_table_seq + kv_head * stride_table_head
    if QUEST:
        # quest_tables' two kernels in this program: the candidate blocks' bounds, then the choice, through
        # scratch rows of its own (written, then read back after a barrier). Then the loop below reads the chosen
        # blocks, whose positions are the ones in that table. (The H200, Llama-3-8B's heads at batch 32 and 8k:
        # 63.1 -> 58.7 us a layer, 3.91x -> 4.20x dense's; with the bounds left in their kernel 62.0. Split
        # launches would repeat the choice in each split: SmolLM2's heads at batch 32 in 8 splits, 22.3 -> 33.4.)
        budget = tl.load(budgets_ptr + seq)
        num_blocks = tl.cdiv(context_len, BLOCK_SIZE)
        if budget > 0 and num_blocks > budget:
            keys = quest_keys_ptr + seq * stride_scratch_seq + kv_head * stride_scratch_head
            chosen = chosen_ptr + seq * stride_scratch_seq + kv_head * stride_scratch_head
            _quest_bounds(
                q_ptr, summaries_ptr, table, keys, seq, kv_head, num_blocks - 1, 0, QUEST_TILE,
                stride_q_seq, stride_q_head, stride_sum_block, stride_sum_head, stride_sum_side,
                GROUP, HEAD_DIM, QUEST_TILE, QUEST_IEEE, BLOCK_G, BLOCK_D,
            )  # fmt: skip
            tl.debug_barrier()
            ids = tl.arange(0, SCAN)
            first_tile = tl.load(table + ids, mask=ids < num_blocks, other=0)  # [SCAN]
            _quest_choose(table, first_tile, tl.load(table + num_blocks - 1), keys, chosen, num_blocks, budget, SCAN)
            tl.debug_barrier()
            table = chosen
            context_len = _quest_len(context_len, num_blocks, budget, BLOCK_SIZE)
    query_pos = context_len - 1

    # This program's keys: [lo, hi) of the sequence, cut to the sliding window. Padding rows (context 0) get an
    # empty range and write zeros.
    # The context is shared evenly by the splits (whole BLOCK_N tiles each), read here from the device: a short
    # context in a graph captured for long ones still spreads over every split instead of loading one. Splits
    # past the context exit (the merge skips them; none holds the query's own key).
    split_tokens = tl.cdiv(tl.cdiv(context_len, num_splits), BLOCK_N) * BLOCK_N
    lo = split * split_tokens
    if SPLIT:
        if lo >= context_len:
            return
    hi = tl.minimum(lo + split_tokens, context_len)
    if SLIDING_WINDOW > 0:
        lo = tl.maximum(lo, query_pos - SLIDING_WINDOW + 1)

    groups = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + groups  # [BLOCK_G]
    head_mask = groups < GROUP
    dim_mask = dims < HEAD_DIM
    q = tl.load(
        q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + dims[None, :],
        mask=head_mask[:, None] & dim_mask[None, :],
        other=0.0,
    )  # [BLOCK_G, BLOCK_D]
    if FP8_MAX == 0:
        q = q.to(k_cache_ptr.dtype.element_ty)
    elif not IEEE:  # 8-bit tiles widen to float16, exactly and in one instruction per pair (bfloat16 takes two)
        q = tl.minimum(tl.maximum(q.to(tl.float32), -F16_MAX), F16_MAX).to(tl.float16)

    running_max = tl.full([BLOCK_G], NO_MAX, tl.float32)
    running_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    # With STORE the query's own key is not in the cache yet: the loop reads the keys before it, and the
    # program whose range holds it adds it from registers after the loop. (Substituting it into each tile
    # instead keeps the tiles from going straight to shared memory and cost a third of the bandwidth.)
    cached_hi = tl.minimum(hi, query_pos) if STORE else hi
    for start in range(lo, cached_hi, BLOCK_N):
        positions, key_mask, k, v = _load_kv_tile(
            table, k_cache_ptr, v_cache_ptr, start, cached_hi, kv_head, dims, dim_mask,
            stride_cache_block, stride_cache_token, stride_cache_head, BLOCK_N, BLOCK_SIZE,
        )
        k, v = k.to(q.dtype), v.to(q.dtype)  # a no-op unless the cache is 8-bit
        scores = _dot(q, tl.trans(k), IEEE) * qk_scale  # [BLOCK_G, BLOCK_N]
        scores = tl.where(key_mask[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        rescale = tl.exp2(running_max - new_max)
        probs = tl.exp2(scores - new_max[:, None])
        running_sum = running_sum * rescale + tl.sum(probs, 1)
        acc = acc * rescale[:, None] + _dot(probs.to(v.dtype), v, IEEE)
        running_max = new_max

    if STORE:
        # In the cache's dtype: attended to as later steps will read them.
        k_new = _to_cache(
            tl.load(k_new_ptr + seq * stride_k_new_seq + kv_head * stride_k_new_head + dims, mask=dim_mask, other=0.0),
            k_cache_ptr, FP8_MAX,
        )  # [BLOCK_D]
        v_new = _to_cache(
            tl.load(v_new_ptr + seq * stride_v_new_seq + kv_head * stride_v_new_head + dims, mask=dim_mask, other=0.0),
            v_cache_ptr, FP8_MAX,
        )
        # The program whose range holds the query's position owns its key: it stores it (unless the row is
        # padding) and attends to it. The tests as tensors like the others (a scalar bool in a mask trips
        # Triton 3.9's interpreter).
        slot = tl.zeros([BLOCK_D], tl.int64) + tl.load(slot_mapping_ptr + seq)
        owner = (slot * 0 + query_pos >= lo) & (slot * 0 + query_pos < hi)  # [BLOCK_D], all equal
        cache_offsets = slot * stride_cache_token + kv_head * stride_cache_head + dims
        tl.store(k_cache_ptr + cache_offsets, k_new, mask=owner & (slot >= 0) & dim_mask)
        tl.store(v_cache_ptr + cache_offsets, v_new, mask=owner & (slot >= 0) & dim_mask)
        # One more step of the online softmax for the new key (-inf: no weight, for every other program).
        score = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * qk_scale  # [BLOCK_G]
        owns = (groups * 0 + query_pos >= lo) & (groups * 0 + query_pos < hi)  # [BLOCK_G], all equal
        score = tl.where(owns, score, float("-inf"))
        new_max = tl.maximum(running_max, score)
        rescale = tl.exp2(running_max - new_max)
        prob = tl.exp2(score - new_max)
        running_sum = running_sum * rescale + prob
        acc = acc * rescale[:, None] + prob[:, None] * v_new.to(tl.float32)[None, :]
        running_max = new_max

    if SPLIT:
        row = (seq * num_heads + heads) * num_splits + split  # [BLOCK_G]
        tl.store(partial_max_ptr + row, running_max, mask=head_mask)
        tl.store(partial_sum_ptr + row, running_sum, mask=head_mask)
        tl.store(
            partial_acc_ptr + row[:, None] * HEAD_DIM + dims[None, :],
            acc,
            mask=head_mask[:, None] & dim_mask[None, :],
        )
    else:
        out = acc / tl.where(running_sum > 0, running_sum, 1.0)[:, None]
        tl.store(
            out_ptr + seq * stride_out_seq + heads[:, None] * stride_out_head + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=head_mask[:, None] & dim_mask[None, :],
        )


@triton.jit
def _decode_reduce_kernel(
    partial_acc_ptr,  # [S, H, num_splits, D] float32
    partial_max_ptr,  # [S, H, num_splits] float32
    partial_sum_ptr,  # [S, H, num_splits] float32
    context_lens_ptr,  # [S]: the decode kernel's
    out_ptr,  # [S, H, D]
    num_splits,
    stride_out_seq,
    stride_out_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,  # the decode kernel's
    PDL: tl.constexpr,
):
    # Merge the splits' softmaxes: weight each by exp2(its max - overall max). Splits past the context wrote
    # nothing (the decode kernel's split_tokens).
    if PDL:
        gdc_wait()
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_SPLITS)
    dims = tl.arange(0, BLOCK_D)
    context_len = tl.load(context_lens_ptr + seq)
    split_tokens = tl.cdiv(tl.cdiv(context_len, num_splits), BLOCK_N) * BLOCK_N
    split_mask = (splits < num_splits) & (splits * split_tokens < context_len)
    row = (seq * tl.num_programs(1) + head) * num_splits + splits  # [BLOCK_SPLITS]
    split_max = tl.load(partial_max_ptr + row, mask=split_mask, other=NO_MAX)
    split_sum = tl.load(partial_sum_ptr + row, mask=split_mask, other=0.0)
    split_acc = tl.load(
        partial_acc_ptr + row[:, None] * HEAD_DIM + dims[None, :],
        mask=split_mask[:, None] & (dims[None, :] < HEAD_DIM),
        other=0.0,
    )  # [BLOCK_SPLITS, BLOCK_D]
    weights = tl.exp2(split_max - tl.max(split_max, 0))
    total = tl.sum(split_sum * weights, 0)
    out = tl.sum(split_acc * weights[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(
        out_ptr + seq * stride_out_seq + head * stride_out_head + dims,
        out.to(out_ptr.dtype.element_ty),
        mask=dims < HEAD_DIM,
    )


def _decode_splits(num_seqs: int, num_kv_heads: int, head_dim: int, quest: bool = False) -> int:
    """How many programs share one sequence's keys: enough to fill the GPU when the batch alone doesn't.
    Depends only on shapes, so a captured CUDA graph stays valid (the launcher caps it at a tile per split of
    the table's width). `quest`: Quest's choices, whose keys are a fraction of the context, unknown here: at
    most QUEST_DECODE_SPLITS."""
    programs = num_seqs * num_kv_heads
    if programs >= TARGET_DECODE_PROGRAMS:
        return 1
    wanted = triton.cdiv(SPLIT_DECODE_PROGRAMS * 64, programs * max(head_dim, 64))
    return min(wanted, QUEST_DECODE_SPLITS if quest else MAX_DECODE_SPLITS)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    *,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
    quest_summaries: torch.Tensor | None = None,
    quest_budgets: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query per sequence (the decode step). q: [S, H, D], query i at position context_lens[i] - 1;
    block_tables: [S, max_blocks] block ids (entries past the context are never read), or [S, KV, max_blocks]
    for a table per KV head (`quest_tables`' output: positions are then the ones in that table);
    context_lens: [S] on the device (0 = padding row, output zeros). Returns out [S, H, D] (written in place
    when given).
    With k_new, v_new [S, KV, D] and slot_mapping [S], the kernel also does `store_kv`'s work: it writes
    them to their slots and attends to them as the keys/values at each query's position.
    With quest_summaries [num_blocks, KV, 2, D] and quest_budgets [S] int32 (`quest_tables`' arguments), each
    KV head reads the blocks Quest chooses for it: unsplit, chosen by the decode kernel itself, else by
    `quest_tables` first (the choice would be repeated in every split).
    `num_splits` overrides the split-K heuristic (tests); block_n, num_warps, num_stages are tuning knobs
    (bench/gpu_kernels.py)."""
    _check_cache(k_cache, v_cache)
    _check(q.dim() == 3 and q.stride(-1) == 1, f"q must be [S, H, D] with contiguous D, got {tuple(q.shape)}")
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    _check(cache_head_dim == head_dim, f"q head_dim {head_dim} != cache head_dim {cache_head_dim}")
    _check(num_heads % num_kv_heads == 0, f"{num_heads} query heads do not group onto {num_kv_heads} KV heads")
    per_head = block_tables.dim() == 3
    _check(
        block_tables.shape[0] == num_seqs and (not per_head or block_tables.shape[1] == num_kv_heads) and block_tables.dim() in (2, 3),
        f"block_tables must be [{num_seqs}, B] or [{num_seqs}, {num_kv_heads}, B]",
    )
    _check(block_tables.stride(-1) == 1, "block_tables needs a contiguous last axis")
    _check(context_lens.shape == (num_seqs,), f"context_lens must be [{num_seqs}], got {tuple(context_lens.shape)}")
    quest = quest_summaries is not None
    _check(quest == (quest_budgets is not None) and not (quest and per_head),
           "Quest needs quest_summaries and quest_budgets together, with one table per sequence")  # fmt: skip
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _check(out.shape == q.shape and out.stride(-1) == 1, f"out must be {tuple(q.shape)} with contiguous D")
    store = k_new is not None
    if store:
        new_shape = (num_seqs, num_kv_heads, head_dim)
        _check(k_new.shape == new_shape and v_new is not None and v_new.shape == new_shape,
               f"k_new and v_new must be {new_shape}")  # fmt: skip
        _check(k_new.stride(-1) == 1 and v_new.stride(-1) == 1, "k_new and v_new need a contiguous last (head_dim) axis")
        _check(slot_mapping is not None and slot_mapping.shape == (num_seqs,), f"slot_mapping must be [{num_seqs}]")
    else:
        k_new = v_new = slot_mapping = q  # unused by the kernel
    if num_seqs == 0:
        return out

    group = num_heads // num_kv_heads
    max_tokens = block_tables.shape[-1] * block_size
    if num_splits is None:
        num_splits = _decode_splits(num_seqs, num_kv_heads, head_dim, per_head or quest)
    if block_n is None:  # 128-key tiles of head_dim > 128 would crowd shared memory (measured up to 128 only)
        long_tiles = num_splits == 1 and head_dim <= 128 and num_seqs * num_kv_heads < LONG_TILE_MAX_PROGRAMS
        block_n = DECODE_BLOCK_N_UNSPLIT if long_tiles else DECODE_BLOCK_N
    num_splits = min(num_splits, triton.cdiv(max_tokens, block_n))  # no split without a tile of its own
    split = num_splits > 1
    if quest and split:
        block_tables, context_lens = quest_tables(
            q, quest_summaries, block_tables, context_lens, quest_budgets, block_size
        )
        per_head, quest = True, False
    if quest:  # the choice's scratch rows
        _check(quest_summaries.shape[1:] == (num_kv_heads, 2, head_dim) and quest_summaries.stride(-1) == 1,
               f"quest_summaries must be [blocks, {num_kv_heads}, 2, {head_dim}]")  # fmt: skip
        _check(quest_budgets.shape == (num_seqs,) and quest_budgets.dtype == torch.int32,
               f"quest_budgets must be [{num_seqs}] int32")  # fmt: skip
        quest_keys = torch.empty(num_seqs, num_kv_heads, block_tables.shape[1], dtype=torch.int32, device=q.device)
        chosen = torch.empty_like(quest_keys)
    else:  # unused by the kernel
        quest_summaries, quest_budgets, quest_keys, chosen = q, context_lens, context_lens, context_lens
    if split:
        partial_acc = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        partial_max = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
        partial_sum = torch.empty_like(partial_max)
    else:  # unused by the kernel; any float32 tensor will do
        partial_acc = partial_max = partial_sum = out.new_empty(1, dtype=torch.float32)
    block_d = _block_d(head_dim)
    pdl = _pdl(q.device)
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, partial_acc, partial_max, partial_sum,
        k_new, v_new, slot_mapping, quest_summaries, quest_budgets, quest_keys, chosen,
        scale * LOG2_E, num_heads, num_splits,
        *(quest_summaries.stride()[:3] if quest else (0, 0, 0)), *(chosen.stride()[:2] if quest else (0, 0)),
        q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        out.stride(0), out.stride(1), block_tables.stride(0), block_tables.stride(1) if per_head else 0,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        SLIDING_WINDOW=sliding_window or 0,
        SPLIT=split,
        STORE=store,
        FP8_MAX=_fp8_max(k_cache),
        IEEE=_ieee(q, k_cache),
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        PDL=pdl,
        QUEST=quest,
        QUEST_IEEE=quest and _quest_ieee(q, quest_summaries),
        QUEST_TILE=QUEST_FUSED_TILE,
        SCAN=_quest_scan(block_tables.shape[-1]),
        num_warps=num_warps,
        launch_pdl=pdl,
        **({} if num_stages is None else {"num_stages": num_stages}),
    )  # fmt: skip
    if split:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            partial_acc, partial_max, partial_sum, context_lens, out, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim,
            BLOCK_SPLITS=triton.next_power_of_2(num_splits),
            BLOCK_D=block_d,
            BLOCK_N=block_n,
            PDL=pdl,
            launch_pdl=pdl,
        )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------------
# Quest: each decode query's KV heads choose the blocks they read
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _quest_key(bound):
    # float32 -> int32 in the floats' order (-0.0 as +0.0): the choice below compares integers, a byte at a time
    bits = tl.where(bound == 0.0, 0.0, bound).to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _quest_unsigned_keys(keys, ids, candidates):
    # keys[ids] as unsigned values in int64 (past the candidates: 0, below every key)
    return tl.load(keys + ids, mask=ids < candidates, other=-2147483648).to(tl.int64) + 2147483648


@triton.jit
def _quest_bounds_kernel(
    q_ptr,  # [S, H, D], RoPE applied
    summaries_ptr,  # [num_blocks, KV, 2, D]: each block's key min and max
    block_tables_ptr,  # [S, max_blocks]
    context_lens_ptr,  # [S]
    budgets_ptr,  # [S] int32: blocks to read (0: all)
    keys_ptr,  # [S, KV, max_blocks] int32 out: each candidate block's bound, as _quest_key
    stride_q_seq,
    stride_q_head,
    stride_sum_block,
    stride_sum_head,
    stride_sum_side,
    stride_table_seq,
    stride_keys_seq,
    stride_keys_head,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,  # blocks per step of a program's loop (>= 16: a tl.dot operand)
    IEEE: tl.constexpr,  # products in float32 (float32 operands, or dtypes that differ)
    BLOCK_G: tl.constexpr,  # GROUP padded to >= 16
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:
        gdc_wait()
    # Programs (sequence, KV head, part): part p bounds the candidate blocks of tiles p, p + parts, ... — a
    # sequence's blocks are read by many programs at once (one program per row was latency-bound). A block's
    # bound for a query head: sum_d max(q_d * min_d, q_d * max_d) = max(q, 0) . max + min(q, 0) . min, two
    # products on the tensor cores; the KV head's bound is the max over its group. The loop stops at the
    # sequence's own blocks, so a wide table (a graph's, sized for the longest context) costs nothing past it.
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    parts = tl.num_programs(2)
    context_len = tl.load(context_lens_ptr + seq)
    budget = tl.load(budgets_ptr + seq)
    num_blocks = tl.cdiv(context_len, BLOCK_SIZE)
    if budget > 0 and num_blocks > budget:  # (otherwise every block is read: nothing to rank)
        _quest_bounds(
            q_ptr, summaries_ptr, block_tables_ptr + seq * stride_table_seq,
            keys_ptr + seq * stride_keys_seq + kv_head * stride_keys_head, seq, kv_head, num_blocks - 1,
            part * TILE, parts * TILE, stride_q_seq, stride_q_head, stride_sum_block, stride_sum_head, stride_sum_side,
            GROUP, HEAD_DIM, TILE, IEEE, BLOCK_G, BLOCK_D,
        )  # fmt: skip


@triton.jit
def _quest_bounds(
    q_ptr, summaries_ptr, table, keys, seq, kv_head, candidates, first, step,
    stride_q_seq, stride_q_head, stride_sum_block, stride_sum_head, stride_sum_side,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, TILE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # keys[b] for the candidate blocks b = first + i * step + [0, TILE) of the sequence's table (the last block,
    # always read, is no candidate): the KV head's bound of block table[b], as _quest_key.
    dims = tl.arange(0, BLOCK_D)
    groups = tl.arange(0, BLOCK_G)
    dim_mask = dims < HEAD_DIM
    q = tl.load(
        q_ptr + seq * stride_q_seq + (kv_head * GROUP + groups)[None, :] * stride_q_head + dims[:, None],
        mask=dim_mask[:, None] & (groups < GROUP)[None, :],
        other=0.0,
    )  # [BLOCK_D, BLOCK_G]: the group's queries, transposed
    dot_dtype = tl.float32 if IEEE else summaries_ptr.dtype.element_ty
    q_pos, q_neg = tl.maximum(q, 0.0).to(dot_dtype), tl.minimum(q, 0.0).to(dot_dtype)
    for start in range(first, candidates, step):
        tile = start + tl.arange(0, TILE)
        candidate = tile < candidates
        block = tl.load(table + tile, mask=candidate, other=0).to(tl.int64)
        base = summaries_ptr + block * stride_sum_block + kv_head * stride_sum_head
        mask = candidate[:, None] & dim_mask[None, :]
        low = tl.load(base[:, None] + dims[None, :], mask=mask, other=0.0).to(dot_dtype)  # [TILE, BLOCK_D]
        high = tl.load(base[:, None] + stride_sum_side + dims[None, :], mask=mask, other=0.0).to(dot_dtype)
        bounds = _dot(high, q_pos, IEEE) + _dot(low, q_neg, IEEE)  # [TILE, BLOCK_G] float32
        best = tl.max(tl.where((groups < GROUP)[None, :], bounds, float("-inf")), 1)
        tl.store(keys + tile, _quest_key(best), mask=candidate)


@triton.jit
def _quest_kth_in_tile(key, need, SCAN: tl.constexpr):
    # The need-th highest of a row's keys held in one tile (key [SCAN] int32, _quest_key's order; past the
    # candidates the lowest int32) and how many keys are above it: the keys sorted in registers (the H200,
    # SmolLM2's / Llama-3-8B's heads at batch 32 and 8k: the choice takes 3.9 / 5.4 us a layer, 7.3 / 8.3 by
    # bytes; sorting the keys as int64 cost 2.2 us more on Llama-3-8B's).
    ids = tl.arange(0, SCAN)
    kth = tl.sum(tl.where(ids == need - 1, tl.sort(key, descending=True), 0), 0)
    above = tl.sum((key > kth).to(tl.int32), 0)
    return kth, above


@triton.jit
def _quest_kth_by_bytes(keys, candidates, need, SCAN: tl.constexpr):
    # The same for a row of any length, a byte at a time: each of 4 passes over the keys takes a histogram of
    # the next byte of the keys that match the bytes found so far.
    digits = tl.arange(0, 256)
    kth = tl.sum(tl.zeros([256], tl.int64), 0)  # the need-th highest key (as _quest_unsigned_keys gives them)
    above = tl.sum(tl.zeros([256], tl.int32), 0)  # keys past the bytes found so far (>= them + 1 in the last)
    for level in tl.static_range(4):
        shift = 24 - 8 * level
        hist = tl.zeros([256], tl.int32)  # keys matching kth's bytes so far, by their next byte
        for start in range(0, candidates, SCAN):
            ids = start + tl.arange(0, SCAN)
            key = _quest_unsigned_keys(keys, ids, candidates)
            match = ((key >> (shift + 8)) == (kth >> (shift + 8))) & (ids < candidates)
            hist += tl.histogram(tl.where(match, (key >> shift) & 255, 0).to(tl.int32), 256)  # (others: bin 0)
        counts = above + tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # [256]: keys >= kth + (d << shift), d > 0
        byte = tl.sum(((counts >= need) & (digits > 0)).to(tl.int32), 0)
        above = tl.sum(tl.where(digits == byte + 1, counts, 0), 0) + tl.where(byte == 255, above, 0)
        kth += byte.to(tl.int64) << shift
    return kth, above


@triton.jit
def _quest_keep(key, kth, candidate, need, ties_seen, ties_kept):
    # [SCAN] bool: the keys above the need-th highest, and of the ties at it the first ties_kept of the row
    # (ties_seen: those in earlier tiles); none when need is 0 (the need test as a tensor: a scalar bool in a
    # mask trips Triton 3.9's interpreter)
    ties = (key == kth) & candidate
    keep = ((key > kth) & candidate) | (ties & (ties_seen + tl.cumsum(ties.to(tl.int32), 0) <= ties_kept))
    return keep & (key * 0 + need > 0)


@triton.jit
def _quest_select_kernel(
    block_tables_ptr,  # [S, max_blocks]
    context_lens_ptr,  # [S]
    budgets_ptr,  # [S] int32: blocks to read (0: all)
    keys_ptr,  # [S, KV, max_blocks] int32: the bounds' keys (_quest_bounds_kernel's output)
    tables_ptr,  # [S, KV, max_blocks] int32 out: the blocks each KV head reads, in block order
    lens_ptr,  # [S] int32 out: the keys they hold
    stride_table_seq,
    stride_out_seq,
    stride_out_head,
    BLOCK_SIZE: tl.constexpr,
    SCAN: tl.constexpr,  # keys per tile of the search's passes
    PDL: tl.constexpr,
):
    if PDL:
        gdc_wait()
    # One program per (sequence, KV head): the budget - 1 blocks of highest bound (ties to the earlier block)
    # and the last block, in block order — the native CPU kernel's choice (kernels/cpu/paged_attention.c).
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq)
    budget = tl.load(budgets_ptr + seq)
    num_blocks = tl.cdiv(context_len, BLOCK_SIZE)
    table = block_tables_ptr + seq * stride_table_seq
    out = tables_ptr + seq * stride_out_seq + kv_head * stride_out_head
    # The table's first tile and last block, loaded with the lengths rather than after the choice: a row of one
    # tile then goes from its keys to its stores without another round trip (the H200, batch 32 at 8k: 4.6 ->
    # 3.9 us a layer for SmolLM2's heads, 6.2 -> 5.4 for Llama-3-8B's).
    ids = tl.arange(0, SCAN)
    first_tile = tl.load(table + ids, mask=ids < num_blocks, other=0)  # [SCAN]
    last_block = tl.load(table + tl.maximum(num_blocks - 1, 0))
    if budget == 0 or num_blocks <= budget:  # every block, as the sequence's own table has them
        tl.store(out + ids, first_tile, mask=ids < num_blocks)
        for start in range(SCAN, num_blocks, SCAN):
            ids = start + tl.arange(0, SCAN)
            tl.store(out + ids, tl.load(table + ids, mask=ids < num_blocks, other=0), mask=ids < num_blocks)
        if kv_head == 0:
            tl.store(lens_ptr + seq, context_len)
    else:
        keys = keys_ptr + seq * stride_out_seq + kv_head * stride_out_head
        _quest_choose(table, first_tile, last_block, keys, out, num_blocks, budget, SCAN)
        if kv_head == 0:
            tl.store(lens_ptr + seq, _quest_len(context_len, num_blocks, budget, BLOCK_SIZE))


@triton.jit
def _quest_choose(table, first_tile, last_block, keys, out, num_blocks, budget, SCAN: tl.constexpr):
    # out[0, budget): the budget - 1 candidate blocks of highest key (ties to the earlier block), in block order,
    # then the last block. table: the sequence's; first_tile, last_block: its entries [0, SCAN) and
    # num_blocks - 1; keys: the candidates' (_quest_bounds'). The need-th highest key: a sort of the keys when
    # they fit one tile, else found a byte at a time.
    need = budget - 1
    candidates = num_blocks - 1  # (the last block is always read)
    if candidates <= SCAN:  # one tile: its keys stay in registers from the choice to the stores
        ids = tl.arange(0, SCAN)
        tile_key = tl.load(keys + ids, mask=ids < candidates, other=-2147483648)  # [SCAN] int32
        tile_kth, above = _quest_kth_in_tile(tile_key, need, SCAN)
        keep = _quest_keep(tile_key, tile_kth, ids < candidates, need, 0, need - above)
        tl.store(out + tl.cumsum(keep.to(tl.int32), 0) - 1, first_tile, mask=keep)
    else:
        kth, above = _quest_kth_by_bytes(keys, candidates, need, SCAN)
        written = 0
        ties_seen = 0
        for start in range(0, candidates, SCAN):
            ids = start + tl.arange(0, SCAN)
            key = _quest_unsigned_keys(keys, ids, candidates)
            keep = _quest_keep(key, kth, ids < candidates, need, ties_seen, need - above)
            places = out + written + tl.cumsum(keep.to(tl.int32), 0) - 1
            tl.store(places, tl.load(table + ids, mask=keep, other=0), mask=keep)
            written += tl.sum(keep.to(tl.int32), 0)
            ties_seen += tl.sum(((key == kth) & (ids < candidates)).to(tl.int32), 0)
    tl.store(out + need, last_block)


@triton.jit
def _quest_len(context_len, num_blocks, budget, BLOCK_SIZE: tl.constexpr):
    # Tokens in the chosen blocks: budget - 1 whole ones, then the last block's.
    return (budget - 1) * BLOCK_SIZE + context_len - (num_blocks - 1) * BLOCK_SIZE


def _quest_ieee(q: torch.Tensor, summaries: torch.Tensor) -> bool:
    """Whether the bounds' products are float32: float32 operands, or dtypes that differ."""
    return torch.float32 in (q.dtype, summaries.dtype) or q.dtype != summaries.dtype


def _quest_scan(max_blocks: int) -> int:
    """Keys per tile of the choice's passes: QUEST_SCAN, less for narrow tables (a smaller sort)."""
    return min(QUEST_SCAN, max(16, triton.next_power_of_2(max_blocks)))


def quest_tables(
    q: torch.Tensor,
    summaries: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    budgets: torch.Tensor,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quest's choice for a decode step: q [S, H, D] (RoPE applied), summaries [num_blocks, KV, 2, D] (the
    min and max of each block's keys), block_tables [S, max_blocks], context_lens [S], budgets [S] int32
    (blocks to read, 0: all), the cache's block_size -> (tables [S, KV, max_blocks] int32, lens [S] int32): the
    blocks each KV head reads and how many keys they hold, for `paged_decode_attention`. A row whose budget
    covers its blocks keeps its own table. Two kernels: the blocks' bounds (many programs per row), then the
    choice (one per row and KV head)."""
    num_seqs, num_heads, head_dim = q.shape
    _, num_kv_heads, two, sum_dim = summaries.shape
    _check(two == 2 and sum_dim == head_dim and summaries.stride(-1) == 1, f"summaries must be [blocks, KV, 2, {head_dim}]")
    _check(block_tables.dim() == 2 and block_tables.stride(1) == 1, "block_tables must be [S, B], contiguous rows")
    _check(budgets.shape == (num_seqs,) and budgets.dtype == torch.int32, f"budgets must be [{num_seqs}] int32")
    max_blocks = block_tables.shape[1]
    tables = torch.empty(num_seqs, num_kv_heads, max_blocks, dtype=torch.int32, device=q.device)
    keys = torch.empty_like(tables)
    lens = torch.empty(num_seqs, dtype=torch.int32, device=q.device)
    if num_seqs == 0:
        return tables, lens
    block_d = _block_d(head_dim)
    pdl = _pdl(q.device)
    tile = 32  # blocks per step (the H200, batch 32 at 8k: 6.2 us a layer for SmolLM2's heads, 6.9 with 64)
    # Parts per row: a program per tile of the table's width, up to QUEST_BOUND_PARTS (wider tables loop).
    parts = max(1, min(triton.cdiv(max_blocks, tile), QUEST_BOUND_PARTS))
    _quest_bounds_kernel[(num_seqs, num_kv_heads, parts)](
        q, summaries, block_tables, context_lens, budgets, keys,
        q.stride(0), q.stride(1), summaries.stride(0), summaries.stride(1), summaries.stride(2), block_tables.stride(0),
        keys.stride(0), keys.stride(1),
        GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        TILE=tile,
        IEEE=_quest_ieee(q, summaries),
        BLOCK_G=max(16, triton.next_power_of_2(num_heads // num_kv_heads)),
        BLOCK_D=block_d,
        PDL=pdl,
        num_warps=2,  # (the H200, batch 32 at 8k: 6.2 / 20.7 us a layer for SmolLM2's / Llama-3-8B's heads, 6.7 / 21.4 with 4)
        launch_pdl=pdl,
    )  # fmt: skip
    _quest_select_kernel[(num_seqs, num_kv_heads)](
        block_tables, context_lens, budgets, keys, tables, lens,
        block_tables.stride(0), tables.stride(0), tables.stride(1),
        BLOCK_SIZE=block_size,
        SCAN=_quest_scan(max_blocks),
        PDL=pdl,
        num_warps=8,  # (4.7 / 6.0 us as above; 5.0 / 6.3 with 4)
        launch_pdl=pdl,
    )  # fmt: skip
    return tables, lens


# ---------------------------------------------------------------------------------------------------------
# prefill: varlen causal query chunks over the cache
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _prefill_kernel(
    q_ptr,  # [T, H, D]
    k_cache_ptr,  # [num_blocks, block_size, KV, D]
    v_cache_ptr,
    block_tables_ptr,  # [S, max_blocks]
    query_start_loc_ptr,  # [S + 1]
    context_lens_ptr,  # [S]
    out_ptr,  # [T, H, D]
    qk_scale,  # softmax scale * log2(e)
    stride_q_token,
    stride_q_head,
    stride_out_token,
    stride_out_head,
    stride_table_seq,
    stride_cache_block,
    stride_cache_token,
    stride_cache_head,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    SLIDING_WINDOW: tl.constexpr,  # 0 = none
    FP8_MAX: tl.constexpr,  # 0 unless the cache is an 8-bit float (then tiles are widened to q's dtype)
    IEEE: tl.constexpr,
    ALIGNED: tl.constexpr,  # key tiles start at multiples of BLOCK_N whatever the window (batch-invariant)
    BLOCK_M: tl.constexpr,  # rows of the tile: BLOCK_Q queries x GROUP heads (+ padding rows)
    BLOCK_Q: tl.constexpr,  # queries per program = BLOCK_M // GROUP
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    query_block = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    query_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - query_start
    context_len = tl.load(context_lens_ptr + seq)
    first_query = query_block * BLOCK_Q
    if first_query >= query_len:  # the grid is sized for the longest sequence
        return
    # The queries are the last query_len positions of the context.
    first_pos = context_len - query_len + first_query

    # Row r of the tile is query first_query + r // GROUP of head kv_head * GROUP + r % GROUP: the GROUP heads
    # sharing this KV head ride in one tile, so each key/value tile is loaded once for all of them.
    rows = tl.arange(0, BLOCK_M)
    query_idx = first_query + rows // GROUP  # [BLOCK_M]
    heads = kv_head * GROUP + rows % GROUP
    row_mask = (rows < BLOCK_Q * GROUP) & (query_idx < query_len)
    query_pos = first_pos + rows // GROUP  # [BLOCK_M]
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    tile_mask = row_mask[:, None] & dim_mask[None, :]
    tokens = query_start + query_idx  # [BLOCK_M] rows of q and out
    q_offsets = tokens[:, None] * stride_q_token + heads[:, None] * stride_q_head + dims[None, :]
    q = tl.load(q_ptr + q_offsets, mask=tile_mask, other=0.0)  # [BLOCK_M, BLOCK_D]
    if FP8_MAX == 0:
        q = q.to(k_cache_ptr.dtype.element_ty)

    # Keys [lo, hi): up to the last query of the tile, from the window start of its first query.
    hi = context_len - query_len + tl.minimum(first_query + BLOCK_Q, query_len)
    lo = 0
    if SLIDING_WINDOW > 0:
        lo = tl.maximum(first_pos - SLIDING_WINDOW + 1, 0)
        if ALIGNED:  # the first query's window start depends on the chunking; the tile edges must not
            lo = (lo // BLOCK_N) * BLOCK_N

    running_max = tl.full([BLOCK_M], NO_MAX, tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq * stride_table_seq
    for start in range(lo, hi, BLOCK_N):
        positions, key_mask, k, v = _load_kv_tile(
            table, k_cache_ptr, v_cache_ptr, start, hi, kv_head, dims, dim_mask,
            stride_cache_block, stride_cache_token, stride_cache_head, BLOCK_N, BLOCK_SIZE,
        )
        k, v = k.to(q.dtype), v.to(q.dtype)  # a no-op unless the cache is 8-bit
        scores = _dot(q, tl.trans(k), IEEE) * qk_scale  # [BLOCK_M, BLOCK_N]
        allowed = key_mask[None, :] & (positions[None, :] <= query_pos[:, None])
        if SLIDING_WINDOW > 0:
            allowed = allowed & (positions[None, :] > query_pos[:, None] - SLIDING_WINDOW)
        scores = tl.where(allowed, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        rescale = tl.exp2(running_max - new_max)
        probs = tl.exp2(scores - new_max[:, None])
        running_sum = running_sum * rescale + tl.sum(probs, 1)
        acc = acc * rescale[:, None] + _dot(probs.to(v.dtype), v, IEEE)
        running_max = new_max

    out = acc / tl.where(running_sum > 0, running_sum, 1.0)[:, None]
    out_offsets = tokens[:, None] * stride_out_token + heads[:, None] * stride_out_head + dims[None, :]
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=tile_mask)


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
    *,
    batch_invariant: bool = False,
) -> torch.Tensor:
    """Causal attention of a flattened batch over the paged cache (this step's keys already stored).
    q: [T, H, D]; sequence i's queries are rows [query_start_loc[i], query_start_loc[i+1]) ([S + 1] on the
    device) at the last q_len positions of its context_lens[i] ([S] on the device). max_query_len: a host
    bound on q_len that sizes the grid. Decode rows (q_len 1) may be mixed in. Returns out [T, H, D].

    Each query row's result depends only on its position and its sequence's keys: its keys are visited in
    BLOCK_N tiles from position 0 (tiles past the query, fully masked, change nothing), one program per
    query tile and KV head, no split over the keys. So a row gets the same bits however its prompt was
    chunked and whatever else is in the batch; `batch_invariant` also aligns a sliding window's first tile
    (layers/batch_invariant.py runs decode rows here too, instead of the split-K decode kernel)."""
    _check_cache(k_cache, v_cache)
    _check(q.dim() == 3 and q.stride(-1) == 1, f"q must be [T, H, D] with contiguous D, got {tuple(q.shape)}")
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    _check(cache_head_dim == head_dim, f"q head_dim {head_dim} != cache head_dim {cache_head_dim}")
    _check(num_heads % num_kv_heads == 0, f"{num_heads} query heads do not group onto {num_kv_heads} KV heads")
    num_seqs = context_lens.shape[0]
    _check(query_start_loc.shape == (num_seqs + 1,), f"query_start_loc must be [{num_seqs + 1}]")
    per_head = block_tables.dim() == 3
    _check(
        block_tables.shape[0] == num_seqs and (not per_head or block_tables.shape[1] == num_kv_heads) and block_tables.dim() in (2, 3),
        f"block_tables must be [{num_seqs}, B] or [{num_seqs}, {num_kv_heads}, B]",
    )
    _check(block_tables.stride(-1) == 1, "block_tables needs a contiguous last axis")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _check(out.shape == q.shape and out.stride(-1) == 1, f"out must be {tuple(q.shape)} with contiguous D")
    if num_tokens == 0 or num_seqs == 0 or max_query_len <= 0:
        return out

    group = num_heads // num_kv_heads
    block_m = max(PREFILL_BLOCK_M, triton.next_power_of_2(group))
    block_q = block_m // group
    grid = (triton.cdiv(max_query_len, block_q), num_seqs, num_kv_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, query_start_loc, context_lens, out,
        scale * LOG2_E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        SLIDING_WINDOW=sliding_window or 0,
        FP8_MAX=_fp8_max(k_cache),
        IEEE=_ieee(q, k_cache),
        ALIGNED=batch_invariant,
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        BLOCK_D=_block_d(head_dim),
        BLOCK_N=PREFILL_BLOCK_N,
    )  # fmt: skip
    return out
