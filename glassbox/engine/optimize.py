"""Speed-ups applied to a loaded model from outside its file: weight layout and weight-only quantization.

    optimize_model(model, quantization=None)    # float weights, stored column-major (faster CPU GEMMs)
    optimize_model(model, quantization="int4")  # 4-bit group-32 weights, int8 LM head (CPU)
    optimize_model(model, quantization="int8")  # 8-bit per-row weights (CPU); Llama layers in float32 then
                                                # run on the native executors (engine/executors.py) where built

The modules themselves say what was done (`weight_format`), so a second engine over the same model (see
research/schedule.py) neither converts twice nor asks for another format.
"""

from __future__ import annotations

import torch
from torch import nn

from glassbox.layers.quantized_linear import Int4Linear, Int8Linear, int4_supported
from glassbox.models.gpt2 import Conv1D

QUANTIZATIONS = ("int4", "int8")


def _linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight [out, in], bias) of a linear-like module, else None."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if isinstance(module, Conv1D):
        return module.weight.t(), module.bias
    return None


def weight_format(model: nn.Module) -> str:
    """What `optimize_model` made of this model, read off its modules: "int4", "int8", "column_major"
    (float weights re-laid), or "as_loaded"."""
    kinds = {type(m) for m in model.modules()}
    if Int4Linear in kinds:
        return "int4"
    if Int8Linear in kinds:
        return "int8"
    if any(isinstance(m, nn.Linear) and not m.weight.is_contiguous() for m in model.modules()):
        return "column_major"
    return "as_loaded"


def optimize_model(model: nn.Module, quantization: str | None = None) -> None:
    """Convert the weights in place, once per model; a second engine over the same model must ask for the
    same mode."""
    done = weight_format(model)
    if done in QUANTIZATIONS or done == "column_major":
        if done != (quantization or "column_major"):
            raise ValueError(f"this model is already prepared for quantization={done!r}, not {quantization!r}")
        return
    device = next(model.parameters()).device
    if quantization is not None:
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
        if device.type != "cpu":
            raise ValueError(f"quantization {quantization!r} is implemented for the CPU only")
        _quantize(model, quantization)
        _copy_out_of_checkpoint(model)
    elif device.type == "cpu":
        _column_major(model)
        _copy_out_of_checkpoint(model)


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
