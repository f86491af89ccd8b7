"""Quality impact of a sparsity mask: /optimization/evaluate.

Teacher-forced, on the live model: each text runs twice as one cache-less forward — dense, then with the
mask on every layer — and the two next-token distributions are compared position by position:
perplexity both ways, mean KL(dense ‖ sparse), top-1 agreement, the realised density, and per layer the
relative error of the attention output ‖O_dense − O_sparse‖ / ‖O_dense‖ (measured in the sparse run, so a
layer's error includes what earlier layers' masks changed in its input).

Memory beside quality: the KV blocks a request holds at its last decode step when its prompt and output
are the text (at least one token decoded), dense and under the method — fewer where
this engine evicts what the method drops (engine/eviction.py). The figure is the method's own bound
(`max_kv_tokens`), which tests/test_kv_eviction.py holds equal to the blocks the engine was measured to hold.
The quality figures are the mask form's: what an evicting sliding_window computes too, while a served h2o
may differ (an evicted key never comes back; the mask form ranks every older key at every step).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from glassbox.engine.llm_engine import NO_MASKS_UNDER_TENSOR_PARALLELISM, LLMEngine
from glassbox.errors import FieldError
from glassbox.layers.attention import attention_layers
from glassbox.layers.sparsity import SparsityMethod, SparsityState
from glassbox.research.attention import prompt_metadata

MAX_TOKENS = 1024  # per text, served: each layer's [heads, n, n] scores are held at once
ROWS = 256  # logits computed this many positions at a time ([ROWS, vocab] float32)


def _forward(
    engine: LLMEngine, token_ids: list[int], sparsity: SparsityState | None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Hidden states [T, hidden] after the final norm, and each layer's attention output [T, H, D]."""
    model = engine.loaded.model
    device = engine.loaded.device
    outputs: list[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda m, args, out: outputs.append(out.float())) for layer in attention_layers(model)]
    try:
        n = len(token_ids)
        meta = prompt_metadata(engine, n, sparsity)
        hidden = model(torch.tensor(token_ids, device=device), torch.arange(n, device=device), meta)
    finally:
        for hook in hooks:
            hook.remove()
    return hidden, outputs


def _compare(engine: LLMEngine, dense: torch.Tensor, sparse: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Sums over positions: NLL dense and sparse, KL(dense ‖ sparse), top-1 agreements."""
    sums = {"nll_dense": 0.0, "nll_sparse": 0.0, "kl": 0.0, "agree": 0.0}
    model = engine.loaded.model
    for start in range(0, len(targets), ROWS):
        rows = slice(start, start + ROWS)
        log_p = F.log_softmax(model.compute_logits(dense[rows]).float(), dim=-1)
        log_q = F.log_softmax(model.compute_logits(sparse[rows]).float(), dim=-1)
        target = targets[rows, None]
        sums["nll_dense"] -= float(log_p.gather(1, target).sum())
        sums["nll_sparse"] -= float(log_q.gather(1, target).sum())
        sums["kl"] += float((log_p.exp() * (log_p - log_q)).sum())
        sums["agree"] += float((log_p.argmax(-1) == log_q.argmax(-1)).sum())
    return sums


@torch.inference_mode()
def evaluate(
    engine: LLMEngine, texts: list[list[int]], method: SparsityMethod, max_tokens: int = MAX_TOKENS
) -> dict[str, Any]:
    """texts: token ids (each at least 2, at most max_tokens tokens: a bench may go past the served limit).
    The figures averaged over every predicted position."""
    if engine.distributed:
        raise FieldError("sparsity", NO_MASKS_UNDER_TENSOR_PARALLELISM)
    for i, ids in enumerate(texts):
        if not 2 <= len(ids) <= max_tokens:
            raise ValueError(f"texts[{i}]: must hold 2 to {max_tokens} tokens, got {len(ids)}")
    num_layers = engine.loaded.config.num_hidden_layers
    err_num = [0.0] * num_layers  # Σ ‖O_dense − O_sparse‖² per layer
    err_den = [0.0] * num_layers  # Σ ‖O_dense‖²
    totals = {"nll_dense": 0.0, "nll_sparse": 0.0, "kl": 0.0, "agree": 0.0}
    per_text = []
    state = SparsityState(method)
    positions = 0
    kv_totals = {"dense": 0, "sparse": 0}
    for ids in texts:
        dense_hidden, dense_outs = _forward(engine, ids, None)
        sparse_hidden, sparse_outs = _forward(engine, ids, state)
        if state.error:
            raise ValueError(f"sparsity: the method raised {state.error}")
        for layer, (d, s) in enumerate(zip(dense_outs, sparse_outs)):
            err_num[layer] += float((d - s).pow(2).sum())
            err_den[layer] += float(d.pow(2).sum())
        targets = torch.tensor(ids[1:], device=dense_hidden.device)
        sums = _compare(engine, dense_hidden[:-1], sparse_hidden[:-1], targets)
        n = len(targets)
        positions += n
        for key in totals:
            totals[key] += sums[key]
        blocks = kv_blocks_at_end(engine, method, len(ids))
        for key in kv_totals:
            kv_totals[key] += blocks[key]
        per_text.append(
            {
                "num_tokens": len(ids),
                "kv_blocks_dense": blocks["dense"],
                "kv_blocks_sparse": blocks["sparse"],
                "perplexity_dense": math.exp(sums["nll_dense"] / n),
                "perplexity_sparse": math.exp(sums["nll_sparse"] / n),
                "kl_dense_sparse": sums["kl"] / n,
                "top1_agreement": sums["agree"] / n,
            }
        )
    return {
        "sparsity": method.spec(),
        "num_texts": len(texts),
        "num_positions": positions,
        "perplexity_dense": math.exp(totals["nll_dense"] / positions),
        "perplexity_sparse": math.exp(totals["nll_sparse"] / positions),
        "kl_dense_sparse": totals["kl"] / positions,
        "top1_agreement": totals["agree"] / positions,
        "density": state.density(),
        "attention_output_rel_error": [math.sqrt(a / b) if b else 0.0 for a, b in zip(err_num, err_den)],
        "kv_blocks_at_end": {**kv_totals, "block_size": engine.config.block_size, "evicts": engine.evicts(method)},
        "per_text": per_text,
        "note": (
            "teacher-forced; KL in nats per position; quality from the mask over dense scores (what an evicting "
            "method computes too); kv_blocks_at_end: blocks held at the last decode step of generating each "
            "text, summed over the texts"
        ),
    }


def kv_blocks_at_end(engine: LLMEngine, method: SparsityMethod, num_tokens: int) -> dict[str, int]:
    """KV blocks a request whose prompt and output are `num_tokens` tokens holds at its last decode step
    (which computes all but the last token): dense, and under `method` (what it keeps where this engine
    evicts, else every token)."""
    block_size = engine.config.block_size
    context_len = num_tokens - 1
    held = method.max_kv_tokens(context_len) if engine.evicts(method) else context_len
    return {"dense": -(-context_len // block_size), "sparse": -(-held // block_size)}
