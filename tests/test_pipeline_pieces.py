"""/pipeline's lm_head over a long input runs in slices of rows, one engine call each (so serving steps run
between them): the joined logits are the unsliced ones, row for row and bit for bit on the CPU default."""

from __future__ import annotations

import torch

from glassbox import LLM
from glassbox.research import pipeline


def test_lm_head_in_slices_equals_lm_head_whole():
    llm = LLM(quantization="auto", kv_cache_memory=64 << 20, enable_prefix_caching=False)
    engine = llm.engine
    ids = torch.randint(0, 49152, (150,), generator=torch.Generator().manual_seed(0)).tolist()
    _, (_, normed) = pipeline.execute(
        engine, [("embed", None), ("final_norm", None)], pipeline.Activation(None, ids), False
    )
    activation = pipeline.Activation(normed, ids)
    pieces = pipeline.pieces("lm_head", activation)
    size = pipeline.LM_HEAD_TOKENS_PER_CALL
    assert [len(p.token_ids) for p in pieces] == [size] * (150 // size) + [150 % size]
    parts = [pipeline.run_timed(engine, ("lm_head", None), p) for p in pieces]
    report, joined = pipeline.joined(("lm_head", None), parts, False)
    (whole_report,), (whole,) = pipeline.execute(engine, [("lm_head", None)], activation, False)
    assert joined.shape == (150, 49152) and torch.equal(joined, whole)
    assert report["stats"] == whole_report["stats"] and report["step"] == "lm_head"
    assert pipeline.pieces("layer", activation) == [activation]
