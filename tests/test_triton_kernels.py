"""The Triton attention kernels against the PyTorch reference (attention_torch) on fresh random inputs.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (small sizes; no bfloat16, whose tl.dot the
interpreter gets wrong); with CUDA they run compiled, in bfloat16 too."""

from __future__ import annotations

import pytest
import torch
from triton_setup import DEVICE, WITH_BFLOAT16  # first: it sets up the interpreter before triton is imported

from glassbox.kernels import attention_torch, attention_triton

DTYPES = [torch.float32, torch.float16, *WITH_BFLOAT16]
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}

# (num_heads, num_kv_heads, head_dim, block_size): GQA 3:1, SmolLM2 (9:3), MHA with the tiny test models'
# block size 4 and head_dim 16, head_dim 128 with 32-token blocks.
SHAPES = [(6, 2, 64, 16), (9, 3, 64, 16), (4, 4, 16, 4), (4, 2, 128, 32)]


@pytest.fixture(autouse=True)
def no_tf32():
    # The reference's float32 matmuls must be exact too for the 1e-4 check on a GPU.
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def paged_cache(
    context_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random cache (unused slots hold random values too, so a leak shows) and block tables that give each
    sequence shuffled blocks, padded with -1 plus one spare column. Returns k_cache, v_cache, block_tables."""
    generator = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(blocks_per_seq) + 3
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=generator).to(DEVICE, dtype)
    v_cache = torch.randn(shape, generator=generator).to(DEVICE, dtype)
    block_ids = torch.randperm(num_blocks, generator=generator).tolist()
    block_tables = torch.full((len(context_lens), max(blocks_per_seq) + 1), -1, dtype=torch.int32)
    for i, count in enumerate(blocks_per_seq):
        block_tables[i, :count] = torch.tensor(block_ids[:count])
        block_ids = block_ids[count:]
    return k_cache, v_cache, block_tables.to(DEVICE)


def last_slots(block_tables: torch.Tensor, context_lens: list[int], block_size: int) -> torch.Tensor:
    """[S] int64: each sequence's slot for its last position (its new token in a decode step), -1 if empty."""
    slots = [
        int(block_tables[i, (n - 1) // block_size]) * block_size + (n - 1) % block_size if n else -1
        for i, n in enumerate(context_lens)
    ]
    return torch.tensor(slots, device=DEVICE)


def reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_lens: list[int],
    context_lens: list[int],
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """attention_torch.attention in float32, sequence by sequence; sequences without queries are skipped."""
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for i, (query_len, context_len) in enumerate(zip(query_lens, context_lens)):
        if query_len == 0:
            continue
        rows = slice(starts[i], starts[i + 1])
        out[rows], _ = attention_torch.attention(
            q[rows].float(), None, None, k_cache.float(), v_cache.float(), block_tables[i : i + 1],
            [0, query_len], [context_len], scale, sliding_window,
        )  # fmt: skip
    return out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(actual.float(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def decode_storing(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: list[int],
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    sliding_window: int | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """The decode kernel storing k_new/v_new itself (k_cache and v_cache change in place) and, on copies of
    the caches, store_kv then the reference: (out, expected out, expected k_cache, expected v_cache, slots).
    The last sequence is a padding row (context 0)."""
    block_size, head_dim = k_cache.shape[1], q.shape[-1]
    slot_mapping = last_slots(block_tables, context_lens, block_size)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    attention_torch.store_kv(k_new[:-1], v_new[:-1], expected_k, expected_v, slot_mapping[:-1])
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    scale = head_dim**-0.5
    out = attention_triton.paged_decode_attention(
        q, k_cache, v_cache, block_tables, lens, scale, sliding_window, num_splits=num_splits,
        k_new=k_new, v_new=v_new, slot_mapping=slot_mapping,
    )  # fmt: skip
    query_lens = [1 if n > 0 else 0 for n in context_lens]
    expected = reference(q, expected_k, expected_v, block_tables, query_lens, context_lens, scale, sliding_window)
    return out, expected, expected_k, expected_v, slot_mapping


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_writes_slots_and_skips_padding(dtype):
    torch.manual_seed(0)
    num_kv_heads, head_dim, block_size = 3, 64, 16
    k_cache = torch.randn(6, block_size, num_kv_heads, head_dim, device=DEVICE).to(dtype)
    v_cache = torch.randn_like(k_cache)
    slots = torch.randperm(6 * block_size, device=DEVICE)[:10]
    slot_mapping = torch.cat([slots, torch.tensor([-1, -1], device=DEVICE)])  # two padding rows (CUDA graphs)
    # k, v as views of one fused projection: strided rows, as the model hands them over.
    kv = torch.randn(12, 2 * num_kv_heads * head_dim + 8, device=DEVICE).to(dtype)
    k = kv[:, : num_kv_heads * head_dim].view(12, num_kv_heads, head_dim)
    v = kv[:, num_kv_heads * head_dim : 2 * num_kv_heads * head_dim].view(12, num_kv_heads, head_dim)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    attention_torch.store_kv(k[:10], v[:10], expected_k, expected_v, slots)

    attention_triton.store_kv(k, v, k_cache, v_cache, slot_mapping)

    assert torch.equal(k_cache, expected_k)
    assert torch.equal(v_cache, expected_v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [None, 3])
@pytest.mark.parametrize("sliding_window", [None, 20])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "H{}-KV{}-D{}-bs{}".format(*s))
def test_paged_decode_attention_matches_reference(shape, sliding_window, num_splits, dtype):
    num_heads, num_kv_heads, head_dim, block_size = shape
    # A single token, exactly two blocks, lengths around a block edge, long ones (two 128-key tiles for the
    # 150), and a padding row.
    context_lens = [1, 2 * block_size, block_size + 1, 7, 70, 150, 0]
    k_cache, v_cache, block_tables = paged_cache(context_lens, num_kv_heads, head_dim, block_size, dtype, seed=1)
    torch.manual_seed(2)
    q = torch.randn(len(context_lens), num_heads, head_dim, device=DEVICE).to(dtype)
    scale = head_dim**-0.5
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    out = torch.full_like(q, float("nan"))  # the padding row must be overwritten with zeros

    result = attention_triton.paged_decode_attention(
        q, k_cache, v_cache, block_tables, lens, scale, sliding_window, out=out, num_splits=num_splits
    )

    assert result is out
    query_lens = [1 if n > 0 else 0 for n in context_lens]
    expected = reference(q, k_cache, v_cache, block_tables, query_lens, context_lens, scale, sliding_window)
    assert_close(out, expected, dtype)
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_splits", "sliding_window"), [(None, None), (3, None), (3, 20)])
@pytest.mark.parametrize("shape", SHAPES[1:3], ids=lambda s: "H{}-KV{}-D{}-bs{}".format(*s))
def test_paged_decode_attention_stores_the_new_keys(shape, num_splits, sliding_window, dtype):
    """With k_new/v_new the decode kernel does store_kv's work: the cache ends as store_kv leaves it and the
    output is attention over that cache, though the slots held other values when the kernel started."""
    num_heads, num_kv_heads, head_dim, block_size = shape
    context_lens = [1, 2 * block_size, block_size + 1, 70, 0]
    k_cache, v_cache, block_tables = paged_cache(context_lens, num_kv_heads, head_dim, block_size, dtype, seed=5)
    torch.manual_seed(6)
    num_seqs = len(context_lens)
    q = torch.randn(num_seqs, num_heads, head_dim, device=DEVICE).to(dtype)
    # k and v as the model hands them over: views into wider tensors, with different row strides.
    k_new = torch.randn(num_seqs, 3 * num_kv_heads, head_dim, device=DEVICE).to(dtype)[:, num_kv_heads : 2 * num_kv_heads]
    v_new = torch.randn(num_seqs, 5 * num_kv_heads, head_dim, device=DEVICE).to(dtype)[:, 4 * num_kv_heads :]

    out, expected, expected_k, expected_v, _ = decode_storing(
        q, k_cache, v_cache, block_tables, context_lens, k_new, v_new, sliding_window, num_splits
    )

    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sliding_window", [None, 20])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "H{}-KV{}-D{}-bs{}".format(*s))
def test_prefill_attention_matches_reference(shape, sliding_window, dtype):
    num_heads, num_kv_heads, head_dim, block_size = shape
    # (query_len, context_len): whole prompts (one an exact number of blocks, one a single token), a prefix-cache
    # hit (the first 31 tokens were cached), decode rows mixed in, and a sequence with no queries this step.
    layout = [(37, 37), (2 * block_size, 2 * block_size), (19, 50), (1, 33), (1, 1), (0, 0), (1, 70)]
    query_lens = [n for n, _ in layout]
    context_lens = [n for _, n in layout]
    k_cache, v_cache, block_tables = paged_cache(context_lens, num_kv_heads, head_dim, block_size, dtype, seed=3)
    torch.manual_seed(4)
    q = torch.randn(sum(query_lens), num_heads, head_dim, device=DEVICE).to(dtype)
    scale = head_dim**-0.5
    starts = torch.tensor([0] + query_lens, device=DEVICE).cumsum(0).to(torch.int32)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)

    out = attention_triton.prefill_attention(
        q, k_cache, v_cache, block_tables, starts, lens, max(query_lens), scale, sliding_window
    )

    expected = reference(q, k_cache, v_cache, block_tables, query_lens, context_lens, scale, sliding_window)
    assert_close(out, expected, dtype)


def test_store_then_attend_matches_the_torch_backend():
    """The two kernels chained as a backend would: store a prefill chunk after a cached prefix, then attend."""
    torch.manual_seed(5)
    num_heads, num_kv_heads, head_dim, block_size = 9, 3, 64, 16
    k_cache = torch.zeros(8, block_size, num_kv_heads, head_dim, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    block_table = torch.tensor([[5, 2, 7, -1]], dtype=torch.int32, device=DEVICE)
    cached, new = 20, 15  # 20 tokens already in the cache, 15 new ones this step
    positions = torch.arange(cached + new, device=DEVICE)
    slots = (block_table[0, positions // block_size] * block_size + positions % block_size).long()
    k_all = torch.randn(cached + new, num_kv_heads, head_dim, device=DEVICE)
    v_all = torch.randn_like(k_all)
    attention_torch.store_kv(k_all[:cached], v_all[:cached], k_cache, v_cache, slots[:cached])
    q = torch.randn(new, num_heads, head_dim, device=DEVICE)
    starts = torch.tensor([0, new], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([cached + new], dtype=torch.int32, device=DEVICE)

    attention_triton.store_kv(k_all[cached:], v_all[cached:], k_cache, v_cache, slots[cached:])
    out = attention_triton.prefill_attention(q, k_cache, v_cache, block_table, starts, lens, new, head_dim**-0.5)

    expected, _ = attention_torch.attend(q, k_all, v_all, head_dim**-0.5)
    assert_close(out, expected, torch.float32)


@pytest.mark.skipif(DEVICE != "cuda", reason="8-bit float tiles need a GPU (the interpreter has no fp8 dot)")
@pytest.mark.parametrize("num_splits", [None, 3])
def test_fp8_cache_kernels_match_the_torch_path(num_splits):
    """A float8_e4m3fn cache under bfloat16 queries (kv_cache_dtype="fp8"): the stores write the bytes the
    torch path writes (saturated, not NaN, past 448), and decode and prefill equal attention over that cache."""
    num_heads, num_kv_heads, head_dim, block_size = 16, 8, 128, 16
    context_lens = [1, 2 * block_size, 70, 300, 0]
    k_cache, v_cache, block_tables = paged_cache(context_lens, num_kv_heads, head_dim, block_size, torch.bfloat16, seed=7)
    k_cache, v_cache = k_cache.to(torch.float8_e4m3fn), v_cache.to(torch.float8_e4m3fn)
    torch.manual_seed(8)
    num_seqs = len(context_lens)
    q = torch.randn(num_seqs, num_heads, head_dim, device=DEVICE, dtype=torch.bfloat16)
    k_new = torch.randn(num_seqs, num_kv_heads, head_dim, device=DEVICE, dtype=torch.bfloat16)
    k_new[0, 0, :4] = torch.tensor([1000.0, -1000.0, 448.0, 0.01])  # beyond, at and well inside the range
    v_new = torch.randn_like(k_new)

    out, expected, expected_k, expected_v, slot_mapping = decode_storing(
        q, k_cache, v_cache, block_tables, context_lens, k_new, v_new, num_splits=num_splits
    )

    assert torch.equal(k_cache.view(torch.uint8), expected_k.view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8), expected_v.view(torch.uint8))
    assert expected_k.view(-1, num_kv_heads, head_dim)[slot_mapping[0], 0, :2].float().tolist() == [448.0, -448.0]
    assert_close(out, expected, torch.bfloat16)

    # Prefill: the last 40 tokens of the 70- and 300-token sequences, stored by store_kv first.
    prefill_lens, query_lens = [70, 300], [40, 40]
    tables = block_tables[2:4].contiguous()
    q = torch.randn(sum(query_lens), num_heads, head_dim, device=DEVICE, dtype=torch.bfloat16)
    k_chunk = torch.randn(sum(query_lens), num_kv_heads, head_dim, device=DEVICE, dtype=torch.bfloat16)
    v_chunk = torch.randn_like(k_chunk)
    chunk_slots = torch.tensor([
        int(tables[i, p // block_size]) * block_size + p % block_size
        for i, n in enumerate(prefill_lens) for p in range(n - 40, n)
    ], device=DEVICE)  # fmt: skip
    attention_torch.store_kv(k_chunk, v_chunk, expected_k, expected_v, chunk_slots)
    attention_triton.store_kv(k_chunk, v_chunk, k_cache, v_cache, chunk_slots)
    assert torch.equal(k_cache.view(torch.uint8), expected_k.view(torch.uint8))
    starts = torch.tensor([0, 40, 80], dtype=torch.int32, device=DEVICE)
    scale = head_dim**-0.5
    out = attention_triton.prefill_attention(
        q, k_cache, v_cache, tables, starts, torch.tensor(prefill_lens, dtype=torch.int32, device=DEVICE), 40, scale
    )
    expected = reference(q, expected_k, expected_v, tables, query_lens, prefill_lens, scale, None)
    assert_close(out, expected, torch.bfloat16)


def test_launchers_reject_bad_shapes():
    k_cache = torch.zeros(4, 16, 2, 64, device=DEVICE)
    q = torch.zeros(3, 5, 64, device=DEVICE)  # 5 heads do not group onto 2 KV heads
    tables = torch.zeros(3, 2, dtype=torch.int32, device=DEVICE)
    lens = torch.ones(3, dtype=torch.int32, device=DEVICE)
    with pytest.raises(attention_triton.TritonAttentionError, match="group"):
        attention_triton.paged_decode_attention(q, k_cache, k_cache, tables, lens, 0.125)
