"""Quest (block-sparse decode) in the native CPU attention (kernels/cpu/paged_attention.c): the block
summaries it keeps are the min/max of each block's keys, each decode token's kv head reads its last block and
the blocks of highest bound, and its output is attention over exactly those keys (the mask form over dense
attention for the same selected keys) on every instruction set this CPU runs."""

from __future__ import annotations

import pytest
import torch
from test_quantized_linear import X86_ISAS, runnable

from glassbox.kernels import cpu_native
from glassbox.layers.rotary import RotaryEmbedding, apply_rotary

pytestmark = pytest.mark.skipif(not cpu_native.available(), reason="needs a C compiler")

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16


def setup(contexts: list[int], cache_dtype: torch.dtype, seed: int = 0):
    """Caches over shuffled blocks; the sequences' prompts (all but their last token) through the kernel
    once with summaries on, so it built them; then the decode step's inputs."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-c // BLOCK) for c in contexts) + 3
    k_cache = torch.zeros(num_blocks, BLOCK, KV_HEADS, HEAD_DIM).to(cache_dtype)
    v_cache = torch.zeros_like(k_cache)
    summaries = torch.full((num_blocks, KV_HEADS, 2, HEAD_DIM), float("nan"))  # stale: every value rewritten
    order = torch.randperm(num_blocks, generator=g)
    width = max(-(-c // BLOCK) for c in contexts)
    tables = torch.full((len(contexts), width), -1, dtype=torch.int32)
    used = 0
    for i, c in enumerate(contexts):
        tables[i, : -(-c // BLOCK)] = order[used : used + -(-c // BLOCK)]
        used += -(-c // BLOCK)
    rotary = RotaryEmbedding(HEAD_DIM, 10000.0)

    def step(seqs: list[tuple[int, int, int]], top: int):  # (sequence, first position, new tokens)
        positions = [p for _, first, n in seqs for p in range(first, first + n)]
        seq_of = [s for s, _, n in seqs for _ in range(n)]
        slots = torch.tensor([int(tables[s, p // BLOCK]) * BLOCK + p % BLOCK for s, p in zip(seq_of, positions)])
        starts = torch.tensor([0] + list(torch.tensor([n for *_, n in seqs]).cumsum(0)), dtype=torch.int32)
        qkv = torch.randn(len(positions), (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=g)
        cos, sin = rotary(torch.tensor(positions), torch.float32)
        t = len(positions)
        selected = torch.full((t, KV_HEADS, max(top, 1)), -7, dtype=torch.int32)
        lens = torch.tensor([first + n for _, first, n in seqs], dtype=torch.int32)
        table = tables[[s for s, *_ in seqs]].contiguous()
        return qkv, cos, sin, slots, starts, table, lens, selected

    prompt = [(i, 0, c - 1) for i, c in enumerate(contexts) if c > 1]
    qkv, cos, sin, slots, starts, table, lens, _ = step(prompt, 0)
    cpu_native.paged_attention(qkv, cos.view(-1, HEAD_DIM), sin.view(-1, HEAD_DIM), k_cache, v_cache, slots, starts,
                               table, lens, HEADS, HEAD_DIM**-0.5, None, quest_summaries=summaries)  # fmt: skip
    return k_cache, v_cache, summaries, tables, step


def bounds(q: torch.Tensor, summaries: torch.Tensor, blocks: torch.Tensor, kv: int) -> torch.Tensor:
    """Quest's bound of each block for kv head kv's query heads q [G, D]: the max over heads of
    Σ_d max(q·min, q·max)."""
    mn, mx = summaries[blocks.long(), kv, 0], summaries[blocks.long(), kv, 1]  # [B, D]
    return torch.maximum(q[:, None] * mn[None], q[:, None] * mx[None]).sum(-1).amax(0)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("isa", X86_ISAS)
def test_quest_reads_the_chosen_blocks_and_equals_the_mask_form(cache_dtype, isa):
    runnable(isa)
    contexts, top = [300, 65, 33, 129, 16, 200], 4
    k_cache, v_cache, summaries, tables, step = setup(contexts, cache_dtype)
    decode = [(i, c - 1, 1) for i, c in enumerate(contexts)] + [(len(contexts) - 1, 0, 0)][:0]
    qkv, cos, sin, slots, starts, table, lens, selected = step(decode, top)
    scale = HEAD_DIM**-0.5
    out = cpu_native.paged_attention(qkv, cos.view(-1, HEAD_DIM), sin.view(-1, HEAD_DIM), k_cache, v_cache, slots,
                                     starts, table, lens, HEADS, scale, None, isa, summaries, top, selected)  # fmt: skip

    keys = k_cache.float()
    for b in range(k_cache.shape[0]):  # the summaries: every written block's min and max, bit for bit
        owner = [(s, i) for s in range(len(contexts)) for i in range(tables.shape[1]) if int(tables[s, i]) == b]
        if owner:
            s, i = owner[0]
            fill = min(BLOCK, contexts[s] - i * BLOCK)
            assert torch.equal(summaries[b, :, 0], keys[b, :fill].amin(0)) and torch.equal(summaries[b, :, 1], keys[b, :fill].amax(0))
    g = HEADS // KV_HEADS
    qk = apply_rotary(qkv[:, : (HEADS + KV_HEADS) * HEAD_DIM].view(len(contexts), -1, HEAD_DIM), cos, sin)
    chose = 0
    for t, c in enumerate(contexts):
        nblocks = -(-c // BLOCK)
        for kv in range(KV_HEADS):
            q = qk[t, kv * g : (kv + 1) * g]  # [G, D]
            chosen = selected[t, kv]
            if nblocks <= top:  # short: all of it, no choice
                assert (chosen == -1).all()
                positions = torch.arange(c)
            else:
                chose += 1
                assert chosen.tolist() == sorted(chosen.tolist()) and int(chosen[-1]) == nblocks - 1
                bound = bounds(q, summaries, tables[t, : nblocks - 1], kv)
                taken = torch.zeros(nblocks - 1, dtype=torch.bool)
                taken[chosen[:-1].long()] = True
                assert bound[taken].min() >= bound[~taken].max() - 1e-4  # the highest bounds (to float order)
                positions = torch.cat([torch.arange(int(b) * BLOCK, min(int(b) * BLOCK + BLOCK, c)) for b in chosen])
            rows = tables[t, positions // BLOCK].long(), positions % BLOCK
            k, v = keys[rows[0], rows[1], kv], v_cache.float()[rows[0], rows[1], kv]  # [n, D]
            expected = torch.softmax(q @ k.T * scale, -1) @ v  # the mask form: only the chosen keys
            got = out[t].view(HEADS, HEAD_DIM)[kv * g : (kv + 1) * g]
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert chose == 4 * KV_HEADS  # the four sequences longer than `top` blocks chose


@pytest.mark.parametrize("isa", X86_ISAS)
def test_quest_leaves_prefill_and_whole_budgets_dense(isa):
    """top_blocks 0, or a prompt chunk in the step: the dense output exactly."""
    runnable(isa)
    contexts = [300, 129]
    k_cache, v_cache, summaries, tables, step = setup(contexts, torch.float32, seed=1)
    inputs = step([(0, 299, 1), (1, 126, 3)], 4)  # a decode token and a 3-token chunk
    qkv, cos, sin, slots, starts, table, lens, selected = inputs
    args = (qkv, cos.view(-1, HEAD_DIM), sin.view(-1, HEAD_DIM))
    rest = (slots, starts, table, lens, HEADS, HEAD_DIM**-0.5, None, isa)
    dense = cpu_native.paged_attention(*args, k_cache.clone(), v_cache.clone(), *rest)
    whole = cpu_native.paged_attention(*args, k_cache.clone(), v_cache.clone(), *rest, summaries.clone(), 0)
    assert torch.equal(whole, dense)
    sparse = cpu_native.paged_attention(*args, k_cache, v_cache, *rest, summaries, 4, selected)
    assert (selected[1:] == -1).all() and torch.equal(sparse[1:], dense[1:])  # the chunk: dense
    assert (selected[0] >= 0).all() and not torch.equal(sparse[0], dense[0])  # the decode token chose
