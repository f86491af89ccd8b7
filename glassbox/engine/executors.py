"""The ways a step's forward pass can run, each registered by name and chosen per step by the runner's
plan (engine/step_plan.py). The model stays plain: an executor calls its parts (`embed`, `layers`,
`final_norm`) or its forward, never patches them.

Each executor's `forward(input_ids [T], positions [T], meta) -> hidden [T, hidden]` has the model's own
signature and gives the model's result (the tests hold each to the eager forward). The CUDA-graph
executor (engine/cuda_graphs.py) replays a captured decode step instead, and gives logits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from glassbox.kernels import cpu_native
from glassbox.layers.attention import AttentionMetadata
from glassbox.layers.batch_invariant import is_batch_invariant
from glassbox.models import llama_native


class Executor(Protocol):
    name: str

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor: ...


class EagerExecutor:
    """The model's own forward: the readable path, the one module hooks (latency timers) and masks see."""

    name = "eager"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)


class CompiledExecutor:
    """CUDA: every decoder layer torch.compiled (dynamic shapes: one graph serves every batch size and every
    layer); the norms, rotary embedding, SiLU·mul and residual adds around the matmuls become a few fused
    kernels. Attention stays outside the compiled code (its Triton backend is opaque to torch.compile). Used inside the CUDA-graph
    captures and for long eager steps; a short eager step would pay more for entering the compiled regions
    than it saves."""

    name = "compiled"

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers = [torch.compile(layer.forward, dynamic=True) for layer in model.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x, layer_args = self.model.embed(input_ids, positions)
        for layer in self.layers:
            x = layer(x, *layer_args, meta)
        return self.model.final_norm(x)


class NativeLayersExecutor:
    """CPU, block-quantized Llama-family layers in float32: each decoder layer in five native kernel calls
    (models/llama_native.py) instead of ~30 tensor ops. Attention is native over a float32 or bfloat16
    cache, the model's own otherwise (fp8)."""

    name = "native_layers"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x, (cos, sin) = self.model.embed(input_ids, positions)
        for layer in self.model.layers:
            x = llama_native.layer_forward(layer, x, cos, sin, meta)
        return self.model.final_norm(x)


class NativeStackExecutor:
    """CPU, as native_layers, with all the layers in one native call (llama_native.NativeStack); for steps
    over a cache of a dtype the kernel reads (cpu_native.CACHE_DTYPES: float32, bfloat16)."""

    name = "native_stack"

    def __init__(self, model: nn.Module) -> None:
        self.stack = llama_native.NativeStack(model)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.stack(input_ids, positions, meta)


def _native_supported(model: nn.Module, device: torch.device, compile: bool) -> bool:
    weight = next(model.parameters())
    return device.type == "cpu" and weight.dtype == torch.float32 and cpu_native.available() and llama_native.supported(model)


# name -> (whether it applies to this model on this device, with compile on/off; how to build it).
# The eager executor always applies. Add a fast path here, then teach ModelRunner.plan when to take it.
REGISTRY: dict[str, tuple[Callable[[nn.Module, torch.device, bool], bool], Callable[[nn.Module], Executor]]] = {
    "eager": (lambda model, device, compile: True, EagerExecutor),
    # Not over batch-invariant layers (engine/batch_invariant.py): inductor chooses its reductions by shape.
    "compiled": (
        lambda model, device, compile: compile and device.type == "cuda" and not is_batch_invariant(model),
        CompiledExecutor,
    ),
    "native_layers": (_native_supported, NativeLayersExecutor),
    "native_stack": (_native_supported, NativeStackExecutor),
}


def build_executors(model: nn.Module, device: torch.device, compile: bool) -> dict[str, Executor]:
    """The executors that apply to this model on this device (eager always)."""
    return {name: build(model) for name, (applies, build) in REGISTRY.items() if applies(model, device, compile)}
