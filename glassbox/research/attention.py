"""Attention probabilities of the live model, with statistics: /debug/attention_scores.

One cache-less forward over the prompt with the chosen layers in its probe's `capture_layers`
(layers/probe.py): those layers take the readable PyTorch path and hand out softmax(q·kᵀ) per head; the
others run as usual.
With a sparsity method, the probabilities are those of the masked attention (every layer masked).
"""

from __future__ import annotations

from typing import Any

import torch

from glassbox.engine.llm_engine import LLMEngine
from glassbox.layers.attention import AttentionMetadata
from glassbox.layers.probe import StepProbe
from glassbox.layers.sparsity import SparsityMethod, SparsityState

MAX_TOKENS = 1024  # a [heads, n, n] float32 matrix per layer: keep responses and memory bounded


def head_stats(probs: torch.Tensor, threshold: float) -> dict[str, torch.Tensor]:
    """probs [H, n, n] (causal, rows sum to 1) -> per head: share of causal entries below the threshold,
    entropy in nats averaged over query positions, and the mean k holding 90% of a query's mass."""
    n = probs.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    sparsity = ((probs < threshold) & causal).sum((-1, -2)) / causal.sum()
    entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1).mean(-1)
    sorted_probs = probs.sort(dim=-1, descending=True).values.cumsum(-1)
    k90 = ((sorted_probs < 0.9).sum(-1) + 1).clamp(max=n).float().mean(-1)
    return {"sparsity_ratio": sparsity, "entropy": entropy, "k_for_90pct_mass": k90}


def prompt_metadata(engine: LLMEngine, n: int, sparsity: SparsityState | None) -> AttentionMetadata:
    """Metadata for a cache-less forward over one n-token prompt, with a probe carrying its mask where the
    mask drops keys."""
    config = engine.loaded.config
    meta = AttentionMetadata.for_prompts([n], device=engine.loaded.device)
    meta.probe = StepProbe()
    if sparsity is not None and sparsity.masks_step(n, n, config.num_attention_heads, config.layer_windows):
        meta.probe.masks = {0: sparsity}
    return meta


@torch.inference_mode()
def attention_scores(
    engine: LLMEngine,
    token_ids: list[int],
    layer_idx: int | None,
    head_idx: int | None,
    threshold: float,
    sparsity: SparsityMethod | None = None,
) -> dict[str, Any]:
    config = engine.loaded.config
    if not 1 <= len(token_ids) <= MAX_TOKENS:
        raise ValueError(f"prompt: must hold 1 to {MAX_TOKENS} tokens, got {len(token_ids)}")
    if layer_idx is not None and not 0 <= layer_idx < config.num_hidden_layers:
        raise ValueError(f"layer_idx: must be in [0, {config.num_hidden_layers - 1}], got {layer_idx}")
    if head_idx is not None and not 0 <= head_idx < config.num_attention_heads:
        raise ValueError(f"head_idx: must be in [0, {config.num_attention_heads - 1}], got {head_idx}")
    if head_idx is not None and layer_idx is None:
        raise ValueError("head_idx: give layer_idx too")
    layers = [layer_idx] if layer_idx is not None else list(range(config.num_hidden_layers))
    device = engine.loaded.device
    n = len(token_ids)
    state = SparsityState(sparsity) if sparsity is not None else None
    meta = prompt_metadata(engine, n, state)
    meta.probe.capture_layers = frozenset(layers)
    # Through the runner: under tensor parallelism every rank runs it and the heads come back from their ranks.
    engine.runner.run_forward(torch.tensor(token_ids, device=device), torch.arange(n, device=device), meta)
    tokens = [engine.tokenizer.decode([t], skip_special_tokens=False) for t in token_ids]
    result: dict[str, Any] = {"tokens": tokens, "token_ids": token_ids, "threshold": threshold, "num_tokens": n}
    if state is not None:
        result["sparsity"] = state.report()
    per_layer = []
    for layer in layers:
        probs = meta.probe.captured[layer][0].cpu()  # [H, n, n]
        stats = head_stats(probs, threshold)
        if head_idx is not None:
            return {
                **result,
                "layer_idx": layer,
                "head_idx": head_idx,
                "attention_matrix": probs[head_idx].tolist(),
                **{name: float(values[head_idx]) for name, values in stats.items()},
            }
        heads = [
            {"head_idx": h, **{name: float(values[h]) for name, values in stats.items()}}
            for h in range(probs.shape[0])
        ]
        if layer_idx is not None:  # one layer: a matrix per head
            for h, head in enumerate(heads):
                head["attention_matrix"] = probs[h].tolist()
            return {**result, "layer_idx": layer, "heads": heads}
        per_layer.append({"layer_idx": layer, "heads": heads})
    return {**result, "layers": per_layer}  # every layer: statistics only
