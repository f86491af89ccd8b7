"""The sampler's rules, on hand-made logits (no model)."""

from __future__ import annotations

import math

import pytest
import torch

from glassbox.sampling import SampleRequest, SamplingParams, apply_penalties, filter_logits, sample


def request(params: SamplingParams, prompt=(), output=(), seed=None, banned=()) -> SampleRequest:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return SampleRequest(params, list(prompt), list(output), generator, list(banned))


def test_greedy_and_banned_tokens():
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0]])
    assert sample(logits, [request(SamplingParams(temperature=0))], torch.Generator()).token_ids == [1]
    assert sample(logits, [request(SamplingParams(temperature=0), banned=[1])], torch.Generator()).token_ids == [2]


def test_top_k_top_p_min_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = lambda params: torch.isfinite(filter_logits(logits[None], [params])[0]).tolist()  # noqa: E731
    assert kept(SamplingParams(top_k=2)) == [True, True, False, False]
    assert kept(SamplingParams(top_p=0.5)) == [True, False, False, False]
    assert kept(SamplingParams(top_p=0.85)) == [True, True, True, False]
    assert kept(SamplingParams(min_p=0.5)) == [True, True, False, False]  # 0.3 >= 0.5 * 0.5


def test_a_batch_filters_each_row_with_its_own_parameters():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    params = [
        SamplingParams(top_k=3),
        SamplingParams(),
        SamplingParams(top_p=0.6, temperature=0.5),
        SamplingParams(top_k=10, top_p=0.9, min_p=0.05),
        SamplingParams(min_p=0.2, temperature=2.0),
        SamplingParams(top_k=-1, top_p=0.3),
    ]
    together = filter_logits(logits, params)
    for row, p in zip(range(6), params):
        assert torch.equal(together[row], filter_logits(logits[row : row + 1], [p])[0])
    assert torch.isfinite(together[0]).sum() == 3 and torch.isfinite(together[1]).all()


def test_top_p_over_a_large_vocabulary_keeps_what_a_full_sort_keeps():
    """On the CPU top_p looks among the top TOP_P_PREFIX tokens first: peaked rows (found there, no full sort)
    and a flat row (not found: the full sort) keep exactly the tokens the full-sort rule keeps."""
    from unittest import mock

    torch.manual_seed(2)
    logits = torch.randn(3, 5000) * torch.tensor([[6.0], [3.0], [0.1]])
    params = [SamplingParams(top_p=0.9), SamplingParams(top_p=0.5, temperature=0.7), SamplingParams(top_p=0.9)]
    with mock.patch.object(torch, "sort", wraps=torch.sort) as sort:
        peaked = torch.isfinite(filter_logits(logits[:2], params[:2]))
        assert sort.call_count == 0
        flat = torch.isfinite(filter_logits(logits[2:], params[2:]))
        assert sort.call_count == 1
    for row, (got, p) in enumerate(zip([*peaked, *flat], params)):
        sorted_probs, order = (logits[row] / p.temperature).softmax(-1).sort(descending=True)
        keep_sorted = sorted_probs.cumsum(-1) - sorted_probs < p.top_p
        assert torch.equal(got, torch.zeros(5000, dtype=torch.bool).scatter(0, order, keep_sorted))
    assert peaked.sum(-1).max() < 1024 < flat.sum()


def test_top_p_keeps_ties_together_so_seeded_draws_ignore_the_batch():
    """bfloat16 logits tie often; whichever way a sort orders equal values, tied tokens are kept or dropped
    together, so a row keeps the same tokens alone and beside a row that forces the full sort."""
    generator = torch.Generator().manual_seed(4)
    flat = torch.randn(1, 5000, generator=generator) * 0.01
    params = [SamplingParams(top_p=0.8), SamplingParams(top_p=0.9)]
    for _ in range(60):
        row = (torch.randn(1, 5000, generator=generator) * 3).bfloat16().float()
        alone = torch.isfinite(filter_logits(row, params[:1]))[0]
        assert torch.equal(alone, torch.isfinite(filter_logits(torch.cat([row, flat]), params))[0])


def test_sampled_rows_follow_their_filters_and_seeds_ignore_the_batch():
    torch.manual_seed(1)
    logits = torch.randn(4, 30)
    params = [
        SamplingParams(top_k=2, seed=7), SamplingParams(temperature=0), SamplingParams(top_p=0.2), SamplingParams(min_p=0.9)
    ]
    allowed = [torch.topk(logits[0], 2).indices.tolist(), [int(logits[1].argmax())], None, None]
    for _ in range(20):
        tokens = sample(logits, [request(p, seed=p.seed) for p in params], torch.Generator()).token_ids
        assert tokens[0] in allowed[0] and tokens[1] == allowed[1][0]
        assert torch.isfinite(filter_logits(logits[2:4], params[2:])[[0, 1], tokens[2:]]).all()
    alone = [sample(logits[:1], [request(params[0], seed=s)], torch.Generator()).token_ids[0] for s in range(30)]
    others = [request(p) for p in params[1:]]
    batched = [sample(logits, [request(params[0], seed=s), *others], torch.Generator()).token_ids[0] for s in range(30)]
    assert alone == batched and len(set(alone)) == 2


def test_penalties_follow_vllm_rules():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    out = apply_penalties(logits.clone(), request(SamplingParams(repetition_penalty=2.0), prompt=[0], output=[1]))
    assert out.tolist() == [1.0, -4.0, 1.0, 0.5]
    out = apply_penalties(
        logits.clone(), request(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), output=[2, 2, 3])
    )
    assert out.tolist() == pytest.approx([2.0, -2.0, 1.0 - 0.5 - 0.5, 0.5 - 0.5 - 0.25])


def test_temperature_sampling_follows_the_distribution_and_seeds_repeat():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).repeat(1, 1)
    params = SamplingParams(temperature=1.0, seed=3)
    draws = [sample(logits, [request(params, seed=s)], torch.Generator()).token_ids[0] for s in range(3000)]
    freq = [draws.count(t) / len(draws) for t in range(3)]
    assert freq == pytest.approx([0.7, 0.2, 0.1], abs=0.03)
    again = [sample(logits, [request(params, seed=s)], torch.Generator()).token_ids[0] for s in range(50)]
    assert again == draws[:50]


def test_logprobs_are_the_models_log_softmax():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    result = sample(logits, [request(SamplingParams(temperature=0, logprobs=2))], torch.Generator())
    expected = torch.log_softmax(logits[0], -1)
    logprob, top = result.logprobs[0]
    assert logprob == pytest.approx(expected[2].item())
    assert [t for t, _ in top] == [2, 1] and top[1][1] == pytest.approx(expected[1].item())


@pytest.mark.parametrize(
    "field, value",
    [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("max_tokens", 0), ("min_p", 2.0), ("logprobs", 50), ("n", 0)],
)
def test_invalid_parameters_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_stop_accepts_a_single_string():
    assert SamplingParams(stop="END").stop == ["END"]
    assert math.isclose(SamplingParams().temperature, 1.0)
