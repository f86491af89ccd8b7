"""Sparse attention masks: each method's keep pattern on random inputs, parsing with field-named errors,
and in the engine: a mask that keeps everything is exactly dense; masked and plain sequences share a batch
without changing each other."""

from __future__ import annotations

import math

import pytest
import torch

from glassbox.config import EngineConfig
from glassbox.engine.llm_engine import LLMEngine
from glassbox.kernels.attention_torch import attend, causal_mask
from glassbox.layers.sparsity import MaskInputs, SparsityError, SparsityMethod, SparsityState, parse_sparsity, share
from glassbox.models.loader import load_model
from glassbox.sampling import SamplingParams

H, KV, D = 4, 2, 8


def masked_probs(spec: dict, q_len: int = 12, context_len: int = 20, seed: int = 0) -> tuple[torch.Tensor, SparsityState]:
    """Run one sequence's attention with the mask; return the probabilities [H, Lq, Lk]."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(q_len, H, D, generator=g)
    k = torch.randn(context_len, KV, D, generator=g)
    v = torch.randn(context_len, KV, D, generator=g)
    state = SparsityState(parse_sparsity(spec))
    _, probs = attend(q, k, v, D**-0.5, return_probs=True, select=lambda *a: state.select(0, *a))
    return probs, state


def test_top_k_keeps_k_keys_per_row_and_the_best_one():
    probs, state = masked_probs({"method": "top_k", "k": 1})
    assert ((probs > 0).sum(-1) == 1).all() and torch.allclose(probs.amax(-1), torch.ones(()))
    dense, _ = masked_probs({"method": "dense"})
    assert (probs.argmax(-1) == dense.argmax(-1)).all()  # the one kept key is the best one
    probs, state = masked_probs({"method": "top_k", "k": 3})
    allowed = causal_mask(12, 20, None, torch.device("cpu")).sum(-1).clamp(max=3)
    assert ((probs > 0).sum(-1) == allowed).all()
    assert state.density() == pytest.approx(float(allowed.sum() * H) / float(causal_mask(12, 20, None, "cpu").sum() * H))


def test_design_shapes_parse():
    ratio = parse_sparsity({"sparsity_ratio": 0.8, "method": "top_k"})
    assert ratio.spec() == {"method": "top_k", "sparsity_ratio": 0.8}
    probs, state = masked_probs({"sparsity_ratio": 0.8, "method": "top_k"})
    n = causal_mask(12, 20, None, "cpu").sum(-1)
    assert ((probs > 0).sum(-1) == torch.ceil(n * 0.2)).all()
    pattern = parse_sparsity({"mask_pattern": "top_k", "k": 32, "threshold": 0.1})
    assert pattern.spec() == {"method": "top_k", "k": 32, "threshold": 0.1}
    probs, _ = masked_probs({"mask_pattern": "top_k", "k": 32, "threshold": 0.1})
    dense, _ = masked_probs({"method": "dense"})
    best = dense == dense.amax(-1, keepdim=True)
    assert ((probs > 0) == ((dense >= 0.1) | best)).all()  # k=32 keeps all 20; the threshold drops the rest


def test_threshold_keeps_the_keys_above_it():
    probs, _ = masked_probs({"method": "threshold", "threshold": 0.08})
    dense, _ = masked_probs({"method": "dense"})
    assert ((probs > 0) == ((dense >= 0.08) | (dense == dense.amax(-1, keepdim=True)))).all()


def test_sliding_window_keeps_sinks_and_the_window():
    probs, _ = masked_probs({"method": "sliding_window", "window": 4, "sink_tokens": 2})
    q_pos = torch.arange(8, 20)[:, None]
    k_pos = torch.arange(20)[None, :]
    expected = (k_pos <= q_pos) & ((k_pos > q_pos - 4) | (k_pos < 2))
    assert ((probs > 0) == expected).all()
    assert parse_sparsity({"method": "sliding_window", "window": 16, "sink_tokens": 4}).is_dense(20)
    assert not parse_sparsity({"method": "sliding_window", "window": 16, "sink_tokens": 4}).is_dense(21)


def test_block_sparse_keeps_whole_blocks_chosen_by_an_upper_bound():
    probs, _ = masked_probs({"method": "block_sparse", "block_size": 4, "top_blocks": 2})
    kept_blocks = (probs > 0).view(H, 12, 5, 4).any(-1)  # [H, Lq, blocks]
    assert (kept_blocks.sum(-1) <= 2).all()
    q_block = torch.arange(8, 20) // 4
    assert kept_blocks[:, torch.arange(12), q_block].all()  # the query's own block always
    # The Quest bound really bounds q·k inside every block.
    g = torch.Generator().manual_seed(1)
    q, keys = torch.randn(3, H, D, generator=g), torch.randn(16, KV, D, generator=g)
    allowed = causal_mask(3, 16, None, "cpu")
    scores = torch.einsum("qhd,khd->hqk", q, keys.repeat_interleave(H // KV, 1))
    method = parse_sparsity({"method": "block_sparse", "block_size": 4, "top_blocks": 1})
    keep = method.keep(MaskInputs(scores.masked_fill(~allowed, float("-inf")), allowed, q, keys, 0, {}))
    assert keep.shape == (H, 3, 16)


def test_h2o_keeps_recent_and_heavy_keys():
    probs, state = masked_probs({"method": "h2o", "heavy_ratio": 0.25, "recent_ratio": 0.25}, q_len=20, context_len=20)
    n = torch.arange(1, 21)
    kept = (probs > 0).sum(-1)  # [H, Lq]
    assert (kept <= share(n, 0.25).clamp(min=1) + share(n, 0.25)).all()
    assert (probs[:, torch.arange(20), torch.arange(20)] > 0).all()  # the query itself is recent
    assert 0 < state.density() < 1


@pytest.mark.parametrize(
    "spec, field",
    [
        ({"method": "top_k"}, "sparsity.k"),
        ({"method": "top_k", "k": 0}, "sparsity.k"),
        ({"method": "top_k", "k": 2.5}, "sparsity.k"),
        ({"method": "top_k", "k": 4, "sparsity_ratio": 0.5}, "sparsity.k"),
        ({"method": "top_k", "sparsity_ratio": 1.0}, "sparsity.sparsity_ratio"),
        ({"method": "threshold", "threshold": 1.5}, "sparsity.threshold"),
        ({"method": "sliding_window", "window": 8, "sinks": 4}, "sparsity.sinks"),
        ({"method": "block_sparse", "top_blocks": "two"}, "sparsity.top_blocks"),
        ({"method": "h2o", "heavy_ratio": 0, "recent_ratio": 0}, "sparsity.heavy_ratio"),
        ({"method": "nope"}, "sparsity.method"),
        ({"k": 4}, "sparsity.method"),
        ({"method": "top_k", "mask_pattern": "h2o", "k": 1}, "sparsity.mask_pattern"),
        ({"method": ["top_k"]}, "sparsity.method"),
        ({"method": "top_k", "k": 10**400}, "sparsity.k"),
    ],
)
def test_bad_specs_name_the_field(spec, field):
    with pytest.raises(SparsityError) as error:
        parse_sparsity(spec)
    assert error.value.field == field and str(error.value).startswith(field)


def test_a_method_returning_no_bool_mask_runs_dense_and_says_why():
    class Broken(SparsityMethod):
        name = "broken"

        def keep(self, x: MaskInputs) -> torch.Tensor:
            return x.allowed.int()  # not a bool mask

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(4, H, D, generator=g), torch.randn(6, KV, D, generator=g), torch.randn(6, KV, D, generator=g)
    state = SparsityState(Broken())
    _, probs = attend(q, k, v, D**-0.5, return_probs=True, select=lambda *a: state.select(0, *a))
    _, dense = attend(q, k, v, D**-0.5, return_probs=True)
    assert torch.allclose(probs, dense) and "bool" in state.error and state.density() == 1.0


def test_ratios_round_up_exactly():
    probs, _ = masked_probs({"method": "top_k", "sparsity_ratio": 0.4}, q_len=25, context_len=25)
    assert int((probs[0, -1] > 0).sum()) == 15  # ceil(25 x 0.6), not 16 from float32 rounding
    h2o, state = masked_probs({"method": "h2o", "heavy_ratio": 0.5, "recent_ratio": 0.5}, q_len=3, context_len=3)
    assert ((h2o > 0).sum(-1) == torch.arange(1, 4)).all()  # heavy + recent >= 1 keeps every key


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    # (int16 activations: these tests compare attention paths; the default int12's coarser steps would amplify
    # their float rounding 16x)
    return LLMEngine(load_model(None), EngineConfig(kv_cache_memory=256 << 20, activations="int16"))


def generate(engine: LLMEngine, requests: list[tuple[str, dict | None]], max_tokens: int = 12) -> list:
    outputs = {}
    for i, (prompt, spec) in enumerate(requests):
        sparsity = parse_sparsity(spec) if spec else None
        engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True), f"r{i}", sparsity=sparsity)
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id] = out
    return [outputs[f"r{i}"] for i in range(len(requests))]


PROMPT = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is"


def test_a_mask_that_keeps_everything_is_exactly_dense(engine):
    dense, top_k, window, h2o = generate(
        engine,
        [(PROMPT, None), (PROMPT, {"method": "top_k", "k": 4096}), (PROMPT, {"method": "sliding_window", "window": 4096}),
         (PROMPT, {"method": "h2o", "heavy_ratio": 0.5, "recent_ratio": 0.5})],
    )
    for out in (top_k, window, h2o):
        assert out.token_ids == dense.token_ids and out.sparsity["density"] == 1.0
    assert dense.sparsity is None


def test_masked_and_plain_sequences_share_a_batch_without_changing_each_other(engine):
    other = "Once upon a time, in a small village by the sea, there lived"
    mask = {"method": "sliding_window", "window": 6, "sink_tokens": 2}
    alone = [generate(engine, [r])[0] for r in [(PROMPT, None), (other, mask), (PROMPT, mask)]]
    together = generate(engine, [(PROMPT, None), (other, mask), (PROMPT, mask)])
    for a, b in zip(alone, together):
        assert a.token_ids == b.token_ids and a.sparsity == b.sparsity
    assert alone[2].token_ids != alone[0].token_ids  # the mask does change the output
    assert 0 < alone[2].sparsity["density"] < 1
    assert engine.block_manager.num_used_blocks == 0


def test_masked_requests_neither_use_nor_fill_the_prefix_cache(engine):
    engine.block_manager.reset_prefix_cache()
    mask = {"method": "top_k", "k": 2}
    first, second = generate(engine, [(PROMPT, mask)]), generate(engine, [(PROMPT, mask)])
    assert first[0].num_cached_tokens == second[0].num_cached_tokens == 0
    assert first[0].token_ids == second[0].token_ids
    assert generate(engine, [(PROMPT, None)])[0].num_cached_tokens == 0


def test_global_default_applies_to_new_requests_and_dense_opts_out(engine):
    engine.default_sparsity = parse_sparsity({"method": "top_k", "k": 2})
    try:
        masked, opted_out = generate(engine, [(PROMPT, None), (PROMPT, {"method": "dense"})])
    finally:
        engine.default_sparsity = None
    assert masked.sparsity["method"] == "top_k" and opted_out.sparsity is None
    assert math.isclose(masked.sparsity["density"], masked.sparsity["density"]) and masked.sparsity["density"] < 1


def test_evicting_methods_free_blocks_and_equal_their_mask_form_on_the_default_model(engine):
    """sliding_window evicts once the prompt is computed (engine/eviction.py); its decode steps then run the
    native CPU path over the kept keys and give the mask form's tokens (tests/test_kv_eviction.py has more)."""
    from glassbox.layers.sparsity import SlidingWindow

    class MaskOnly(SlidingWindow):
        evicts = False

    prompt = " ".join([PROMPT] * 3)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=0)
    runs = {}
    for name, method in (("evicting", SlidingWindow(16, 4)), ("mask", MaskOnly(16, 4))):
        request_id = engine.add_request(prompt, params, sparsity=method)
        seq, executors, blocks = engine.requests[request_id].seq, [], []
        while engine.has_unfinished_requests():
            out = engine.step()[-1]
            executors.append(engine.last_plan.executor)
            blocks.append(len(seq.block_table))
        runs[name] = (out, executors, blocks, seq.num_evicted_tokens)
    (evicting, fast, held, evicted), (masked, slow, _, kept_all) = runs["evicting"], runs["mask"]
    assert evicting.token_ids == masked.token_ids
    assert [e["logprob"] for e in evicting.logprobs] == pytest.approx([e["logprob"] for e in masked.logprobs], abs=2e-3)
    assert set(fast[1:]) == {"native_stack"} and set(slow) == {"eager"}
    assert max(held[1:]) == 2 and evicted > 40 and kept_all == 0  # 20 keys: 2 blocks of 16
    assert engine.block_manager.num_used_blocks == 0
