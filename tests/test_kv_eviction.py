"""KV eviction (engine/eviction.py): sliding_window (StreamingLLM) and h2o drop tokens from a sequence's KV
cache as it decodes and give its blocks back. Equivalence: each evicting run gives the outputs of the mask
form over dense attention with the same kept keys at their original positions. Memory: 4,096 generated
tokens hold a bounded number of blocks, every block comes back at the end or on abort."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import _randomize, _save_tokenizer

from glassbox.config import EngineConfig
from glassbox.engine.block_manager import BlockManager
from glassbox.engine.llm_engine import LLMEngine
from glassbox.engine.sequence import Sequence
from glassbox.errors import FieldError
from glassbox.layers.sparsity import H2O, MaskInputs, SlidingWindow, SparsityMethod, parse_sparsity, share
from glassbox.models.loader import LoadedModel, load_model
from glassbox.sampling import SamplingParams

HEADS, KV_HEADS, LAYERS = 4, 2, 2


@pytest.fixture(scope="module")
def long_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with 8,192 positions (conftest's have 256): room for 4,096 generated tokens."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder: Path = tmp_path_factory.mktemp("long_tiny")
    config = LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )  # fmt: skip
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    _randomize(model)
    model.save_pretrained(folder)
    _save_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def long_tiny(long_tiny_dir: Path) -> LoadedModel:
    return load_model(long_tiny_dir)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def on_device(long_tiny: LoadedModel, long_tiny_dir: Path, device: str) -> LoadedModel:
    """The CPU model, or on CUDA in float32 (Triton attention, CUDA graphs for the other decode steps)."""
    if device == "cpu":
        return long_tiny
    torch.backends.cuda.matmul.allow_tf32 = False
    return load_model(long_tiny_dir, dtype="float32", device=device)


def make_engine(loaded: LoadedModel, **options) -> LLMEngine:
    return LLMEngine(loaded, EngineConfig(**{"quantization": "none", "num_kv_blocks": 512, **options}))


PROMPT = [(7 * i + 3) % 300 for i in range(40)]


def generate(engine: LLMEngine, method: SparsityMethod | None, max_tokens: int, watch=None, prompt=PROMPT):
    """Greedy, with the sampled token's logprob; `watch(seq)` after every step while the request runs."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=0)
    request_id = engine.add_request(prompt, params, sparsity=method)
    seq = engine.requests[request_id].seq
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out if out.finished else final
        if watch is not None and not seq.is_finished:
            watch(seq)
    logprobs = [entry["logprob"] for entry in final.logprobs]
    return final, logprobs


class MaskOnly(SlidingWindow):
    """The same method in its mask form: every key stays in the cache, the readable path masks them."""

    evicts = False


@pytest.mark.parametrize("device", DEVICES)
def test_sliding_window_eviction_equals_its_mask_form(long_tiny, long_tiny_dir, device):
    engine = make_engine(on_device(long_tiny, long_tiny_dir, device), block_size=4)
    window, sinks = 8, 2
    held, reasons = [], set()

    def watch(seq: Sequence) -> None:
        next_position = seq.num_computed_tokens
        expected = sorted({*range(sinks), *range(next_position - window + 1, next_position)})
        for row in seq.sparsity.slots.positions.reshape(-1, seq.num_kv_slots):
            assert sorted(row.tolist()) == expected  # every layer and KV head holds the sinks and the window
        if seq.num_output_tokens > 1:  # decode steps attend over the cache as is, on the fast path
            assert engine.last_plan.masked_rows == () and engine.last_plan.kind == "decode"
            reasons.add(engine.last_plan.reason)
        held.append(len(seq.block_table))

    evicting, evicting_logprobs = generate(engine, SlidingWindow(window, sinks), 48, watch)
    masked, masked_logprobs = generate(engine, MaskOnly(window, sinks), 48)
    assert evicting.token_ids == masked.token_ids
    assert evicting_logprobs == pytest.approx(masked_logprobs, abs=1e-4)
    if device == "cuda":  # evicted rows run on the decode graphs, which take each row's slot count
        assert engine.runner.graphs is not None and reasons == {"decode step within the captured sizes"}
    assert evicting.sparsity["density"] == pytest.approx(masked.sparsity["density"])
    # sinks + window - 1 keys between steps: 3 blocks of 4, from the first step after the prompt's 10 blocks
    assert held == [3] * len(held) and len(held) == 47
    # The response says what it saved: of 40 + 46 tokens before the last step, 9 kept (sinks + window - 1)
    assert (evicting.sparsity["evicted_tokens"], evicting.sparsity["kv_tokens_kept"]) == (77, 9)
    assert "evicted_tokens" not in masked.sparsity
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


class Replay(SparsityMethod):
    """The reference for h2o's evicting path: dense attention with the mask of the keys the evicting run
    kept for each decode query (per KV head, at their original positions); the prompt in h2o's mask form."""

    name = "replay"

    def __init__(self, prompt_method: H2O, kept: dict[int, torch.Tensor]) -> None:
        self.prompt_method, self.kept = prompt_method, kept

    def keep(self, x: MaskInputs) -> torch.Tensor:
        num_heads, q_len, context_len = x.scores.shape
        if q_len > 1:
            return self.prompt_method.keep(x)
        position = context_len - 1
        kept = self.kept[position][x.layer_idx].to(x.scores.device)  # [KV, slots]: what this layer's KV heads held
        mask = torch.zeros(kept.shape[0], context_len, dtype=torch.bool, device=kept.device).scatter_(1, kept, True)
        mask[:, position] = True  # and the query's own key
        return mask.repeat_interleave(num_heads // kept.shape[0], 0)[:, None, :]


@pytest.mark.parametrize("device", DEVICES)
def test_h2o_eviction_equals_dense_attention_masked_to_the_kept_keys(long_tiny, long_tiny_dir, device):
    engine = make_engine(on_device(long_tiny, long_tiny_dir, device), block_size=4)
    method = H2O(heavy_ratio=0.2, recent_ratio=0.1)
    kept: dict[int, torch.Tensor] = {}

    def watch(seq: Sequence) -> None:
        next_position = seq.num_computed_tokens
        slots = seq.sparsity.slots
        n = torch.tensor([next_position + 1])
        recent, heavy = int(share(n, 0.1)), int(share(n, 0.2))
        # The budget for the next query, less the query itself; one heavy key short at the steps where both
        # shares grow at once (an evicted key never comes back)
        assert recent - 1 + heavy - 1 <= slots.num_slots <= recent - 1 + heavy
        assert (slots.positions > next_position - recent).sum(-1).eq(recent - 1).all()  # the recent ones
        assert len(seq.block_table) == math.ceil(slots.num_slots / 4)
        kept[next_position] = slots.positions.clone()

    evicting, evicting_logprobs = generate(engine, method, 40, watch)
    replayed, replayed_logprobs = generate(engine, Replay(H2O(0.2, 0.1), kept), 40)
    assert evicting.token_ids == replayed.token_ids
    assert evicting_logprobs == pytest.approx(replayed_logprobs, abs=1e-4)
    # Per KV head: the two heads of a layer came to hold different keys.
    last = kept[max(kept)]
    assert any(set(last[layer, 0].tolist()) != set(last[layer, 1].tolist()) for layer in range(LAYERS))
    assert 0.2 < evicting.sparsity["density"] < 0.5


def test_4096_tokens_hold_a_bounded_number_of_blocks(long_tiny):
    """The issue's memory must-show: dense, sliding_window (512, 4 sinks) and h2o (0.1, 0.1) generate 4,096
    tokens each, in one batch; the blocks each holds at its last step."""
    engine = make_engine(long_tiny, num_kv_blocks=400)
    prompt = PROMPT[:16]
    params = SamplingParams(max_tokens=4096, temperature=0, ignore_eos=True)
    methods = {"dense": None, "sliding_window": SlidingWindow(512, 4), "h2o": H2O(0.1, 0.1)}
    seqs = {}
    for name, method in methods.items():
        request_id = engine.add_request(prompt, params, sparsity=method)
        seqs[name] = engine.requests[request_id].seq
    held = dict.fromkeys(methods, 0)
    most = dict.fromkeys(methods, 0)
    while engine.has_unfinished_requests():
        engine.step()
        for name, seq in seqs.items():
            if not seq.is_finished:
                held[name] = len(seq.block_table)
                most[name] = max(most[name], held[name])
    block_size = engine.config.block_size
    assert all(seq.num_output_tokens == 4096 for seq in seqs.values())
    assert held["dense"] == math.ceil((16 + 4095) / block_size) == 257
    assert most["sliding_window"] <= (512 + 4) / block_size + 2 and held["sliding_window"] == 33
    assert held["h2o"] <= 0.25 * held["dense"] and most["h2o"] == held["h2o"] == 52
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks  # all back at the end


def test_aborted_evicting_requests_return_every_block_and_fit_a_pool_dense_cannot(long_tiny):
    engine = make_engine(long_tiny, num_kv_blocks=40)
    params = SamplingParams(max_tokens=4096, temperature=0, ignore_eos=True)
    with pytest.raises(FieldError, match="KV blocks"):
        engine.add_request(PROMPT, params)  # dense would need 259 blocks
    window = engine.add_request(PROMPT, params, sparsity=parse_sparsity({"method": "sliding_window", "window": 20}))
    h2o = engine.add_request(PROMPT, params, sparsity=parse_sparsity({"method": "h2o", "heavy_ratio": 0.05, "recent_ratio": 0.05}))
    seqs = [engine.requests[i].seq for i in (window, h2o)]
    for _ in range(30):
        engine.step()
    assert all(seq.num_evicted_tokens > 0 for seq in seqs)
    assert engine.block_manager.num_used_blocks == sum(len(seq.block_table) for seq in seqs) < 10
    assert engine.abort(window) and engine.abort(h2o)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert all(count == 0 for count in engine.block_manager.ref_counts)


def test_the_global_mask_evicts_and_a_model_window_keeps_the_mask_form(long_tiny, tiny_model_dir):
    engine = make_engine(long_tiny)
    engine.default_sparsity = parse_sparsity({"method": "sliding_window", "window": 16, "sink_tokens": 4})
    held = []
    generate(engine, None, 40, lambda seq: held.append((len(seq.block_table), seq.num_evicted_tokens)))
    assert held[-1] == (2, 40 + 39 - 20)  # 20 keys in 2 blocks of 16; the rest evicted
    # Mistral's own sliding window counts positions as slots: its requests keep every key (mask form)
    mistral = make_engine(load_model(tiny_model_dir("mistral")))
    method = SlidingWindow(4, 1)
    assert not mistral.evicts(method) and engine.evicts(method)
    out, _ = generate(mistral, method, 8, lambda seq: held.append(seq.num_evicted_tokens))
    assert held[-1] == 0 and out.sparsity["density"] < 1


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "bfloat16"])
def test_eviction_moves_narrow_caches_too(long_tiny, kv_cache_dtype):
    """An 8-bit float cache is moved as bytes (no fp8 indexing kernel on the CPU); same tokens as its mask form."""
    engine = make_engine(long_tiny, block_size=4, kv_cache_dtype=kv_cache_dtype)
    kept: dict[int, torch.Tensor] = {}

    def record(seq: Sequence) -> None:
        kept[seq.num_computed_tokens] = seq.sparsity.slots.positions.clone()

    evicting, evicting_logprobs = generate(engine, H2O(0.2, 0.1), 24, record)
    replayed, replayed_logprobs = generate(engine, Replay(H2O(0.2, 0.1), kept), 24)
    assert len(kept) == 23 and evicting.sparsity["evicted_tokens"] > 20
    assert evicting.token_ids == replayed.token_ids
    assert evicting_logprobs == pytest.approx(replayed_logprobs, abs=1e-3)


def test_a_preempted_evicting_sequence_recomputes_in_the_mask_form_and_evicts_again(long_tiny):
    """Preemption frees every block and forgets the evictions; the sequence's prompt and output are then
    recomputed in the mask form (the same keys for sliding_window), so the tokens do not change."""
    from glassbox.engine.scheduler import ScheduledBatch

    engine = make_engine(long_tiny, block_size=4)
    alone, _ = generate(engine, SlidingWindow(8, 2), 30)
    preempted = []

    def preempt_once(seq: Sequence) -> None:
        if seq.num_output_tokens == 12 and not preempted:
            assert seq.num_evicted_tokens > 0
            engine.scheduler._preempt(seq, ScheduledBatch())
            preempted.append((seq.num_evicted_tokens, seq.sparsity.slots, engine.block_manager.num_used_blocks))
        elif preempted and seq.sparsity.slots is not None:
            preempted.append(seq.num_evicted_tokens)

    again, _ = generate(engine, SlidingWindow(8, 2), 30, preempt_once)
    assert preempted[0] == (0, None, 0)
    assert preempted[1] == 40 + 12 - 9  # evicting again right after the recompute
    assert again.token_ids == alone.token_ids
    assert again.sparsity["evicted_tokens"] == alone.sparsity["evicted_tokens"] == 40 + 28 - 9


def test_only_a_class_that_declares_eviction_evicts(long_tiny):
    class Wider(SlidingWindow):  # a plugin's variant: its keep differs from the evict it inherits
        name = "wider"

        def keep(self, x: MaskInputs) -> torch.Tensor:
            return super().keep(x) | (x.k_positions % 2 == 0)

    engine = make_engine(long_tiny)
    assert engine.evicts(SlidingWindow(8, 2)) and not engine.evicts(Wider(8, 2)) and not engine.evicts(MaskOnly(8, 2))
    assert not engine.evicts(H2O(0.5, 0.5))  # keeps every key: nothing to evict


def test_compaction_keeps_each_rows_kept_keys_with_their_positions():
    """Model-free: a random eviction, a different set in every (layer, KV head) row, several per row, for two
    sequences in one step (their moves go in one copy); every kept key and value stays in its row with its
    position, the evicted ones are gone, blocks come back."""
    from glassbox.config import ModelConfig
    from glassbox.engine.eviction import KVEvictor
    from glassbox.engine.kv_cache import KVCache
    from glassbox.layers.sparsity import KVSlots, SparsityState

    class Random(SparsityMethod):
        name, evicts = "random", True

        def evict(self, slots: KVSlots, next_position: int) -> torch.Tensor:
            generator = torch.Generator().manual_seed(next_position)
            order = torch.rand(slots.positions.shape, generator=generator).argsort(-1)
            return order < 9  # 9 random slots of every row

    config = ModelConfig(architecture="llama", vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=4, max_position_embeddings=64)
    cache = KVCache(config, num_blocks=12, block_size=4, dtype=torch.float32, device=torch.device("cpu"))
    cache.k.copy_(torch.randn(cache.k.shape))
    cache.v.copy_(torch.randn(cache.v.shape))
    manager = BlockManager(12, 4)
    seqs = []
    for length in (22, 23):
        seq = Sequence(f"s{length}", list(range(length)), None)
        seq.sparsity = SparsityState(Random(), evicting=True)
        assert manager.allocate(seq, length)
        seq.num_computed_tokens = length
        seq.token_ids.append(0)  # the sampled token: the next step decodes it
        seqs.append(seq)

    def rows(seq: Sequence, cache_tensor: torch.Tensor, slots: int) -> torch.Tensor:  # [L, slots, KV, D] in slot order
        return cache_tensor[:, torch.tensor(seq.block_table)].flatten(1, 2)[:, :slots]

    before = [tuple(rows(seq, side, seq.num_computed_tokens).clone() for side in (cache.k, cache.v)) for seq in seqs]
    evictor = KVEvictor(cache, manager, num_heads=4)
    assert evictor.after_step([(seq, seq.num_computed_tokens) for seq in seqs]) == 18
    assert [seq.num_kv_slots for seq in seqs] == [13, 14]
    assert [len(seq.block_table) for seq in seqs] == [4, 4] and manager.num_free_blocks == 4  # 2 + 2 came back
    for seq, (keys, values) in zip(seqs, before):
        n = seq.num_kv_slots
        positions = seq.sparsity.slots.positions  # [L, KV, n]
        for layer in range(3):
            for head in range(2):
                kept = positions[layer, head]
                assert len(set(kept.tolist())) == n
                assert torch.equal(rows(seq, cache.k, n)[layer, :, head], keys[layer, kept, head])
                assert torch.equal(rows(seq, cache.v, n)[layer, :, head], values[layer, kept, head])
        assert any(not torch.equal(positions[0, 0].sort().values, positions[l, h].sort().values) for l in range(3) for h in range(2))


def test_release_unused_gives_back_the_blocks_past_the_filled_slots():
    manager = BlockManager(num_blocks=8, block_size=4)
    seq = Sequence("s", list(range(20)), None)
    assert manager.allocate(seq, 20) and len(seq.block_table) == 5
    seq.num_computed_tokens, seq.num_evicted_tokens = 20, 11  # 9 slots filled: 3 blocks
    tail = seq.block_table[3:]
    assert manager.release_unused(seq) == 2 and len(seq.block_table) == 3
    assert manager.num_free_blocks == 5 and all(manager.ref_counts[b] == 0 for b in tail)
    assert manager.blocks_needed(seq, 4) == 1  # 9 + 4 slots: one more block
    seq.forget_cache()
    assert (seq.num_computed_tokens, seq.num_evicted_tokens) == (0, 0)


def test_evaluate_reports_the_blocks_the_engine_holds(long_tiny):
    """/optimization/evaluate's memory figure equals the blocks a request generating the text was measured
    to hold at its last step, dense and evicting."""
    from glassbox.research.evaluate import evaluate

    engine = make_engine(long_tiny)
    text = [(11 * i + 5) % 300 for i in range(300)]
    for method, expected in ((SlidingWindow(32, 4), 3), (H2O(0.1, 0.1), 4), (None, 19)):
        report = evaluate(engine, [text], method or parse_sparsity({"method": "dense"}))
        held = []
        generate(engine, method, 300 - 16, lambda seq: held.append(len(seq.block_table)), prompt=text[:16])
        blocks = report["kv_blocks_at_end"]
        assert blocks["sparse"] == held[-1] == report["per_text"][0]["kv_blocks_sparse"] == expected
        assert blocks["dense"] == report["per_text"][0]["kv_blocks_dense"] == math.ceil(299 / 16) == 19
        assert blocks["evicts"] == (method is not None)


def test_h2o_on_the_native_stack_observes_what_the_readable_path_observes(long_tiny_dir):
    """h2o's evicted decode steps run the native stack, whose attention writes what each kept key received
    (kernels/cpu/paged_attention.c): the same scores, evictions and tokens as the readable attention's."""
    quantized = load_model(long_tiny_dir)  # (the module's model is prepared for float32)
    runs = {}
    for name in ("native", "readable"):
        engine = make_engine(quantized, quantization="auto", block_size=4)
        if name == "readable":
            engine.runner.executors.pop("native_stack")  # the plan then masks h2o's rows: the readable path
        kept, executors = [], set()

        def watch(seq: Sequence) -> None:
            kept.append(seq.sparsity.slots.positions.clone())
            if seq.num_output_tokens > 1:
                executors.add(engine.last_plan.executor)
                assert engine.last_plan.observed_rows == ((0,) if name == "native" else ())

        final, logprobs = generate(engine, H2O(0.2, 0.1), 40, watch)
        runs[name] = (final.token_ids, logprobs, kept, executors)
    native, readable = runs["native"], runs["readable"]
    assert native[3] == {"native_stack"} and readable[3] == {"eager"}
    assert native[0] == readable[0]
    assert native[1] == pytest.approx(readable[1], abs=5e-3)  # two int12 paths, a bfloat16 cache: rounding apart
    assert len(native[2]) == len(readable[2]) and all(torch.equal(a, b) for a, b in zip(native[2], readable[2]))
