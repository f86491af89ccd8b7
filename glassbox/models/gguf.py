"""GGUF files: conversion into a folder our loader reads (safetensors + our config + tokenizer files).

A GGUF is converted once into a cache folder, keyed by the file's SHA-256, so the next start loads the
converted weights directly (see `converted_folder`). What a family's files hold (metadata -> ModelConfig,
llama.cpp tensor names -> ours, tensors llama.cpp reorders) its checkpoint format says
(models/<family>_checkpoint.py); this module only streams the tensors through it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from glassbox.config import ModelConfig
from glassbox.errors import GlassboxError, ModelLoadError
from glassbox.models.checkpoint_format import CheckpointFormat
from glassbox.models.gguf_reader import GGUFFile, GGUFFormatError, GGUFTensor
from glassbox.models.packing import pack, stack_shapes
from glassbox.models.registry import family_of_gguf

GGUF_MAGIC = b"GGUF"
CONFIG_FILE = "glassbox_config.json"
WEIGHTS_FILE = "model.safetensors"
# Bump when the conversion changes, so stale caches are not reused.
CONVERSION_VERSION = 5


def is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def cache_root() -> Path:
    return Path(os.environ.get("GLASSBOX_CACHE", Path.home() / ".cache" / "glassbox"))


def converted_folder(path: Path, progress: bool = True) -> Path:
    """The cache folder holding this GGUF converted; converts it first if it is not there yet.

    The conversion runs in a child process: its temporaries and the transformers tokenizer code it imports
    never weigh on the server's memory, and a failure there cannot hurt it. It imports no torch (families
    describe their checkpoints in torch-free files for it): converting the default model takes ~2.1 s and
    240 MB at peak without, ~3.2-4 s and 420 MB with torch imported (2-core CPU, 2026-12)."""
    folder = cache_root() / "gguf" / f"{file_sha256(path)[:32]}-v{CONVERSION_VERSION}"
    if (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=folder.parent))
    try:
        command = [sys.executable, "-m", "glassbox.models.gguf", str(path), str(staging)]
        # stdout carries the error message, if any; stderr (the progress bar) goes to the user.
        result = subprocess.run(command + ([] if progress else ["--quiet"]), stdout=subprocess.PIPE, text=True)
        if result.returncode != 0:
            raise ModelLoadError(result.stdout.strip() or f"converting {path} failed (exit code {result.returncode})")
        if folder.exists():  # another process finished first
            shutil.rmtree(staging)
        else:
            staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _read(path: Path) -> GGUFFile:
    try:
        return GGUFFile(path)
    except (GGUFFormatError, ValueError, OSError, struct.error) as error:
        raise ModelLoadError(
            f"cannot read GGUF file {path}: {error}. The file is truncated or corrupt; download or copy it again."
        ) from None


def iter_tensors(gguf: GGUFFile, family: CheckpointFormat, config: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(our name, float32 array) for every tensor the model uses, dequantized and in our layout (unstacked)."""
    for tensor in gguf.tensors:
        name = family.gguf_parameter_name(tensor.name)
        if name is None:
            continue
        try:
            array = tensor.dequantize().astype(np.float32, copy=False)
        except (NotImplementedError, ValueError) as error:
            raise ModelLoadError(
                f"cannot dequantize tensor {tensor.name} ({tensor.type_name}) of the GGUF file: {error}"
            ) from None
        yield name, family.gguf_tensor(name, array, config)


def convert_gguf(path: Path, out_dir: Path, progress: bool = True) -> None:
    """Write `out_dir`/{model.safetensors, glassbox_config.json, tokenizer files} from a GGUF file."""
    from tqdm import tqdm

    gguf = _read(path)
    family = family_of_gguf(gguf.metadata.get("general.architecture"))
    config = family.config_from_gguf(gguf)
    used = [t for t in gguf.tensors if family.gguf_parameter_name(t.name) is not None]
    if not used:
        raise ModelLoadError(f"GGUF file {path} holds no tensors glassbox can use")
    packed = family.packed_modules_mapping
    shapes = dict(pack(_shapes(used, family).items(), packed, stack_shapes))
    arrays = pack(iter_tensors(gguf, family, config), packed, np.concatenate)
    with tqdm(total=len(shapes), desc=f"converting {path.name}", unit="tensor", disable=not progress, leave=False) as bar:
        write_safetensors_streaming(out_dir / WEIGHTS_FILE, shapes, arrays, bar.update)
    (out_dir / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
    _save_tokenizer(gguf, out_dir)


def _shapes(tensors: list[GGUFTensor], family: CheckpointFormat) -> dict[str, tuple[int, ...]]:
    """Our name -> shape in our layout (unstacked), in the order `iter_tensors` yields them."""
    shapes = {}
    for tensor in tensors:
        name = family.gguf_parameter_name(tensor.name)
        shapes[name] = family.gguf_tensor_shape(name, tensor.shape)
    return shapes


def write_safetensors_streaming(
    path: Path,
    shapes: dict[str, tuple[int, ...]],
    arrays: Iterator[tuple[str, np.ndarray]],
    on_tensor: Any = lambda n: None,
) -> None:
    """Write float32 tensors to a safetensors file one at a time, so that only one is ever in memory.

    Format: u64 header length, JSON header {name: {dtype, shape, data_offsets}} padded to 8 bytes, data.
    `arrays` must yield the names of `shapes` in the same order.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = 4 * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for (name, array), expected in zip(arrays, shapes.items(), strict=True):
            if (name, array.shape) != (expected[0], tuple(expected[1])):
                raise ModelLoadError(f"GGUF tensor {name} has shape {array.shape}, expected {expected[1]}")
            f.write(memoryview(np.ascontiguousarray(array, dtype=np.float32)))
            on_tensor(1)


def _save_tokenizer(gguf: GGUFFile, out_dir: Path) -> None:
    """Build the tokenizer from the GGUF metadata with transformers' converter; save it as tokenizer files."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    meta = gguf.metadata
    if "tokenizer.ggml.tokens" not in meta:
        raise ModelLoadError("the GGUF file has no tokenizer (tokenizer.ggml.tokens is missing)")
    tokenizer_dict, tokenizer_config = (
        {name: meta[f"tokenizer.{key}"] for key, name in GGUF_TOKENIZER_MAPPING[group].items() if f"tokenizer.{key}" in meta}
        for group in ("tokenizer", "tokenizer_config")
    )
    if tokenizer_dict.get("tokenizer_type") == "llama":
        # llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise.
        tokenizer_config.setdefault("add_bos_token", True)
    tokens = tokenizer_dict["tokens"]
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is not None and token_id < len(tokens):
            tokenizer_config[name] = tokens[token_id]
    try:
        backend, _ = convert_gguf_tokenizer(meta["general.architecture"], tokenizer_dict)
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config)
    except Exception as error:  # transformers raises many types for vocabularies it cannot convert
        raise ModelLoadError(f"cannot build the tokenizer from the GGUF metadata: {error}") from None
    tokenizer.save_pretrained(str(out_dir))


def main(argv: list[str]) -> int:
    """`python -m glassbox.models.gguf GGUF_FILE OUT_DIR [--quiet]`: the converter process."""
    try:
        convert_gguf(Path(argv[0]), Path(argv[1]), progress="--quiet" not in argv)
    except GlassboxError as error:
        print(error)
        return 2
    except Exception as error:  # anything else a damaged file can trigger: still one line, no traceback
        print(f"cannot convert GGUF file {argv[0]}: {type(error).__name__}: {error}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
