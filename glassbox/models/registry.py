"""The model families glassbox serves, one line each.

A family is its checkpoint format (torch-free: models/<family>_checkpoint.py) and the nn.Module class the
format names (models/<family>.py), imported when a model is built. This module imports no torch: the GGUF
converter, a child process kept free of torch (gguf.converted_folder), looks families up here.

Adding a family:
1. models/<family>.py: `<Family>ForCausalLM(config)`, plain, parameters under the checkpoint's names (stacked
   where `packed_modules_mapping` says), attention through layers.attention.Attention, and the parts:
   `embed(input_ids, positions) -> (hidden, layer_args)`, `layers`, `final_norm`, `embedding`,
   `compute_logits`, and `forward` = embed, every layer(x, *layer_args, meta), final_norm; per layer
   `input_norm`, `post_norm`, `attention`, `mlp`, `attention_residual(x, layer_args, meta)`,
   `mlp_residual(x)`, and `forward` = mlp_residual(attention_residual(...)). Class attributes
   `checkpoint_format` and `packed_modules_mapping`. (A Llama variant that differs by ModelConfig flags is a
   subclass in llama.py, as Qwen2ForCausalLM.)
2. models/<family>_checkpoint.py, importing no torch: a CheckpointFormat subclass with its architecture
   name, `model_class_path`, `hf_model_types`, `packed_modules_mapping`, `layer_prefix`, `config_from_hf`;
   `parameter_name` for checkpoint names that are not ours; for GGUF `gguf_architecture`, the
   `gguf_layer_names` / `gguf_global_names` tables, `config_from_gguf`, and `gguf_tensor` /
   `gguf_tensor_shape` for tensors llama.cpp stores in another layout.
3. One line here: its format in FAMILIES.
4. A tiny config in tests/conftest.py `_tiny_configs`: tests/test_model_parity.py then holds it to
   transformers (full forward, paged step by step, parts, and its GGUF if it is in GGUF_FAMILIES).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from glassbox.config import ModelConfig
from glassbox.errors import UnsupportedModelError
from glassbox.models.checkpoint_format import CheckpointFormat
from glassbox.models.gpt2_checkpoint import GPT2
from glassbox.models.llama_checkpoint import LLAMA, QWEN2, QWEN3

if TYPE_CHECKING:
    from torch import nn

FAMILIES: dict[str, CheckpointFormat] = {family.architecture: family for family in (LLAMA, QWEN2, QWEN3, GPT2)}

_BY_HF_MODEL_TYPE = {model_type: family for family in FAMILIES.values() for model_type in family.hf_model_types}
_BY_GGUF_ARCHITECTURE = {family.gguf_architecture: family for family in FAMILIES.values()}


def family(architecture: str) -> CheckpointFormat:
    """The family of ModelConfig.architecture."""
    if architecture not in FAMILIES:
        raise UnsupportedModelError(
            f"unsupported architecture {architecture!r}; glassbox serves {', '.join(sorted(_BY_HF_MODEL_TYPE))} models"
        )
    return FAMILIES[architecture]


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig from the dict of a Hugging Face config.json, read by the family of its `model_type`."""
    model_type = hf.get("model_type", "")
    if model_type not in _BY_HF_MODEL_TYPE:
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r} in config.json; glassbox serves "
            f"{', '.join(sorted(_BY_HF_MODEL_TYPE))} models"
        )
    return _BY_HF_MODEL_TYPE[model_type].config_from_hf(hf)


def family_of_gguf(gguf_architecture: Any) -> CheckpointFormat:
    """The family that reads GGUF files of `general.architecture` gguf_architecture."""
    if gguf_architecture not in _BY_GGUF_ARCHITECTURE:
        raise UnsupportedModelError(
            f"unsupported GGUF architecture {gguf_architecture!r}; glassbox reads "
            f"{', '.join(_BY_GGUF_ARCHITECTURE)} GGUF files"
        )
    return _BY_GGUF_ARCHITECTURE[gguf_architecture]


def model_class(architecture: str) -> type[nn.Module]:
    """The nn.Module class of a family (importing its module, and torch with it)."""
    module_name, _, class_name = family(architecture).model_class_path.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_model(config: ModelConfig) -> nn.Module:
    return model_class(config.architecture)(config)
