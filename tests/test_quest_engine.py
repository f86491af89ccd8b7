"""Quest served (layers/sparsity.BlockSparse on the kernels, engine/quest.py's block summaries): a request's
prompt attends densely, and each decode token reads only its top_blocks KV blocks — on the native CPU
attention and the Triton decode kernel — giving the outputs of the mask form over dense attention (the same
rule choosing the same keys), while the summaries stay the exact min/max of every block's keys."""

from __future__ import annotations

import pytest
import torch
from test_kv_eviction import DEVICES, long_tiny, long_tiny_dir, make_engine, on_device  # noqa: F401 (fixtures)
from test_kv_eviction import generate as generate_greedy

from glassbox.engine.sequence import Sequence
from glassbox.layers.sparsity import BlockSparse, MaskInputs
from glassbox.sampling import SamplingParams

PROMPT = [(7 * i + 3) % 300 for i in range(600)]  # 38 blocks of 16


class DecodeMask(BlockSparse):
    """The reference: the same rule in its mask form over dense attention, for decode queries only (the
    prompt, one chunk here, attends densely as the served path's does)."""

    reads_blocks = False

    def keep(self, x: MaskInputs) -> torch.Tensor:
        return x.allowed if x.q.shape[0] > 1 else super().keep(x)


class Pyramid(BlockSparse):
    """A plugin's block selector: its own budget per layer (all of layer 0, 2 blocks in layer 1), read by the
    kernels as BlockSparse's are."""

    name = "pyramid"

    def block_budget(self, layer_idx: int, context_len: int) -> int:
        return 0 if layer_idx == 0 or -(-context_len // self.block_size) <= 2 else 2


class PyramidMask(Pyramid):
    reads_blocks = False

    def keep(self, x: MaskInputs) -> torch.Tensor:
        return x.allowed if x.q.shape[0] > 1 else super().keep(x)


def generate(engine, method, max_tokens: int, watch=None):
    final, logprobs = generate_greedy(engine, method, max_tokens, watch, prompt=PROMPT)
    return final.token_ids, logprobs, final


def exact_summaries(engine, seq: Sequence) -> None:
    """The kept summaries of the sequence's blocks are its keys' min and max, in every layer."""
    k, table, block_size = engine.kv_cache.k, engine.runner.quest.table, engine.kv_cache.block_size
    for i, block in enumerate(seq.block_table):
        filled = min(block_size, seq.num_kv_slots - i * block_size)
        if filled > 0:
            keys = k[:, block, :filled].float()  # [L, filled, KV, D]
            assert torch.equal(table[:, block, :, 0].float(), keys.amin(1)), (i, filled)
            assert torch.equal(table[:, block, :, 1].float(), keys.amax(1)), (i, filled)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["block_sparse", "plugin"])
def test_quest_decode_equals_its_mask_form_and_reads_fewer_keys(long_tiny, long_tiny_dir, device, method):
    options = {"block_size": 16, "max_num_batched_tokens": 1024}
    if device == "cpu":
        options["quantization"] = "int8"  # the native CPU layers and attention
        # (int16 activations: int12's coarser steps would turn the two attention paths' float rounding into
        # logprob differences 16x larger than this test's 3e-4)
        options["activations"] = "int16"
    engine = make_engine(on_device(long_tiny, long_tiny_dir, device), **options)
    quest, reference, budgets = BlockSparse(16, 4, dense_layers=1), DecodeMask(16, 4, dense_layers=1), [0, 4]
    if method == "plugin":
        quest, reference, budgets = Pyramid(16, 4), PyramidMask(16, 4), [0, 2]
    assert quest.declares_block_reads() and not reference.declares_block_reads()
    plans = []

    def watch(seq: Sequence) -> None:
        plans.append(engine.last_plan)
        exact_summaries(engine, seq)

    dense, dense_logprobs, _ = generate(engine, None, 24)
    tokens, logprobs, final = generate(engine, quest, 24, watch)
    masked, masked_logprobs, masked_final = generate(engine, reference, 24)
    decode_plans = plans[1:]  # (the first is the prompt's: dense, no row reading blocks)
    assert plans[0].quest == {} and plans[0].masked_rows == ()
    assert all(plan.quest == {0: budgets} and plan.masked_rows == () for plan in decode_plans)
    assert {plan.executor for plan in decode_plans} == ({"native_stack"} if device == "cpu" else {"cuda_graph"})
    assert tokens == masked
    assert logprobs == pytest.approx(masked_logprobs, abs=3e-4)  # (float rounding of two attention paths: 1.5e-4 seen)
    assert (tokens, logprobs) != (dense, dense_logprobs)  # 4 of 38+ blocks change something
    # Density, the dense prompt's keys included: layer 1's decode tokens read 3 blocks + their own block.
    assert final.sparsity["density"] == pytest.approx(masked_final.sparsity["density"], rel=1e-3)
    assert final.sparsity["density"] < 0.98
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_summaries_made_mid_run_cover_the_running_sequences(long_tiny):
    """The first request that reads blocks arrives while others run: the summaries start exact for the
    blocks they filled (partial last blocks included), and stay exact as they grow."""
    engine = make_engine(long_tiny, block_size=16, quantization="int8")
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    first = engine.requests[engine.add_request(PROMPT[:37], params)].seq
    for _ in range(5):
        engine.step()
    assert engine.runner.quest is None  # nothing read blocks yet
    second = engine.requests[engine.add_request(PROMPT[:100], params, sparsity=BlockSparse(16, 2))].seq
    engine.step()
    assert engine.runner.quest is not None
    while engine.has_unfinished_requests():
        for seq in (first, second):
            if not seq.is_finished:
                exact_summaries(engine, seq)
        engine.step()


@pytest.mark.parametrize("one_per_block", [False, True])
def test_update_folds_new_keys_restarts_fresh_blocks_and_skips_padding(one_per_block):
    """BlockSummaries.update (the path of every step but the native CPU one, and of the CUDA graphs): a block
    whose first slot is written starts afresh, a continued block widens, padding rows (slot -1) touch no block."""
    from glassbox.engine.kv_cache import KVCache
    from glassbox.engine.quest import BlockSummaries

    class Shape:
        num_hidden_layers, num_key_value_heads, head_dim = 2, 3, 8

    kv = KVCache(Shape, num_blocks=6, block_size=4, dtype=torch.float32, device=torch.device("cpu"))
    kv.k.copy_(torch.randn(kv.k.shape, generator=torch.Generator().manual_seed(0)))
    summaries = BlockSummaries(kv, [])
    assert torch.equal(summaries.table[:, :6, :, 0], kv.k.amin(2)) and torch.equal(summaries.table[:, :6, :, 1], kv.k.amax(2))
    before = summaries.table.clone()
    new = torch.randn(2, 4, 3, 8)
    # block 2 afresh (slots 0, and 1 unless one token per block), padding, block 4 continued (slot 1)
    slots = torch.tensor([8, -1 if one_per_block else 9, -1, 17])
    written = [i for i in range(4) if slots[i] >= 0]
    flat = kv.k.view(2, 24, 3, 8)
    flat[:, slots[written]] = new[:, written]
    summaries.update(slots, one_per_block)
    block2 = new[:, [0]] if one_per_block else new[:, :2]
    assert torch.equal(summaries.table[:, 2, :, 0], block2.amin(1))
    assert torch.equal(summaries.table[:, 2, :, 1], block2.amax(1))
    assert torch.equal(summaries.table[:, 4, :, 1], torch.maximum(before[:, 4, :, 1], new[:, 3]))
    for untouched in (0, 1, 3, 5):
        assert torch.equal(summaries.table[:, untouched], before[:, untouched])
