"""Model configuration: one dataclass for every supported family, built from a Hugging Face
`config.json` dict or from GGUF metadata (see models/gguf.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from glassbox.errors import UnsupportedModelError

# HF `model_type` -> our family name (the key of models.registry.MODEL_CLASSES)
HF_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gpt2": "gpt2",
}

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
KV_CACHE_DTYPES = ("auto", "bfloat16", "fp8")


@dataclass
class ModelConfig:
    architecture: str  # "llama" | "qwen2" | "qwen3" | "gpt2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float = 1e-6
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2; Llama with attention_bias)
    output_bias: bool = False  # bias on o_proj (Llama's attention_bias covers o_proj too)
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3)
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "linear"|"llama3", ...}
    rope_freq_factors: list[float] | None = None  # [head_dim // 2] divisors from a GGUF's rope_freqs tensor
    # Per-layer sliding window (keys at distance >= window are masked); None = full attention.
    layer_windows: list[int | None] = field(default_factory=list)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    model_type: str = ""  # the HF model_type this came from, for /model_info

    def __post_init__(self) -> None:
        if self.architecture not in set(HF_MODEL_TYPES.values()):
            raise UnsupportedModelError(
                f"unsupported architecture {self.architecture!r}; glassbox serves "
                f"{', '.join(sorted(HF_MODEL_TYPES))} models"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if not self.layer_windows:
            self.layer_windows = [None] * self.num_hidden_layers

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return cls(**data)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from the dict of a Hugging Face `config.json` (transformers 4 or 5 layout)."""
        model_type = hf.get("model_type", "")
        if model_type not in HF_MODEL_TYPES:
            raise UnsupportedModelError(
                f"unsupported model_type {model_type!r} in config.json; glassbox serves "
                f"{', '.join(sorted(HF_MODEL_TYPES))} models"
            )
        arch = HF_MODEL_TYPES[model_type]
        eos = hf.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if arch == "gpt2":
            hidden = hf["n_embd"]
            return cls(
                architecture=arch,
                model_type=model_type,
                vocab_size=hf["vocab_size"],
                hidden_size=hidden,
                intermediate_size=hf.get("n_inner") or 4 * hidden,
                num_hidden_layers=hf["n_layer"],
                num_attention_heads=hf["n_head"],
                num_key_value_heads=hf["n_head"],
                head_dim=hidden // hf["n_head"],
                max_position_embeddings=hf["n_positions"],
                norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                hidden_act=hf.get("activation_function", "gelu_new"),
                tie_word_embeddings=hf.get("tie_word_embeddings", True),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
        # transformers 5 keeps RoPE settings in `rope_parameters`; 4 in rope_theta + rope_scaling.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        rope_scaling = rope if rope.get("rope_type", "default") != "default" else None
        num_heads = hf["num_attention_heads"]
        num_layers = hf["num_hidden_layers"]
        bias = bool(hf.get("attention_bias") or False)
        return cls(
            architecture=arch,
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            hidden_act=hf.get("hidden_act", "silu"),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=True if arch == "qwen2" else bias,
            output_bias=bias if arch == "llama" else False,
            qk_norm=arch == "qwen3",
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            layer_windows=_layer_windows(hf, num_layers),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def _layer_windows(hf: dict[str, Any], num_layers: int) -> list[int | None]:
    """Sliding-window size per layer: Mistral applies `sliding_window` to every layer; Qwen2/3 name
    the windowed layers in `layer_types` (only when `use_sliding_window` is on)."""
    window = hf.get("sliding_window")
    if not window or hf.get("use_sliding_window") is False:
        return [None] * num_layers
    layer_types = hf.get("layer_types")
    if layer_types:
        return [window if t == "sliding_attention" else None for t in layer_types]
    return [window] * num_layers


@dataclass
class EngineConfig:
    """How the engine runs: KV pool size, batching limits, scheduling policy."""

    block_size: int = 16
    # Bytes for the KV pool (keys + values, all layers). None: 1 GiB on the CPU; on CUDA, what is left of
    # gpu_memory_utilization x the device's memory after the weights and a warm-up pass's activations.
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None  # overrides kv_cache_memory when set
    # "auto": the model's dtype; "bfloat16": half the bytes of a float32 model's cache (the CPU's int8
    # mode reads half as much per decode step); "fp8": float8_e4m3fn (vLLM's name and format, scale 1):
    # half the bytes of bfloat16 per token, so twice the tokens in the pool and half the reads.
    kv_cache_dtype: str = "auto"
    enforce_eager: bool = False  # CUDA: no CUDA graphs for decode steps
    compile: bool = True  # CUDA: torch.compile the decoder layers (fused elementwise work)
    # Launch decode step N + 1 before the host has read step N's tokens, so the device does not wait
    # for the host's bookkeeping (vLLM's async scheduling). None: where CUDA graphs run. On the CPU the
    # steps run in turn anyway, so it only changes the order of the bookkeeping (tests use that).
    async_scheduling: bool | None = None
    max_num_seqs: int = 256  # sequences in one step at most
    max_num_batched_tokens: int = 2048  # tokens in one step at most: prefill chunks share it with decodes
    max_model_len: int | None = None  # default: the model's context length
    enable_prefix_caching: bool = True
    scheduling_policy: str = "fcfs"
    seed: int | None = None  # of the generator used by sampled requests without their own seed
    quantization: str | None = None  # "int4" | "int8" weight-only (CPU); None keeps the loaded dtype

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be at least 1, got {self.num_kv_blocks}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
