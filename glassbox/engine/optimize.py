"""Speed-ups applied to a loaded model from outside its file: weight layout and block quantization.

    optimize_model(model, "none")   # float weights, stored column-major (faster CPU GEMMs)
    optimize_model(model, "int8")   # every linear in GGUF's Q8_0 blocks (CPU)
    optimize_model(model, "int4")   # Q4_1 blocks, the LM head in Q8_0 (CPU)
    optimize_model(model, "auto")   # each linear in the format its weights were stored in: Q4_1 where they
                                    # lie on a Q4_1 grid (a Q4 GGUF), else Q8_0. On a GPU, or a CPU where
                                    # the native kernels cannot be built: "none"

Quantized layers are layers/quantized_linear.QLinear; Llama layers then run on the native executors
(engine/executors.py). The modules themselves say what was done (`weight_format`), so a second engine over
the same model (see research/schedule.py) neither converts twice nor asks for another format.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from glassbox.kernels import cpu_native
from glassbox.layers.quantized_linear import QLinear, supported
from glassbox.models.gpt2 import Conv1D
from glassbox.models.loader import DTYPES

log = logging.getLogger(__name__)

QUANTIZATIONS = ("auto", "none", "int4", "int8")
# A weight is on a Q4_1 grid when its Q4_1 blocks give it back to float16 rounding of the scales.
ON_GRID_TOLERANCE = 1e-3


def _linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight [out, in], bias) of a linear-like module, else None."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if isinstance(module, Conv1D):
        return module.weight.t(), module.bias
    return None


def weight_format(model: nn.Module) -> str:
    """What `optimize_model` made of this model, read off its modules: the quantized formats ("q4_1",
    "q8_0", "q4_1+q8_0"), "column_major" (float weights re-laid), or "as_loaded"."""
    formats = sorted({m.format for m in model.modules() if isinstance(m, QLinear)})
    if formats:
        return "+".join(formats)
    if any(isinstance(m, nn.Linear) and not m.weight.is_contiguous() for m in model.modules()):
        return "column_major"
    return "as_loaded"


def num_parameters(model: nn.Module, tied_head: bool) -> int:
    """The model's parameter count, its quantized weights counted as the weights they stand for (a head
    tied to the embedding once, as before quantization)."""
    quantized = sum(
        m.in_features * m.out_features for name, m in model.named_modules()
        if isinstance(m, QLinear) and not (tied_head and name == "lm_head")
    )  # fmt: skip
    return sum(p.numel() for p in model.parameters()) + quantized


def resolve(quantization: str | None, device: torch.device) -> str:
    """The mode a request for `quantization` (None: "auto") runs on this device."""
    quantization = quantization or "auto"
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
    if quantization == "auto":
        return "auto" if device.type == "cpu" and cpu_native.available() else "none"
    if quantization != "none" and device.type != "cpu":
        raise ValueError(f"quantization {quantization!r} is implemented for the CPU only")
    return quantization


def resolve_activations(activations: str, quantization: str | None, device: torch.device) -> str:
    """What quantized weights multiply for `activations`: "auto" is int12 blocks where the native kernels run
    the quantized weights (float32's perplexity on the default model, 15 of 16 greedy continuations equal, at
    integer speed: one AMX tile product per Q4_1 block, ~1.3x int16's tokens/s at 32 sequences,
    docs/benchmarks.md), float32 elsewhere."""
    if activations != "auto":
        return activations
    native = device.type == "cpu" and resolve(quantization, device) != "none" and cpu_native.available()
    return "int12" if native else "float32"


def resolve_kv_cache_dtype(kv_cache_dtype: str, activations: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache's dtype for `kv_cache_dtype` beside the resolved `activations`: "auto" is bfloat16 beside
    int8 or int12 activations (the CPU default: half the bytes attention reads a step, the same perplexity,
    +3-18% tokens/s at 32 sequences, docs/benchmarks.md; llama.cpp's default cache is 16-bit too), the model's
    dtype otherwise (float32 and int16 activations keep float32's greedy text token for token)."""
    if kv_cache_dtype == "auto":
        return torch.bfloat16 if activations in ("int8", "int12") else model_dtype
    return torch.float8_e4m3fn if kv_cache_dtype == "fp8" else DTYPES[kv_cache_dtype]


def optimize_model(model: nn.Module, quantization: str | None = "auto", activations: str = "float32") -> str:
    """Convert the weights in place, once per model; returns the mode it runs (`resolve`). A second
    engine over the same model must ask for a mode that agrees with the first one's (its quantized layers
    keep the activations they were made with)."""
    device = next(model.parameters()).device
    mode = resolve(quantization, device)
    done = weight_format(model)
    if done != "as_loaded":
        agrees = {"none": done == "column_major", "int8": done == "q8_0", "int4": "q4_1" in done}
        if not agrees.get(mode, done != "column_major"):
            raise ValueError(f"this model is already prepared as {done}, not for quantization={mode!r}")
        return mode
    if device.type == "cpu":
        if mode == "none":
            _column_major(model)
        else:
            _quantize(model, mode, activations)
        _copy_out_of_checkpoint(model)
    return mode


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


def _quantized(name: str, weight: torch.Tensor, bias: torch.Tensor | None, mode: str, activations: str) -> QLinear:
    if mode == "int8" or (mode == "int4" and name == "lm_head"):
        return QLinear(weight, bias, "q8_0", activations)
    if mode == "int4":
        return QLinear(weight, bias, "q4_1", activations)
    data, scales, error = cpu_native.quantize(weight, "q4_1")  # "auto" runs where the native kernels do
    if error.max() <= ON_GRID_TOLERANCE * weight.abs().max():
        return QLinear(weight, bias, "q4_1", activations, packed=(data, scales))
    return QLinear(weight, bias, "q8_0", activations)


def _quantize(model: nn.Module, mode: str, activations: str) -> None:
    replacements = []
    for name, module in model.named_modules():
        weight_bias = _linear_weight(module)
        if weight_bias is None or not supported(weight_bias[0].shape[1]):
            continue
        weight, bias = weight_bias
        replacements.append((name, _quantized(name, weight, bias, mode, activations)))
    for name, new_module in replacements:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new_module)
    formats = sorted({m.format for _, m in replacements})
    log.info("quantization=%s: %d linear layers in %s, %s activations", mode, len(replacements),
             "+".join(formats) or "float", activations)
