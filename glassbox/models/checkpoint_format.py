"""How a model family's checkpoints are stored: the torch-free half of a family.

A family is its nn.Module (models/llama.py: its parts and how they compute) and a CheckpointFormat
(models/llama_checkpoint.py: which Hugging Face config.json and GGUF files are its, how they give a
ModelConfig, how checkpoint tensor names map to the module's parameters, which tensors are stacked into one).
The module's class points to its format (`checkpoint_format`); the registry (models/registry.py) lists the
formats.

Formats import no torch: the GGUF converter is a child process kept free of torch (importing it there
made converting the default model ~1 s slower and its peak memory ~180 MB larger; see
gguf.converted_folder) and reads them.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from glassbox.config import ModelConfig
from glassbox.models.gguf_reader import GGUFFile

# nano-vllm's `packed_modules_mapping`: checkpoint module -> (our stacked module, its place in the stack).
# {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), ...}: q, k, v stacked along dim 0 into qkv_proj.
PackedModulesMapping = dict[str, tuple[str, int]]


class CheckpointFormat(ABC):
    """A family's checkpoints: subclasses set the class attributes and implement the two config readers."""

    architecture: ClassVar[str]  # ModelConfig.architecture: the family's name in the registry
    model_class_path: ClassVar[str]  # "module:Class" of its nn.Module, imported when a model is built
    hf_model_types: ClassVar[tuple[str, ...]]  # config.json `model_type` values it reads
    packed_modules_mapping: ClassVar[PackedModulesMapping] = {}
    layer_prefix: ClassVar[str]  # parameter names of decoder layer N start with f"{layer_prefix}.{N}."
    gguf_architecture: ClassVar[str]  # GGUF `general.architecture`
    # llama.cpp tensor name -> ours (before stacking), without ".weight"/".bias": per layer (after "blk.N.",
    # before f"{layer_prefix}.N."), and outside the layers.
    gguf_layer_names: ClassVar[dict[str, str]] = {}
    gguf_global_names: ClassVar[dict[str, str]] = {}

    @abstractmethod
    def config_from_hf(self, hf: dict[str, Any]) -> ModelConfig:
        """ModelConfig from the dict of a Hugging Face config.json (transformers 4 or 5 layout)."""

    @abstractmethod
    def config_from_gguf(self, gguf: GGUFFile) -> ModelConfig:
        """ModelConfig from a GGUF file's metadata (and, where the file keeps settings there, its tensors)."""

    def parameter_name(self, checkpoint_name: str) -> str | None:
        """Our parameter name (before stacking) of a Hugging Face checkpoint tensor; None for tensors that
        are not parameters (buffers some checkpoints save)."""
        return checkpoint_name

    def gguf_parameter_name(self, gguf_name: str) -> str | None:
        """Our parameter name (before stacking) of a GGUF tensor; None for tensors we do not load."""
        match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
        if match:
            layer, name, kind = match.groups()
            ours = self.gguf_layer_names.get(name)
            return None if ours is None else f"{self.layer_prefix}.{layer}.{ours}.{kind}"
        base, _, kind = gguf_name.rpartition(".")
        ours = self.gguf_global_names.get(base)
        return None if ours is None else f"{ours}.{kind}"

    def gguf_tensor(self, name: str, array: np.ndarray, config: ModelConfig) -> np.ndarray:
        """A dequantized GGUF tensor (our name `name`) in our layout; llama.cpp reorders some tensors."""
        return array

    def gguf_tensor_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape `gguf_tensor` gives a tensor of GGUF shape `shape` (the converter writes its header first)."""
        return shape

    def gguf_metadata(self, gguf: GGUFFile, key: str, default: Any = None) -> Any:
        """A hyperparameter of the file, stored under f"{architecture}.{key}"."""
        return gguf.metadata.get(f"{self.gguf_architecture}.{key}", default)

    def gguf_common_fields(self, gguf: GGUFFile) -> dict[str, Any]:
        """The ModelConfig fields every llama.cpp architecture stores the same way."""
        eos = gguf.metadata.get("tokenizer.ggml.eos_token_id")
        vocab_size = self.gguf_metadata(gguf, "vocab_size") or len(gguf.metadata.get("tokenizer.ggml.tokens", ()))
        return dict(
            architecture=self.architecture,
            model_type=self.gguf_architecture,
            vocab_size=int(vocab_size),
            hidden_size=int(self.gguf_metadata(gguf, "embedding_length")),
            intermediate_size=int(self.gguf_metadata(gguf, "feed_forward_length")),
            num_hidden_layers=int(self.gguf_metadata(gguf, "block_count")),
            num_attention_heads=int(self.gguf_metadata(gguf, "attention.head_count")),
            max_position_embeddings=int(self.gguf_metadata(gguf, "context_length", 2048)),
            # llama.cpp writes no output.weight when the head is the embedding
            tie_word_embeddings=not any(t.name == "output.weight" for t in gguf.tensors),
            bos_token_id=gguf.metadata.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=[] if eos is None else [int(eos)],
        )


def hf_eos_token_ids(hf: dict[str, Any]) -> list[int]:
    """config.json's `eos_token_id`: absent, one id, or a list."""
    eos = hf.get("eos_token_id")
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
