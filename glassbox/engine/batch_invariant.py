"""The batch-invariant mode (`EngineConfig(batch_invariant=True)`, `glassbox serve --batch-invariant`): a
sequence's logits are the same bits whatever else is in the batch and however its prompt was chunked.

    apply_batch_invariant(model, device)   # once, after engine/optimize.py, before graphs are captured

On CUDA the model's linears, RMSNorms and attention backend become layers/batch_invariant.py's (Triton
kernels with a fixed reduction order per row) and the torch.compiled executor is not built (inductor picks
its reductions by shape): steps run the eager forward, decode steps its CUDA graphs.

On the CPU the default already holds it (tests/test_batch_invariance.py): the native block-quantized
kernels compute each row alike for every M (kernels/cpu/qlinear.c), attention runs per sequence over its
keys in block order, RMSNorm and the sampler are per row. Float32 weights (quantization="none") multiply
with MKL, whose one-row product differs from the same row in a batch, so the mode refuses them.
"""

from __future__ import annotations

import torch
from torch import nn

from glassbox.engine.optimize import weight_format
from glassbox.kernels import cpu_native
from glassbox.layers.attention import set_attention_backend
from glassbox.layers.batch_invariant import (
    BatchInvariantAttentionBackend,
    BatchInvariantLinear,
    BatchInvariantRMSNorm,
    is_batch_invariant,
)
from glassbox.layers.norm import RMSNorm
from glassbox.models import llama_native


class BatchInvariantUnsupported(ValueError):
    """The mode cannot hold for this model on this device; the message says what to change."""


def apply_batch_invariant(model: nn.Module, device: torch.device) -> None:
    """Make every row's result independent of the batch (see the module docstring); raises
    BatchInvariantUnsupported where it cannot. Idempotent."""
    if device.type == "cpu":
        _check_cpu(model)
    else:
        convert_layers(model)


def _check_cpu(model: nn.Module) -> None:
    quantized = weight_format(model).startswith(("q4_1", "q8_0"))
    if not (quantized and cpu_native.available() and llama_native.supported(model)):
        raise BatchInvariantUnsupported(
            "batch_invariant on the CPU runs on the native block-quantized kernels: a Llama-family model "
            "without q/k norms, with quantization 'auto', 'int4' or 'int8' (float32 weights multiply with MKL, "
            f"whose single-row products differ from batched ones); this model runs {weight_format(model)}"
        )


def convert_layers(model: nn.Module) -> None:
    """Swap each nn.Linear and RMSNorm for its batch-invariant twin (keeping the parameters) and set the
    batch-invariant attention backend: what the mode does on CUDA. (On the CPU the kernels run in Triton's
    interpreter only: the tests use that.) Idempotent; the backend is set again each time (an engine sets
    its own before this runs, so a second engine over the same model needs it)."""
    replacements: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules() if not is_batch_invariant(model) else ():
        if type(module) is nn.Linear:
            replacements.append((name, BatchInvariantLinear.from_linear(module)))
        elif type(module) is RMSNorm:
            replacements.append((name, BatchInvariantRMSNorm.from_norm(module)))
        elif isinstance(module, nn.LayerNorm) or type(module).__name__ == "Conv1D":
            raise BatchInvariantUnsupported(
                f"batch_invariant on CUDA covers the Llama family (Llama, Qwen2, Qwen3, Mistral); "
                f"{type(model).__name__} has a {type(module).__name__} ({name})"
            )
    for name, new_module in replacements:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new_module)
    set_attention_backend(model, BatchInvariantAttentionBackend())
