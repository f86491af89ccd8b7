"""Run the model one piece at a time: /pipeline/step_execute and /pipeline/schedule.

Steps, on one sequence of T tokens (no KV cache), each taking and giving hidden states [T, hidden]:
  embed        token ids -> hidden (GPT-2 adds its position embedding)
  norm         the layer's input norm alone (for inspection; not part of a chain)
  attention    x + attention(input_norm(x))        (the residual included)
  mlp          x + mlp(post_norm(x))
  layer        the whole block (attention then mlp)
  final_norm   the model's last norm
  lm_head      hidden -> logits [T, vocab]
Chaining embed -> every layer (or attention + mlp) -> final_norm -> lm_head gives the full forward's logits.

Each step's output is kept behind a handle, so what a call will hold is known before it runs
(`output_bytes`): the server refuses a call whose outputs could not all be kept (max_handle_bytes), and
bounds the tokens of an input (pipeline_max_tokens). The server runs the steps of a schedule one engine
call each, so serving steps run between them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from glassbox.engine.llm_engine import LLMEngine
from glassbox.engine.tp_runner import RankContext, RankTask
from glassbox.layers.attention import AttentionMetadata

STEPS = ("embed", "norm", "attention", "mlp", "layer", "final_norm", "lm_head")
LAYER_STEPS = {"norm", "attention", "mlp", "layer"}
MAX_VALUES = 65536  # values returned inline at most


@dataclass
class Activation:
    """What a handle holds: the tensor and the token ids it was computed from (for positions)."""

    tensor: torch.Tensor
    token_ids: list[int]


def check_step(model: nn.Module, step: str, layer_idx: int | None, activation: Activation) -> None:
    """Raise ValueError naming the field if the step cannot run on this input."""
    if step not in STEPS:
        raise ValueError(f"step: unknown {step!r}; choose one of {', '.join(STEPS)}")
    num_layers = len(model.layers)
    if step in LAYER_STEPS and (layer_idx is None or not 0 <= layer_idx < num_layers):
        raise ValueError(f"layer_idx: step {step!r} needs layer_idx in [0, {num_layers - 1}], got {layer_idx}")
    x, n = activation.tensor, len(activation.token_ids)
    if step != "embed" and (x is None or x.shape[0] != n or x.dim() != 2):
        raise ValueError("input: this step needs hidden states [T, hidden] (a handle from embed or a layer step)")


def run_step(model: nn.Module, step: str, layer_idx: int | None, activation: Activation) -> torch.Tensor:
    """One step on the model's parts (models/llama.py lists them): the same modules, in the same order,
    as its forward."""
    check_step(model, step, layer_idx, activation)
    x = activation.tensor
    n = len(activation.token_ids)
    device = next(model.parameters()).device
    token_ids = torch.tensor(activation.token_ids, device=device)
    positions = torch.arange(n, device=device)
    if step == "embed":
        return model.embed(token_ids, positions)[0]
    if step == "final_norm":
        return model.final_norm(x)
    if step == "lm_head":
        return model.compute_logits(x)
    layer = model.layers[layer_idx]
    if step == "norm":
        return layer.input_norm(x)
    if step == "mlp":
        return layer.mlp_residual(x)
    # The layers' extra inputs (Llama's rotary cos/sin) for these positions, as the forward computes them.
    _, layer_args = model.embed(token_ids, positions)
    meta = AttentionMetadata.for_prompts([n], device=device)
    x = layer.attention_residual(x, layer_args, meta)
    return x if step == "attention" else layer.mlp_residual(x)  # "layer": attention then mlp


def output_bytes(engine: LLMEngine, steps: list[tuple[str, int | None]], num_tokens: int) -> int:
    """Bytes the steps' outputs take: [T, hidden] each, [T, vocab] for lm_head (float32, the widest)."""
    config = engine.loaded.config
    return sum(num_tokens * (config.vocab_size if step == "lm_head" else config.hidden_size) * 4 for step, _ in steps)


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


@dataclass
class StepOnRanks(RankTask):
    """One step on every rank of a tensor-parallel engine, each on its shard (the input, whole on every rank,
    sent along); rank 0's output is the whole step's."""

    step: str
    layer_idx: int | None
    activation: Activation

    def run_on_rank(self, rank: RankContext) -> torch.Tensor:
        with torch.inference_mode():
            return run_step(rank.model, self.step, self.layer_idx, self.activation)


# lm_head's tokens per engine call, so serving steps run between the calls of a long input: [8, 49152]
# logits are ~3 ms of a 2-core CPU, most of it reading the head's weights once (16 tokens: ~4.5 ms, and
# 10-17 ms under a busy server; 512 tokens at once held a waiting request's first token ~0.7 s).
LM_HEAD_TOKENS_PER_CALL = 8


def pieces(step: str, activation: Activation) -> list[Activation]:
    """The parts a step runs in, one engine call each: lm_head's rows in slices (each token's logits are its
    own row's), any other step whole."""
    n, size = len(activation.token_ids), LM_HEAD_TOKENS_PER_CALL
    if step != "lm_head" or n <= size or activation.tensor is None:
        return [activation]
    return [Activation(activation.tensor[i : i + size], activation.token_ids[i : i + size]) for i in range(0, n, size)]


def joined(
    step: tuple[str, int | None], parts: list[tuple[float, torch.Tensor]], with_values: bool
) -> tuple[dict[str, Any], torch.Tensor]:
    """The report and output of a step run in pieces (each piece's ms and output, in order, from
    `run_timed`). Off the engine thread: the statistics of [512, vocab] logits are ~0.1 s."""
    out = parts[0][1] if len(parts) == 1 else torch.cat([o for _, o in parts])
    return {"step": step[0], "layer_idx": step[1], "ms": sum(ms for ms, _ in parts), **describe(out, with_values)}, out


@torch.inference_mode()
def run_timed(engine: LLMEngine, step: tuple[str, int | None], activation: Activation) -> tuple[float, torch.Tensor]:
    """One step (or piece of one) on the engine thread: its ms and output, nothing more (`joined` describes
    the output off that thread). Under tensor parallelism it runs on every rank (its time includes sending it)."""
    name, layer_idx = step
    start = time.perf_counter()
    if engine.distributed:
        check_step(engine.loaded.model, name, layer_idx, activation)  # before sending: a bad request fails here alone
        out = engine.runner.run_task(StepOnRanks(name, layer_idx, activation))
    else:
        out = run_step(engine.loaded.model, name, layer_idx, activation)
    return (time.perf_counter() - start) * 1000, out


@torch.inference_mode()
def execute(
    engine: LLMEngine, steps: list[tuple[str, int | None]], activation: Activation, with_values: bool
) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
    """Run the steps in order from `activation`; per step its time and a description; and the outputs.
    Under tensor parallelism each step runs on every rank (its time includes sending it)."""
    reports, outputs = [], []
    for step, layer_idx in steps:
        elapsed, out = run_timed(engine, (step, layer_idx), activation)
        activation = Activation(out, activation.token_ids)
        outputs.append(out)
        reports.append({"step": step, "layer_idx": layer_idx, "ms": elapsed, **describe(out, with_values)})
    return reports, outputs
