"""The engine on real models: batched == alone, prefix-cache hits, preemption, blocks freed, sampling."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import (
    async_scheduling_requests,
    async_scheduling_scenario,
    load_reference,
    record_launches,
    run_all,
)

from glassbox import LLM, SamplingParams
from glassbox.config import EngineConfig
from glassbox.engine.llm_engine import LLMEngine
from glassbox.models.loader import load_model

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def default_llm():
    return LLM(kv_cache_memory=256 << 20)


def make_engine(loaded, **options) -> LLMEngine:
    """An engine over float32 weights (these tests compare with transformers' float32 forward)."""
    return LLMEngine(loaded, EngineConfig(**{"quantization": "none", **options}))


def random_prompts(count: int, seed: int, vocab: int = 300, lengths=(1, 60)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(*lengths))] for _ in range(count)]


def assert_all_blocks_free(engine: LLMEngine) -> None:
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(count == 0 for count in bm.ref_counts)


def test_32_concurrent_default_model_equal_alone(default_llm):
    """The issue's must-show: greedy outputs of 32 concurrent requests of different lengths equal the same
    requests run one at a time (CPU, float32), on the default model."""
    words = "the a Rome empire history of long and river city people war peace king law road".split()
    rng = random.Random(0)
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 40))) for _ in range(32)]
    params = SamplingParams(temperature=0, max_tokens=10)
    batched = default_llm.generate(prompts, params)
    alone = [default_llm.generate(p, params)[0] for p in prompts]
    assert [o.token_ids for o in batched] == [o.token_ids for o in alone]
    assert [o.text for o in batched] == [o.text for o in alone]
    assert_all_blocks_free(default_llm.engine)


def test_greedy_equals_transformers_and_is_batch_invariant(tiny, tiny_model_dir):
    prompts = random_prompts(12, seed=1)
    engine = make_engine(tiny, num_kv_blocks=200, block_size=4)
    batched = run_all(engine, prompts, GREEDY)
    reference = load_reference(tiny_model_dir("llama"))
    for prompt, out in zip(prompts, batched):
        ids = torch.tensor([prompt])
        # An explicit mask: else transformers masks every prompt token equal to pad_token_id.
        expected = reference.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :].tolist()
        assert out.token_ids == expected
    assert_all_blocks_free(engine)


def test_chunked_prefill_gives_the_same_tokens(tiny):
    prompts = random_prompts(6, seed=2, lengths=(20, 60))
    whole = run_all(make_engine(tiny, num_kv_blocks=200, block_size=4), prompts, GREEDY)
    chunked_engine = make_engine(tiny, num_kv_blocks=200, block_size=4, max_num_batched_tokens=7)
    chunked = run_all(chunked_engine, prompts, GREEDY)
    assert [o.token_ids for o in chunked] == [o.token_ids for o in whole]
    assert_all_blocks_free(chunked_engine)


def test_prefix_cache_hit_gives_the_same_tokens_as_a_miss(tiny):
    shared = random_prompts(1, seed=3, lengths=(40, 40))[0]
    prompts = [shared + tail for tail in random_prompts(4, seed=4, lengths=(1, 10))]
    cached_engine = make_engine(tiny, num_kv_blocks=200, block_size=4)
    first = run_all(cached_engine, prompts[:1], GREEDY)
    hits = run_all(cached_engine, prompts, GREEDY)
    assert all(o.num_cached_tokens >= 40 for o in hits)
    assert cached_engine.block_manager.stats.hit_tokens >= 4 * 40
    misses = run_all(make_engine(tiny, num_kv_blocks=200, block_size=4, enable_prefix_caching=False), prompts, GREEDY)
    assert all(o.num_cached_tokens == 0 for o in misses)
    assert [o.token_ids for o in hits] == [o.token_ids for o in misses]
    assert hits[0].token_ids == first[0].token_ids
    assert_all_blocks_free(cached_engine)


def test_tiny_pool_forces_preemption_and_every_request_completes(tiny):
    prompts = random_prompts(10, seed=5, lengths=(10, 30))
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    roomy = run_all(make_engine(tiny, num_kv_blocks=400, block_size=4), prompts, params)
    tight = make_engine(tiny, num_kv_blocks=14, block_size=4)  # 56 slots: about one sequence at a time
    squeezed = run_all(tight, prompts, params)
    assert tight.scheduler.num_preemptions > 0
    assert [o.token_ids for o in squeezed] == [o.token_ids for o in roomy]
    assert all(o.finish_reason == "length" and len(o.token_ids) == 20 for o in squeezed)
    assert_all_blocks_free(tight)


def test_async_scheduling_gives_the_tokens_of_steps_in_turn(tiny):
    """Decode steps launched before the host reads the previous step's tokens (on by default with CUDA graphs,
    forced here on the CPU, where it runs the same bookkeeping): see `async_scheduling_scenario`. Then a pool
    small enough to preempt."""
    prompts, params = async_scheduling_requests(make_engine(tiny, num_kv_blocks=300, block_size=4))
    overlapped = make_engine(tiny, num_kv_blocks=300, block_size=4, async_scheduling=True)
    launches = record_launches(overlapped)
    results, in_flight = async_scheduling_scenario(overlapped, prompts, params)
    expected, _ = async_scheduling_scenario(make_engine(tiny, num_kv_blocks=300, block_size=4), prompts, params)
    assert results == expected
    assert in_flight == [True, True]  # the arrival and the abort met a step in flight
    assert sum(previous is not None for previous in launches) > 20

    plain = [SamplingParams(temperature=0, max_tokens=p.max_tokens, ignore_eos=True) for p in params]
    tight = make_engine(tiny, num_kv_blocks=14, block_size=4, async_scheduling=True)
    squeezed = run_all(tight, prompts, plain)
    assert tight.scheduler.num_preemptions > 0
    roomy = run_all(make_engine(tiny, num_kv_blocks=300, block_size=4), prompts, plain)
    assert [o.token_ids for o in squeezed] == [o.token_ids for o in roomy]
    assert_all_blocks_free(tight)


def test_abort_frees_blocks(tiny):
    engine = make_engine(tiny, num_kv_blocks=100, block_size=4)
    ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)) for p in random_prompts(5, 6)]
    for _ in range(3):
        engine.step()
    assert engine.block_manager.num_used_blocks > 0
    for request_id in ids[:3]:
        assert engine.abort(request_id)
    assert not engine.abort(ids[0])
    while engine.has_unfinished_requests():
        engine.step()
    assert_all_blocks_free(engine)
    assert engine.stats()["num_running"] == 0


def test_seeded_sampling_is_the_same_alone_and_in_a_busy_batch(tiny):
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    prompt = random_prompts(1, seed=7)[0]
    alone = run_all(make_engine(tiny, num_kv_blocks=400), [prompt], params)[0]
    others = random_prompts(15, seed=8)
    busy_params = [SamplingParams(temperature=1.0, max_tokens=16, seed=i) for i in range(15)]
    busy = run_all(make_engine(tiny, num_kv_blocks=400), others[:7] + [prompt] + others[7:], busy_params[:7] + [params] + busy_params[7:])
    assert busy[7].token_ids == alone.token_ids
    other_seed = run_all(make_engine(tiny, num_kv_blocks=400), [prompt], [SamplingParams(**{**vars(params), "seed": 99})])[0]
    assert other_seed.token_ids != alone.token_ids


def test_stop_conditions(default_llm):
    prompt = "Count from one to ten: one, two, three,"
    base = default_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20))[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 20
    assert " five" in base.text
    stopped = default_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20, stop=[" five"]))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == base.text[: base.text.index(" five")]
    kept = default_llm.generate(
        prompt, SamplingParams(temperature=0, max_tokens=20, stop=[" five"], include_stop_str_in_output=True)
    )[0]
    assert kept.text == base.text[: base.text.index(" five") + len(" five")]
    token = base.token_ids[3]
    by_token = default_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[token]))[0]
    first = base.token_ids.index(token)
    assert by_token.finish_reason == "stop" and by_token.token_ids == base.token_ids[: first + 1]


def test_eos_min_tokens_and_ignore_eos(default_llm):
    prompt = default_llm.tokenizer.encode_chat([{"role": "user", "content": "Say hi."}])
    natural = default_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=64))[0]
    assert natural.finish_reason == "stop" and natural.token_ids[-1] == 2  # <|im_end|>
    n = len(natural.token_ids)
    longer = default_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=64, min_tokens=n + 3))[0]
    assert len(longer.token_ids) >= n + 3 and 2 not in longer.token_ids[: n + 3]
    ignored = default_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=n + 5, ignore_eos=True))[0]
    assert len(ignored.token_ids) == n + 5 and ignored.finish_reason == "length"


def test_logprobs_match_the_model_distribution(tiny, tiny_model_dir):
    prompt = random_prompts(1, seed=9, lengths=(12, 12))[0]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    out = run_all(make_engine(tiny, num_kv_blocks=100, block_size=4, max_num_batched_tokens=5), [prompt], params)[0]
    reference = load_reference(tiny_model_dir("llama"))
    full = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        expected = torch.log_softmax(reference(full).logits[0].float(), dim=-1)
    # Prompt logprobs (computed across prefill chunks of 5 tokens): position i scores token i.
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for i in range(1, len(prompt)):
        token, logprob, top = out.prompt_logprobs[i]
        assert token == prompt[i]
        assert abs(logprob - expected[i - 1, token].item()) < 1e-4
        assert len(top) == 2 and abs(top[0][1] - expected[i - 1].max().item()) < 1e-4
    for j, entry in enumerate(out.logprobs):
        row = expected[len(prompt) - 1 + j]
        assert entry["token_id"] == out.token_ids[j] == int(row.argmax())
        assert abs(entry["logprob"] - row.max().item()) < 1e-4
        assert len(entry["top_logprobs"]) == 3


def test_timings_are_reported(default_llm):
    out = default_llm.generate("Hello", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    t = out.timings
    assert t["ttft_ms"] > 0 and t["decode_ms_per_token"] > 0 and t["total_ms"] >= t["ttft_ms"]
    assert t["queue_ms"] >= 0 and t["prefill_ms"] > 0


def test_bad_requests_are_refused_clearly(tiny):
    engine = make_engine(tiny, num_kv_blocks=10, block_size=4)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="context length"):
        engine.add_request([1] * 200, SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="KV blocks"):
        engine.add_request([1] * 30, SamplingParams(max_tokens=30))
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request([1, 10**6], SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], SamplingParams())
    assert not engine.has_unfinished_requests()


def test_quantized_modes_are_batch_invariant_and_auto_agrees_with_float32():
    """Quantized rows are independent (activation blocks within a row, exact integer sums), so batched ==
    alone exactly, in the default mode ("auto": the default model's own Q4_1 blocks) and in int8; auto
    computes the GGUF's own weights, so its greedy text matches float32's here."""
    words = "the a Rome empire history of long and river city".split()
    rng = random.Random(3)
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 30))) for _ in range(8)]
    params = SamplingParams(temperature=0, max_tokens=8)
    llms = {mode: LLM(quantization=mode, kv_cache_memory=64 << 20) for mode in ("auto", "int8", "none")}
    for mode in ("auto", "int8"):
        llm = llms[mode]
        assert [o.token_ids for o in llm.generate(prompts, params)] == [llm.generate(p, params)[0].token_ids for p in prompts]
    question = "The capital of France is"
    assert llms["auto"].generate(question, params)[0].text == llms["none"].generate(question, params)[0].text


# kv_cache_dtype -> (its torch dtype, tokens per float32 token's bytes, tolerances on prompt logprobs of
# about -6: mean and max absolute difference). e4m3 keeps 3 mantissa bits (up to 6% per value), bfloat16 7.
SMALL_CACHES = {"fp8": (torch.float8_e4m3fn, 4, 0.05, 0.2), "bfloat16": (torch.bfloat16, 2, 0.01, 0.05)}


@pytest.mark.parametrize("cache_dtype", list(SMALL_CACHES))
def test_small_kv_cache_holds_more_tokens_and_keeps_the_numbers(tiny, cache_dtype):
    """kv_cache_dtype="fp8" / "bfloat16" for a float32 model: more tokens in the same memory, batched still ==
    alone, and prompt logprobs (attention over the narrower cache) within its rounding of float32's."""
    dtype, ratio, mean_tol, max_tol = SMALL_CACHES[cache_dtype]
    prompts = random_prompts(8, seed=11, lengths=(5, 40))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=0)
    exact = make_engine(tiny, kv_cache_memory=4 << 20, block_size=4)
    small = make_engine(tiny, kv_cache_memory=4 << 20, block_size=4, kv_cache_dtype=cache_dtype)
    assert small.kv_cache.dtype == dtype and small.kv_cache.num_blocks == ratio * exact.kv_cache.num_blocks
    batched = run_all(small, prompts, params)
    assert [o.token_ids for o in batched] == [run_all(small, [p], params)[0].token_ids for p in prompts]
    reference = run_all(exact, prompts, params)
    for got, want in zip(batched, reference):
        got_lp = torch.tensor([entry[1] for entry in got.prompt_logprobs[1:]])
        want_lp = torch.tensor([entry[1] for entry in want.prompt_logprobs[1:]])
        assert (got_lp - want_lp).abs().mean() < mean_tol and (got_lp - want_lp).abs().max() < max_tol
        assert not torch.equal(got_lp, want_lp)  # the cache really is narrower
    assert_all_blocks_free(small)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="int8")


@pytest.mark.parametrize(
    ("options", "activations", "cache"),
    [
        ({}, "int12", torch.bfloat16),  # the CPU default: a bfloat16 cache beside int12 activations
        ({"activations": "int16"}, "int16", torch.float32),  # float32's text token for token
        ({"quantization": "none"}, "float32", torch.float32),
        ({"kv_cache_dtype": "float32"}, "int12", torch.float32),  # one flag away
    ],
)
def test_auto_kv_cache_dtype_follows_the_activations(tiny_model_dir, options, activations, cache):
    engine = LLMEngine(load_model(tiny_model_dir("llama")), EngineConfig(num_kv_blocks=8, **options))
    assert (engine.config.activations, engine.kv_cache.dtype) == (activations, cache)


def test_compiled_executors_leave_a_shared_model_unwrapped(tiny_model_dir):
    """Engines sharing a model (research/schedule.py) must not stack wrappers on its layers: each compiled
    executor compiles callables of its own and leaves the layers' forward as their class defines it."""
    from glassbox.engine.executors import CompiledExecutor
    from glassbox.models.loader import load_model

    model = load_model(tiny_model_dir("llama")).model
    first = model.model.layers[0].forward
    CompiledExecutor(model)
    CompiledExecutor(model)
    assert model.model.layers[0].forward == first and "forward" not in vars(model.model.layers[0])
