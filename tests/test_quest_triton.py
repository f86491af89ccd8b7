"""Quest in the Triton decode path (kernels/attention_triton.quest_tables + paged_decode_attention over a
table per KV head, or paged_decode_attention given the summaries and budgets, which chooses in the decode kernel
when unsplit): each KV head reads its last block and the budget - 1 blocks of highest bound, the same blocks the
native CPU kernel chooses, and its output is attention over exactly those keys (the mask form over dense
attention for the same selected keys). In Triton's interpreter without CUDA, compiled with it."""

from __future__ import annotations

import pytest
import torch
from test_triton_kernels import DTYPES, TOLERANCE, last_slots, paged_cache
from triton_setup import DEVICE  # first: it sets up the interpreter before triton is imported

from glassbox.kernels import attention_triton, cpu_native

CONTEXTS = [300, 65, 33, 129, 16, 200, 1]


def summaries_of(k_cache: torch.Tensor, block_tables: torch.Tensor, contexts: list[int]) -> torch.Tensor:
    """[num_blocks, KV, 2, D] float32: each used block's key min and max over the slots its sequence filled."""
    num_blocks, block_size, num_kv, head_dim = k_cache.shape
    out = torch.zeros(num_blocks, num_kv, 2, head_dim, device=k_cache.device)
    for i, n in enumerate(contexts):
        for b in range(-(-n // block_size)):
            block, fill = int(block_tables[i, b]), min(block_size, n - b * block_size)
            keys = k_cache[block, :fill].float()
            out[block, :, 0], out[block, :, 1] = keys.amin(0), keys.amax(0)
    return out


def chosen_blocks(q: torch.Tensor, summaries: torch.Tensor, table: torch.Tensor, n: int, block_size: int, budget: int, kv: int):
    """The rule, readably: block indices (into the table) that kv head `kv` of query heads q [G, D] reads."""
    num_blocks = -(-n // block_size)
    if budget == 0 or num_blocks <= budget:
        return list(range(num_blocks))
    blocks = table[: num_blocks - 1].long()
    low, high = summaries[blocks, kv, 0], summaries[blocks, kv, 1]  # [B, D]
    q = q.float()[:, None]
    bound = torch.maximum(q * low, q * high).sum(-1).amax(0)  # [B]
    top = bound.topk(budget - 1).indices.sort().values.tolist()
    return top + [num_blocks - 1]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("given", ["tables", "summaries"])
@pytest.mark.parametrize(
    "shape, splits",
    [((9, 3, 64, 16), None), ((4, 2, 128, 32), None), ((4, 4, 16, 4), None), ((9, 3, 64, 16), 1), ((4, 2, 128, 32), 1)],
    ids=["9-3-64", "4-2-128", "4-4-16", "9-3-64 one split", "4-2-128 one split"],
)
def test_quest_decode_reads_the_chosen_blocks(shape, splits, given, dtype):
    """However many splits share a KV head's chosen keys (None: the launcher's choice), its output is attention
    over exactly those keys, given quest_tables' tables or the summaries and budgets (unsplit: the decode
    kernel chooses)."""
    num_heads, num_kv, head_dim, block_size = shape
    contexts = [c if c * 4 // block_size > 0 else c for c in CONTEXTS]
    k_cache, v_cache, tables = paged_cache(contexts, num_kv, head_dim, block_size, dtype, seed=3)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(len(contexts), num_heads, head_dim, generator=g).to(DEVICE, dtype)
    k_new = torch.randn(len(contexts), num_kv, head_dim, generator=g).to(DEVICE, dtype)
    v_new = torch.randn(len(contexts), num_kv, head_dim, generator=g).to(DEVICE, dtype)
    slots = last_slots(tables, contexts, block_size)
    lens = torch.tensor(contexts, dtype=torch.int32, device=DEVICE)
    budgets = torch.tensor([4, 3, 2, 0, 4, 5, 2], dtype=torch.int32, device=DEVICE)  # 0: all blocks
    flat_k = k_cache.view(-1, num_kv, head_dim)
    flat_k[slots], v_cache.view(-1, num_kv, head_dim)[slots] = k_new, v_new  # as the kernel will store them
    summaries = summaries_of(k_cache, tables, contexts).to(dtype)  # min/max of stored keys: exact in their dtype
    k_before, v_before = k_cache.clone(), v_cache.clone()
    k_cache.view(-1, num_kv, head_dim)[slots] = 0  # the kernel stores the new keys itself
    v_cache.view(-1, num_kv, head_dim)[slots] = 0

    quest, quest_lens = attention_triton.quest_tables(q, summaries, tables, lens, budgets, block_size)
    scale = head_dim**-0.5
    if given == "tables":
        out = attention_triton.paged_decode_attention(
            q, k_cache, v_cache, quest, quest_lens, scale, k_new=k_new, v_new=v_new, slot_mapping=slots,
            num_splits=splits,
        )  # fmt: skip
    else:
        out = attention_triton.paged_decode_attention(
            q, k_cache, v_cache, tables, lens, scale, k_new=k_new, v_new=v_new, slot_mapping=slots, num_splits=splits,
            quest_summaries=summaries, quest_budgets=budgets,
        )  # fmt: skip
    assert torch.equal(k_cache, k_before) and torch.equal(v_cache, v_before)
    group = num_heads // num_kv
    for i, n in enumerate(contexts):
        budget = int(budgets[i])
        for kv in range(num_kv):
            heads = slice(kv * group, (kv + 1) * group)
            picked = chosen_blocks(q[i, heads], summaries.float(), tables[i], n, block_size, budget, kv)
            got = quest[i, kv, : len(picked)].tolist()
            assert got == [int(tables[i, b]) for b in picked], (i, kv)
            positions = torch.cat([torch.arange(b * block_size, min(b * block_size + block_size, n)) for b in picked])
            assert int(quest_lens[i]) == len(positions)
            rows = tables[i, positions // block_size].long(), positions % block_size
            keys, values = k_before[rows[0], rows[1], kv].float(), v_before[rows[0], rows[1], kv].float()
            expected = torch.softmax(q[i, heads].float() @ keys.T * scale, -1) @ values  # the mask form
            torch.testing.assert_close(out[i, heads].float(), expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.skipif(not cpu_native.available(), reason="needs a C compiler")
def test_the_triton_and_the_native_cpu_kernels_choose_the_same_blocks():
    """One rule in two kernels: the blocks each KV head of a decode token reads, from the same summaries."""
    from glassbox.layers.rotary import RotaryEmbedding

    num_heads, num_kv, head_dim, block_size = 9, 3, 64, 16
    contexts = [300, 129, 200]
    k_cache, v_cache, tables = paged_cache(contexts, num_kv, head_dim, block_size, torch.float32, seed=5)
    k_cache, v_cache, tables = k_cache.cpu(), v_cache.cpu(), tables.cpu()
    summaries = summaries_of(k_cache, tables, [c - 1 for c in contexts])  # the prompts; the kernel adds the token
    g = torch.Generator().manual_seed(6)
    qkv = torch.randn(len(contexts), (num_heads + 2 * num_kv) * head_dim, generator=g)
    cos, sin = RotaryEmbedding(head_dim, 10000.0)(torch.tensor([c - 1 for c in contexts]), torch.float32)
    slots = last_slots(tables, contexts, block_size).cpu()
    starts = torch.arange(len(contexts) + 1, dtype=torch.int32)
    lens = torch.tensor(contexts, dtype=torch.int32)
    budgets = torch.tensor([4, 1, 6], dtype=torch.int32)  # (1: the last block only)
    selected = torch.empty(len(contexts), num_kv, 6, dtype=torch.int32)
    cpu_native.paged_attention(qkv, cos.view(-1, head_dim), sin.view(-1, head_dim), k_cache, v_cache, slots, starts,
                               tables, lens, num_heads, head_dim**-0.5, None, None, summaries, budgets, selected)  # fmt: skip
    from glassbox.layers.rotary import apply_rotary

    q = apply_rotary(qkv[:, : num_heads * head_dim].view(len(contexts), num_heads, head_dim), cos, sin)
    quest, _ = attention_triton.quest_tables(
        q.to(DEVICE), summaries.to(DEVICE), tables.to(DEVICE), lens.to(DEVICE), budgets.to(DEVICE), block_size
    )
    for i in range(len(contexts)):
        budget = int(budgets[i])
        for kv in range(num_kv):
            native = [int(tables[i, b]) for b in selected[i, kv, :budget].tolist()]
            assert quest[i, kv, :budget].tolist() == native


SCAN_BLOCKS = attention_triton.QUEST_SCAN + 1  # a row of this many blocks has one tile of candidates


@pytest.mark.parametrize(
    "contexts, width, budgets",
    [
        ([4 * 4500 - 2, 4 * 700, 4 * 1201], 4600, [300, 100, 1201]),  # (the last row: every block)
        # The choice sorts a row of one tile of candidates and searches longer ones a byte at a time:
        ([4 * SCAN_BLOCKS, 4 * (SCAN_BLOCKS + 1) - 1, 4 * 100], SCAN_BLOCKS + 8, [64, 64, 7]),
    ],
    ids=["long rows", "one tile and one more"],
)
def test_quest_choice_over_long_rows_with_ties(contexts, width, budgets):
    """Rows longer than the choice's tiles (the bounds programs loop, the search passes scan several tiles)
    in a table wider than their blocks, with integer keys whose bounds tie often: the need-th bound's ties
    go to the earliest blocks, as in the native kernel."""
    num_heads, num_kv, head_dim, block_size = 4, 2, 16, 4
    g = torch.Generator().manual_seed(8)
    num_blocks = sum(-(-n // block_size) for n in contexts) + 1
    tables = torch.zeros(len(contexts), width, dtype=torch.int32)
    ids = torch.randperm(num_blocks - 1, generator=g) + 1
    used = 0
    for i, n in enumerate(contexts):
        blocks = -(-n // block_size)
        tables[i, :blocks] = ids[used : used + blocks].int()
        used += blocks
    low = torch.randint(-2, 1, (num_blocks, num_kv, head_dim), generator=g).float()
    summaries = torch.stack([low, low + torch.randint(0, 2, low.shape, generator=g)], 2)  # [blocks, KV, 2, D]
    q = torch.randint(-1, 2, (len(contexts), num_heads, head_dim), generator=g).float()
    budgets = torch.tensor(budgets, dtype=torch.int32)
    q, summaries, tables, budgets = q.to(DEVICE), summaries.to(DEVICE), tables.to(DEVICE), budgets.to(DEVICE)
    context_lens = torch.tensor(contexts, dtype=torch.int32, device=DEVICE)
    quest, lens = attention_triton.quest_tables(q, summaries, tables, context_lens, budgets, block_size)
    # The decode kernel's own choice (unsplit) reads the same blocks: the same output as over quest's tables.
    k_cache = torch.randn(num_blocks, block_size, num_kv, head_dim, generator=g).to(DEVICE)
    v_cache = torch.randn(num_blocks, block_size, num_kv, head_dim, generator=g).to(DEVICE)
    over_tables = attention_triton.paged_decode_attention(q, k_cache, v_cache, quest, lens, 0.25, num_splits=1)
    chosen_here = attention_triton.paged_decode_attention(
        q, k_cache, v_cache, tables, context_lens, 0.25, num_splits=1, quest_summaries=summaries, quest_budgets=budgets
    )
    assert torch.equal(chosen_here, over_tables)
    q, summaries, tables, budgets = q.cpu(), summaries.cpu(), tables.cpu(), budgets.cpu()
    group = num_heads // num_kv
    for i, n in enumerate(contexts):
        blocks, budget = -(-n // block_size), int(budgets[i])
        for kv in range(num_kv):
            if blocks <= budget:
                picked = list(range(blocks))
            else:
                table = tables[i, : blocks - 1].long()
                lo, hi = summaries[table, kv, 0], summaries[table, kv, 1]
                qs = q[i, kv * group : (kv + 1) * group, None]
                bound = torch.maximum(qs * lo, qs * hi).sum(-1).amax(0).tolist()  # exact: small integers
                assert len(set(bound)) < len(bound) // 2  # ties everywhere
                ranked = sorted(range(blocks - 1), key=lambda b: -bound[b])  # stable: ties to the earlier block
                picked = sorted(ranked[: budget - 1]) + [blocks - 1]
            assert quest[i, kv, : len(picked)].tolist() == [int(tables[i, b]) for b in picked], (i, kv)
        kept = n if blocks <= budget else (budget - 1) * block_size + n - (blocks - 1) * block_size
        assert int(lens[i]) == kept
