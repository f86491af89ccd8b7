"""Run the model one piece at a time: /pipeline/step_execute and /pipeline/schedule.

Steps, on one sequence of T tokens (no KV cache), each taking and giving hidden states [T, hidden]:
  embed        token ids -> hidden (GPT-2 adds its position embedding)
  norm         the layer's input norm alone (for inspection; not part of a chain)
  attention    x + attention(input_norm(x))        (the residual included)
  mlp          x + mlp(post_attention_norm(x))
  layer        the whole block (attention then mlp)
  final_norm   the model's last norm
  lm_head      hidden -> logits [T, vocab]
Chaining embed -> every layer (or attention + mlp) -> final_norm -> lm_head gives the full forward's logits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from glassbox.engine.llm_engine import LLMEngine
from glassbox.layers.attention import AttentionMetadata

STEPS = ("embed", "norm", "attention", "mlp", "layer", "final_norm", "lm_head")
LAYER_STEPS = {"norm", "attention", "mlp", "layer"}
MAX_VALUES = 65536  # values returned inline at most


@dataclass
class Activation:
    """What a handle holds: the tensor and the token ids it was computed from (for positions)."""

    tensor: torch.Tensor
    token_ids: list[int]


def _parts(model: nn.Module) -> tuple[Any, list[nn.Module]]:
    backbone = model.transformer if hasattr(model, "transformer") else model.model
    layers = backbone.h if hasattr(backbone, "h") else backbone.layers
    return backbone, list(layers)


def run_step(model: nn.Module, step: str, layer_idx: int | None, activation: Activation) -> torch.Tensor:
    backbone, layers = _parts(model)
    if step not in STEPS:
        raise ValueError(f"step: unknown {step!r}; choose one of {', '.join(STEPS)}")
    if step in LAYER_STEPS and (layer_idx is None or not 0 <= layer_idx < len(layers)):
        raise ValueError(f"layer_idx: step {step!r} needs layer_idx in [0, {len(layers) - 1}], got {layer_idx}")
    x = activation.tensor
    n = len(activation.token_ids)
    device = next(model.parameters()).device
    positions = torch.arange(n, device=device)
    if step == "embed":
        ids = torch.tensor(activation.token_ids, device=device)
        if hasattr(backbone, "wpe"):
            return backbone.wte(ids) + backbone.wpe(positions)
        return backbone.embed_tokens(ids)
    if x is None or x.shape[0] != n or x.dim() != 2:
        raise ValueError("input: this step needs hidden states [T, hidden] (a handle from embed or a layer step)")
    if step == "final_norm":
        return backbone.ln_f(x) if hasattr(backbone, "ln_f") else backbone.norm(x)
    if step == "lm_head":
        return model.compute_logits(x)
    layer = layers[layer_idx]
    meta = AttentionMetadata.for_prompts([n], device=device)
    gpt2 = hasattr(layer, "ln_1")
    input_norm = layer.ln_1 if gpt2 else layer.input_layernorm
    post_norm = layer.ln_2 if gpt2 else layer.post_attention_layernorm

    def attention(h: torch.Tensor) -> torch.Tensor:
        if gpt2:
            return h + layer.attn(input_norm(h), meta)
        cos, sin = backbone.rotary_emb(positions, h.dtype)
        return h + layer.self_attn(input_norm(h), cos, sin, meta)

    if step == "norm":
        return input_norm(x)
    if step == "attention":
        return attention(x)
    if step == "mlp":
        return x + layer.mlp(post_norm(x))
    return (lambda h: h + layer.mlp(post_norm(h)))(attention(x))  # layer


def describe(tensor: torch.Tensor, with_values: bool) -> dict[str, Any]:
    t = tensor.float()
    info: dict[str, Any] = {
        "shape": list(tensor.shape),
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "stats": {
            "mean": float(t.mean()),
            "std": float(t.std()) if t.numel() > 1 else 0.0,
            "min": float(t.min()),
            "max": float(t.max()),
            "l2_norm": float(t.norm()),
        },
    }
    if with_values:
        if tensor.numel() > MAX_VALUES:
            raise ValueError(f"return_intermediate: the output has {tensor.numel()} values, over the cap of {MAX_VALUES}")
        info["values"] = t.tolist()
    return info


@torch.inference_mode()
def execute(
    engine: LLMEngine, steps: list[tuple[str, int | None]], activation: Activation, with_values: bool
) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
    """Run the steps in order from `activation`; per step its time and a description; and the outputs."""
    model = engine.loaded.model
    reports, outputs = [], []
    for step, layer_idx in steps:
        start = time.perf_counter()
        out = run_step(model, step, layer_idx, activation)
        elapsed = (time.perf_counter() - start) * 1000
        activation = Activation(out, activation.token_ids)
        outputs.append(out)
        reports.append({"step": step, "layer_idx": layer_idx, "ms": elapsed, **describe(out, with_values)})
    return reports, outputs
