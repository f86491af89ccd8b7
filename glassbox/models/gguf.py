"""GGUF files: metadata -> ModelConfig, llama.cpp tensor names -> Hugging Face names, dequantization.

A GGUF is converted once into a cache folder (safetensors + our config + tokenizer files), keyed by the
file's SHA-256, so the next start loads the converted weights directly (see `converted_folder`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
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
from glassbox.errors import GlassboxError, ModelLoadError, UnsupportedModelError
from glassbox.models.gguf_reader import GGUFFile, GGUFFormatError, GGUFTensor
from glassbox.models.packing import PACKED_MODULES, pack, stack_shapes

GGUF_MAGIC = b"GGUF"
CONFIG_FILE = "glassbox_config.json"
WEIGHTS_FILE = "model.safetensors"
# Bump when the conversion changes, so stale caches are not reused.
CONVERSION_VERSION = 5

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gpt2")

# llama.cpp name (after "blk.N.") -> Hugging Face name (after "model.layers.N.")
_LLAMA_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LLAMA_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GPT2_LAYER_NAMES = {
    "attn_norm": "ln_1",
    "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
}
_GPT2_GLOBAL_NAMES = {
    "token_embd": "transformer.wte",
    "position_embd": "transformer.wpe",
    "output_norm": "transformer.ln_f",
    "output": "lm_head",
}
# GPT-2 linear weights that Hugging Face stores as Conv1D [in, out] and llama.cpp as [out, in].
_GPT2_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


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

    The conversion runs in a child process (without torch): its temporaries and the transformers
    tokenizer code it imports never weigh on the server's memory, and a failure there cannot hurt it."""
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


def config_from_gguf(gguf: GGUFFile) -> ModelConfig:
    arch = gguf.metadata.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"unsupported GGUF architecture {arch!r}; glassbox reads {', '.join(SUPPORTED_GGUF_ARCHITECTURES)} GGUF files"
        )

    def meta(key: str, default: Any = None) -> Any:
        return gguf.metadata.get(f"{arch}.{key}", default)

    tensors = {t.name: t for t in gguf.tensors}
    hidden = int(meta("embedding_length"))
    num_heads = int(meta("attention.head_count"))
    eos = gguf.metadata.get("tokenizer.ggml.eos_token_id")
    vocab_size = meta("vocab_size") or len(gguf.metadata.get("tokenizer.ggml.tokens", ()))
    common = dict(
        architecture=arch,
        model_type=arch,
        vocab_size=int(vocab_size),
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_hidden_layers=int(meta("block_count")),
        num_attention_heads=num_heads,
        max_position_embeddings=int(meta("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=gguf.metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=[] if eos is None else [int(eos)],
    )
    if arch == "gpt2":
        return ModelConfig(
            **common,
            num_key_value_heads=num_heads,
            head_dim=hidden // num_heads,
            norm_eps=float(meta("attention.layer_norm_epsilon", 1e-5)),
            hidden_act="gelu_new",
        )
    rope_scaling = None
    if meta("rope.scaling.type") == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(meta("rope.scaling.factor"))}
    # Llama 3.x files store the llama3 RoPE scaling as per-frequency divisors in `rope_freqs.weight`.
    rope_freqs = tensors.get("rope_freqs.weight")
    return ModelConfig(
        **common,
        num_key_value_heads=int(meta("attention.head_count_kv", num_heads)),
        head_dim=int(meta("attention.key_length", hidden // num_heads)),
        norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        attention_bias="blk.0.attn_q.bias" in tensors,
        output_bias="blk.0.attn_output.bias" in tensors,
        qk_norm=arch == "qwen3",
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        rope_freq_factors=None if rope_freqs is None else rope_freqs.dequantize().tolist(),
    )


def _unpermute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (its converter interleaves the two rotary halves of each head)."""
    rows = weight.shape[0]
    return (
        weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def hf_name(arch: str, gguf_name: str) -> str | None:
    """Hugging Face parameter name of a GGUF tensor; None for tensors we do not load."""
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    layer_names, global_names = (
        (_GPT2_LAYER_NAMES, _GPT2_GLOBAL_NAMES) if arch == "gpt2" else (_LLAMA_LAYER_NAMES, _LLAMA_GLOBAL_NAMES)
    )
    if match:
        layer, name, kind = match.groups()
        prefix = "transformer.h" if arch == "gpt2" else "model.layers"
        return f"{prefix}.{layer}.{layer_names[name]}.{kind}" if name in layer_names else None
    base, _, kind = gguf_name.rpartition(".")
    return f"{global_names[base]}.{kind}" if base in global_names else None


def iter_tensors(gguf: GGUFFile, config: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array) for every tensor the model uses, dequantized and in HF layout."""
    arch = config.architecture
    for tensor in gguf.tensors:
        name = hf_name(arch, tensor.name)
        if name is None:
            continue
        try:
            array = tensor.dequantize().astype(np.float32, copy=False)
        except (NotImplementedError, ValueError) as error:
            raise ModelLoadError(
                f"cannot dequantize tensor {tensor.name} ({tensor.type_name}) of the GGUF file: {error}"
            ) from None
        if arch == "llama" and name.endswith("self_attn.q_proj.weight"):
            array = _unpermute(array, config.num_attention_heads)
        elif arch == "llama" and name.endswith("self_attn.k_proj.weight"):
            array = _unpermute(array, config.num_key_value_heads)
        elif arch == "gpt2" and name.endswith(_GPT2_TRANSPOSED):
            array = array.T
        yield name, array


def convert_gguf(path: Path, out_dir: Path, progress: bool = True) -> None:
    """Write `out_dir`/{model.safetensors, glassbox_config.json, tokenizer files} from a GGUF file."""
    from tqdm import tqdm

    gguf = _read(path)
    config = config_from_gguf(gguf)
    used = [t for t in gguf.tensors if hf_name(config.architecture, t.name) is not None]
    if not used:
        raise ModelLoadError(f"GGUF file {path} holds no tensors glassbox can use")
    packed = PACKED_MODULES[config.architecture]
    shapes = dict(pack(_hf_shapes(used, config).items(), packed, stack_shapes))
    arrays = pack(iter_tensors(gguf, config), packed, np.concatenate)
    with tqdm(total=len(shapes), desc=f"converting {path.name}", unit="tensor", disable=not progress, leave=False) as bar:
        write_safetensors_streaming(out_dir / WEIGHTS_FILE, shapes, arrays, bar.update)
    (out_dir / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
    _save_tokenizer(gguf, out_dir)


def _hf_shapes(tensors: list[GGUFTensor], config: ModelConfig) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for tensor in tensors:
        name = hf_name(config.architecture, tensor.name)
        transposed = config.architecture == "gpt2" and name.endswith(_GPT2_TRANSPOSED)
        shapes[name] = tuple(reversed(tensor.shape)) if transposed else tensor.shape
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
