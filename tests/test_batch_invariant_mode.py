"""The batch-invariant mode's kernels and layers: a row's result is the same bits whatever else is in the
batch and however its prompt was chunked (engine/batch_invariant.py).

Without CUDA the Triton kernels run in Triton's interpreter on CPU tensors (tiny sizes), which proves the
kernels' own logic (no configuration chosen by M, no split by the batch, key tiles fixed per position);
with CUDA the same tests run compiled, bfloat16 included. The engine on real shapes is in
tests/test_gpu_batch_invariant.py; the CPU default through the server in tests/test_batch_invariance.py.
"""

from __future__ import annotations

import pytest
import torch
from triton_setup import DEVICE, WITH_BFLOAT16  # first: it sets up the interpreter before triton is imported

from conftest import run_all

from glassbox import SamplingParams
from glassbox.config import EngineConfig
from glassbox.kernels import attention_torch, attention_triton, matmul_triton, rms_norm_triton

DTYPES = [torch.float32, torch.float16, *WITH_BFLOAT16]
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def random(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


# ---- matmul


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_matmul_rows_do_not_depend_on_the_number_of_rows(dtype, bias):
    """K = 200 (three full 64-wide K tiles and a partial one), N = 130 (a partial N tile), 150 rows: every
    prefix of the rows, and each row alone, gives the full product's rows bit for bit; and the product is
    F.linear's within the dtype's rounding."""
    x = random(150, 200, dtype=dtype, seed=0)
    weight = random(130, 200, dtype=dtype, seed=1) / 10
    b = random(130, dtype=dtype, seed=2) if bias else None
    full = matmul_triton.linear(x, weight, b)
    expected = torch.nn.functional.linear(x.float(), weight.float(), None if b is None else b.float())
    assert (full.float() - expected).abs().max() <= TOLERANCE[dtype] * expected.abs().max()
    for rows in (1, 2, 3, 17, 64, 65, 129):
        assert torch.equal(matmul_triton.linear(x[:rows], weight, b), full[:rows]), f"first {rows} rows"
    for row in (0, 63, 64, 149):
        assert torch.equal(matmul_triton.linear(x[row : row + 1], weight, b), full[row : row + 1]), f"row {row}"


def test_matmul_takes_a_transposed_weight_and_leading_dims():
    """A column-major weight (what engine/optimize.py leaves on the CPU) and x [2, 3, K]: the same bits as
    the contiguous weight on x flattened."""
    x = random(2, 3, 64, dtype=torch.float32, seed=3)
    weight = random(48, 64, dtype=torch.float32, seed=4)
    column_major = weight.t().contiguous().t()
    out = matmul_triton.linear(x, column_major)
    assert out.shape == (2, 3, 48)
    assert torch.equal(out.reshape(6, 48), matmul_triton.linear(x.reshape(6, 64), weight))
    with pytest.raises(matmul_triton.TritonMatmulError, match="does not fit"):
        matmul_triton.linear(x, weight[:, :32])


# ---- RMSNorm


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_rows_do_not_depend_on_the_batch(dtype):
    """Hidden rows [T, D] and per-head rows of a fused projection's view [T, H, D] (Qwen3's q/k norms):
    each row alone gives its bits in the batch, and the values are F.rms_norm's."""
    weight = random(96, dtype=dtype, seed=5)
    x = random(37, 96, dtype=dtype, seed=6) * 3
    full = rms_norm_triton.rms_norm(x, weight, 1e-6)
    expected = torch.nn.functional.rms_norm(x.float(), (96,), weight.float(), 1e-6)
    assert (full.float() - expected).abs().max() <= TOLERANCE[dtype] * expected.abs().max()
    for rows in (1, 5, 36):
        assert torch.equal(rms_norm_triton.rms_norm(x[:rows], weight, 1e-6), full[:rows])
    fused = random(11, 3 * 4 * 32, dtype=dtype, seed=7)  # [T, (q heads + k heads + v heads) * head_dim]
    heads = fused[:, : 4 * 32].view(11, 4, 32)  # a strided view, as LlamaAttention.attend makes it
    head_weight = random(32, dtype=dtype, seed=8)
    per_head = rms_norm_triton.rms_norm(heads, head_weight, 1e-6)
    assert torch.equal(per_head, rms_norm_triton.rms_norm(heads.contiguous(), head_weight, 1e-6))
    assert torch.equal(rms_norm_triton.rms_norm(heads[3:4], head_weight, 1e-6), per_head[3:4])


# ---- attention


def filled_cache(context_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype):
    """A cache whose slots hold random keys/values for every position of every sequence (as if computed),
    shuffled blocks per sequence. Returns k_cache, v_cache, block_tables [S, B]."""
    generator = torch.Generator().manual_seed(9)
    blocks_per_seq = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(blocks_per_seq) + 2
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=generator).to(DEVICE, dtype)
    v_cache = torch.randn(shape, generator=generator).to(DEVICE, dtype)
    ids = torch.randperm(num_blocks, generator=generator).tolist()
    tables = torch.zeros(len(context_lens), max(blocks_per_seq), dtype=torch.int32)
    for i, count in enumerate(blocks_per_seq):
        tables[i, :count] = torch.tensor(ids[:count])
        ids = ids[count:]
    return k_cache, v_cache, tables.to(DEVICE)


def attend(q_rows, k_cache, v_cache, tables, pieces, scale, window):
    """Batch-invariant attention of one step. pieces: (sequence, first position, number of queries) per
    batch row; q_rows[s] is sequence s's queries [len, H, D] for every position. Returns each piece's out."""
    q = torch.cat([q_rows[s][first : first + n] for s, first, n in pieces])
    starts = [0]
    for _, _, n in pieces:
        starts.append(starts[-1] + n)
    out = attention_triton.prefill_attention(
        q, k_cache, v_cache, tables[[s for s, _, _ in pieces]].contiguous(),
        torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        torch.tensor([first + n for _, first, n in pieces], dtype=torch.int32, device=DEVICE),
        max(n for _, _, n in pieces), scale, window, batch_invariant=True,
    )  # fmt: skip
    return [out[a:b] for a, b in zip(starts, starts[1:])]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 37])
@pytest.mark.parametrize("heads", [(4, 2, 32), (6, 2, 64)], ids=["gqa2-d32", "gqa3-d64"])
def test_attention_rows_do_not_depend_on_batch_or_chunking(dtype, window, heads):
    """Sequence 0 has 150 positions (three 64-key tiles). Its rows computed as one whole prompt, as chunks
    of 64 beside other sequences' prefills and decodes, and its last rows as decode rows alone or in a
    batch: the same bits. And the values are the reference's."""
    num_heads, num_kv_heads, head_dim = heads
    lengths = [150, 90, 40]
    k_cache, v_cache, tables = filled_cache(lengths, num_kv_heads, head_dim, 16, dtype)
    q_rows = [random(n, num_heads, head_dim, dtype=dtype, seed=10 + s) for s, n in enumerate(lengths)]
    scale = head_dim**-0.5
    (whole,) = attend(q_rows, k_cache, v_cache, tables, [(0, 0, 150)], scale, window)

    reference, _ = attention_torch.attend_cached(
        q_rows[0].float(), k_cache.float(), v_cache.float(), tables[0], 150, scale, window
    )
    assert (whole.float() - reference).abs().max() <= TOLERANCE[dtype] * 10

    chunked = [
        attend(q_rows, k_cache, v_cache, tables, [(1, 89, 1), (0, 0, 64)], scale, window)[1],
        attend(q_rows, k_cache, v_cache, tables, [(0, 64, 64), (2, 0, 40)], scale, window)[0],
        attend(q_rows, k_cache, v_cache, tables, [(2, 39, 1), (1, 30, 50), (0, 128, 22)], scale, window)[2],
    ]
    assert torch.equal(torch.cat(chunked), whole)
    decode_alone = attend(q_rows, k_cache, v_cache, tables, [(0, 149, 1)], scale, window)[0]
    decode_batched = attend(q_rows, k_cache, v_cache, tables, [(1, 89, 1), (0, 149, 1), (2, 39, 1)], scale, window)[1]
    decode_beside_prefill = attend(q_rows, k_cache, v_cache, tables, [(2, 0, 40), (0, 140, 1)], scale, window)[1]
    assert torch.equal(decode_alone, whole[149:])
    assert torch.equal(decode_batched, whole[149:])
    assert torch.equal(decode_beside_prefill, whole[140:141])


# ---- the sampler


def test_seeded_draws_do_not_depend_on_the_batch():
    """The sampler's rows, seeded, filtered (top_p) or by temperature alone: a seeded row draws the same
    token alone as among 12 rows with other seeds and params of the same kind (on CUDA through the Triton
    draw; on the CPU through the PyTorch inverse CDF)."""
    from glassbox.sampling import SampleRequest, SamplingParams, sample_tokens

    logits = random(12, 3000, dtype=torch.float32, seed=11) * 3
    for kind in ({"temperature": 0.7}, {"temperature": 0.9, "top_p": 0.8}):
        def request(i: int) -> SampleRequest:
            generator = torch.Generator(DEVICE).manual_seed(500 + i)
            return SampleRequest(SamplingParams(seed=500 + i, **kind), [], [], generator)

        default = torch.Generator(DEVICE).manual_seed(0)
        batched = sample_tokens(logits, [request(i) for i in range(12)], default).tolist()
        alone = [sample_tokens(logits[i : i + 1], [request(i)], default).item() for i in range(12)]
        assert batched == alone, kind
        assert len(set(alone)) > 1  # the draws are draws, not one argmax



def test_triton_draw_rows_do_not_depend_on_the_batch():
    """The Triton draw (one program per row): each row's token is the same alone and among 12 rows."""
    from glassbox.kernels import sampling_triton

    logits = random(12, 3000, dtype=torch.float32, seed=12) * 3
    generator = torch.Generator().manual_seed(13)
    u = torch.rand(12, generator=generator).to(DEVICE)
    scale = (0.5 + torch.rand(12, generator=generator)).to(DEVICE)
    batched = sampling_triton.draw(logits, scale, u)
    alone = torch.cat([sampling_triton.draw(logits[i : i + 1], scale[i : i + 1], u[i : i + 1]) for i in range(12)])
    assert torch.equal(batched, alone) and len(set(alone.tolist())) > 1


# ---- the layers on a whole model, through the engine


PROMPTS = [[(7 * i + 3 * j) % 300 + 1 for j in range(9 + 6 * i)] for i in range(4)]  # 9 to 27 tokens


def run(engine, prompts: list[list[int]], params: SamplingParams) -> list[tuple[list[int], list, list]]:
    outputs = run_all(engine, prompts, params)
    return [(o.token_ids, o.logprobs, o.prompt_logprobs) for o in outputs]


@pytest.mark.skipif(DEVICE == "cuda", reason="tests/test_gpu_batch_invariant.py runs the engine on CUDA")
@pytest.mark.parametrize("family", ["qwen3", "mistral"])  # the interpreter is slow: ~1 min each
def test_converted_model_rows_do_not_depend_on_batch_or_chunking(tiny_model_dir, family):
    """The tiny models with the batch-invariant layers (Triton kernels in the interpreter, float32) through
    the CPU engine: each prompt alone, all four together, and with 8-token step budgets (prompts chunked,
    decodes beside prefill chunks): the same tokens, logprobs and prompt logprobs, bit for bit. Mistral's
    sliding window (5) crosses tile edges; Qwen3 normalizes q and k per head."""
    from glassbox.engine.batch_invariant import convert_layers
    from glassbox.engine.llm_engine import LLMEngine
    from glassbox.layers.batch_invariant import BatchInvariantAttentionBackend, is_batch_invariant
    from glassbox.models.loader import load_model

    loaded = load_model(tiny_model_dir(family))
    convert_layers(loaded.model)
    assert is_batch_invariant(loaded.model)

    def engine(budget: int) -> LLMEngine:
        config = EngineConfig(num_kv_blocks=64, block_size=16, quantization="none", max_num_batched_tokens=budget,
                              enable_prefix_caching=False)
        return LLMEngine(loaded, config)

    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    big = engine(2048)
    assert isinstance(big.runner.model.layers[0].self_attn.attn.backend, BatchInvariantAttentionBackend)
    alone = [run(big, [p], params)[0] for p in PROMPTS]
    together = run(big, PROMPTS, params)
    chunked = run(engine(8), PROMPTS, params)
    assert together == alone
    assert chunked == alone
    assert all(len(tokens) == 5 for tokens, _, _ in alone)


def test_conversion_keeps_parameters_and_drops_the_compiled_executor(tiny_model_dir):
    """The converted model holds the same parameter tensors (a tied head stays tied), and the compiled
    executor no longer applies to it on CUDA (inductor picks reductions by shape): steps run the eager
    forward and its CUDA graphs."""
    from glassbox.engine.batch_invariant import convert_layers
    from glassbox.engine.executors import REGISTRY
    from glassbox.layers.batch_invariant import BatchInvariantLinear, BatchInvariantRMSNorm
    from glassbox.models.loader import load_model

    model = load_model(tiny_model_dir("qwen2")).model  # tied embeddings
    before = {name: p for name, p in model.named_parameters(remove_duplicate=False)}
    compiled_applies = REGISTRY["compiled"][0]
    assert compiled_applies(model, torch.device("cuda"), True)
    convert_layers(model)
    convert_layers(model)  # idempotent
    after = dict(model.named_parameters(remove_duplicate=False))
    assert after.keys() == before.keys() and all(after[name] is p for name, p in before.items())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert isinstance(model.lm_head, BatchInvariantLinear) and isinstance(model.model.norm, BatchInvariantRMSNorm)
    assert not compiled_applies(model, torch.device("cuda"), True)


def test_batch_invariant_runs_on_one_rank():
    with pytest.raises(ValueError, match="one rank"):
        EngineConfig(batch_invariant=True, tensor_parallel_size=2)
