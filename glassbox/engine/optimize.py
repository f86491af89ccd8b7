"""Speed-ups applied to a loaded model from outside its file: weight layout and weight-only quantization.

    optimize_model(model, quantization=None)    # float weights, stored column-major (faster CPU GEMMs)
    optimize_model(model, quantization="int4")  # 4-bit group-32 weights, int8 LM head (CPU)
    optimize_model(model, quantization="int8")  # 8-bit per-row weights (CPU); Llama layers in float32 then
                                                # run on the native kernels (models/llama_native.py) where built
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from glassbox.layers.attention import Attention
from glassbox.layers.quantized_linear import Int4Linear, Int8Linear, int4_supported
from glassbox.models import llama_native
from glassbox.models.gpt2 import Conv1D

QUANTIZATIONS = ("int4", "int8")


def _linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight [out, in], bias) of a linear-like module, else None."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if isinstance(module, Conv1D):
        return module.weight.t(), module.bias
    return None


def optimize_model(model: nn.Module, quantization: str | None = None) -> None:
    """Apply once per model; a second engine over the same model must ask for the same mode."""
    done = getattr(model, "glassbox_optimized", None)
    if done is not None:
        if done != (quantization or "none"):
            raise ValueError(f"this model is already prepared for quantization={done!r}, not {quantization!r}")
        return
    model.glassbox_optimized = quantization or "none"
    device = next(model.parameters()).device
    if quantization is not None:
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
        if device.type != "cpu":
            raise ValueError(f"quantization {quantization!r} is implemented for the CPU only")
        _quantize(model, quantization)
        _copy_out_of_checkpoint(model)
        if quantization == "int8" and next(model.parameters()).dtype == torch.float32:
            model.glassbox_native = llama_native.install(model)
    elif device.type == "cpu":
        _column_major(model)
        _copy_out_of_checkpoint(model)


def compile_layers(model: nn.Module) -> None:
    """CUDA: a torch.compiled version of every decoder layer, used by the steps whose metadata says
    `compiled` (the CUDA-graph captures, and eager steps of many tokens: model_runner.COMPILED_MIN_TOKENS):
    the norms, rotary embedding, SiLU·mul and residual adds around the matmuls become a few fused kernels,
    and a decode step of a small model is bound by its number of kernels. Short eager steps keep the plain
    forward: a compiled region's Python entry costs more there than it saves. Attention stays outside the
    compiled code: its backends branch on per-step metadata and launch their own kernels. Shapes are
    dynamic: one compiled graph serves every batch size and every layer."""
    if getattr(model, "glassbox_compiled", False):  # once per model: engines may share one (research/schedule.py)
        return
    model.glassbox_compiled = True
    for module in model.modules():
        if isinstance(module, Attention):
            module.forward = torch.compiler.disable(module.forward)
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            for layer in module:
                layer.forward = _dispatch(layer.forward, torch.compile(layer.forward, dynamic=True))


def _dispatch(eager: Callable[..., torch.Tensor], compiled: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A layer forward (x, ..., meta) that takes the compiled path when the step's metadata asks for it."""

    def forward(*args: Any) -> torch.Tensor:
        return compiled(*args) if args[-1].compiled else eager(*args)

    return forward


def _column_major(model: nn.Module) -> None:
    """Store each nn.Linear weight [out, in] as the transpose of a contiguous [in, out] tensor: same
    values, shape and name, but F.linear then hands MKL a non-transposed operand, which is up to 2x
    faster for batched rows on this kind of CPU."""
    tied_head = getattr(model, "lm_head", None) if _is_tied(model) else None
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module is not tied_head and module.weight.is_contiguous():
                module.weight = nn.Parameter(module.weight.t().contiguous().t(), requires_grad=False)


def _copy_out_of_checkpoint(model: nn.Module) -> None:
    """Copy the tensors still backed by the memory-mapped checkpoint (embedding, norms). Converting the
    others read the whole file, and the mapping keeps those pages resident (~300 MB for the default
    model) until no tensor refers to it any more."""
    with torch.no_grad():
        for module in model.modules():
            for param in module.parameters(recurse=False):
                if param.is_contiguous():  # a tied tensor is copied twice, and stays shared
                    param.data = param.data.clone()


def _is_tied(model: nn.Module) -> bool:
    head = getattr(model, "lm_head", None)
    return head is not None and any(
        p is head.weight for name, p in model.named_parameters(remove_duplicate=False) if not name.startswith("lm_head")
    )


def _quantize(model: nn.Module, quantization: str) -> None:
    replacements = []
    for name, module in model.named_modules():
        weight_bias = _linear_weight(module)
        if weight_bias is None:
            continue
        weight, bias = weight_bias
        out_features, in_features = weight.shape
        if quantization == "int4" and name != "lm_head" and int4_supported(in_features, out_features):
            replacements.append((name, Int4Linear(weight, bias)))
        else:
            replacements.append((name, Int8Linear(weight, bias)))
    for name, new_module in replacements:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new_module)
