"""Model configuration: one dataclass for every supported family, built by the family from a Hugging Face
`config.json` or GGUF metadata (models/<family>_checkpoint.py, looked up in models/registry.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from glassbox.errors import UnsupportedModelError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "fp8")
ACTIVATIONS = ("auto", "float32", "int8", "int16", "int12")  # (EngineConfig.activations)


@dataclass
class ModelConfig:
    architecture: str  # the family: a key of models.registry.FAMILIES ("llama", "qwen2", "qwen3", "gpt2")
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


@dataclass
class EngineConfig:
    """How the engine runs: KV pool size, batching limits, scheduling policy."""

    block_size: int = 16
    # Bytes for the KV pool (keys + values, all layers). None: 1 GiB on the CPU; on CUDA, what is left of
    # gpu_memory_utilization x the device's memory after the weights and a warm-up pass's activations.
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None  # overrides kv_cache_memory when set
    # "auto": bfloat16 beside int12 or int8 activations (the CPU default), else the model's dtype
    # (engine/optimize.resolve_kv_cache_dtype); "float32"; "bfloat16": half the bytes of a float32 model's
    # cache, so half the reads a decode step; "fp8": float8_e4m3fn (vLLM's name and format, scale 1):
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
    # Weights on the CPU (engine/optimize.py): "auto" (each linear in the block format its checkpoint stored,
    # Q4_1 or Q8_0; float32 where the native kernels cannot run), "int4", "int8", or "none" (float32).
    quantization: str | None = "auto"
    # What quantized CPU weights multiply: "float32" activations (the model's own numerics), "int8" blocks of
    # 32 (llama.cpp's arithmetic: integer dot products, faster at large batches), "int16" blocks as two int8
    # halves (integer products at float32's greedy text; layers/quantized_linear.py), "int12" (the same at
    # 4,079 levels: one AMX tile product per Q4_1 block), or "auto": int12 where the native kernels run the
    # quantized weights, else float32 (engine/optimize.resolve_activations).
    activations: str = "auto"
    # Ranks that split every layer's weights and the KV cache by heads (engine/tp_runner.py): this process is
    # rank 0 and schedules; tensor_parallel_size - 1 worker processes run their shards (or torchrun's ranks).
    tensor_parallel_size: int = 1
    # Take the tensor-parallel path (process group, sharded layers, rank 0 sending each call) even with one
    # rank: on one GPU, the NCCL path at world size 1 (tests). Off: one rank runs the plain engine.
    distributed: bool = False
    # A sequence's logits the same bits whatever else is in the batch and however its prompt was chunked
    # (engine/batch_invariant.py): on CUDA, Triton matmuls/norms/attention with a fixed reduction order per
    # row (slower); on the CPU the native quantized kernels, which already are.
    batch_invariant: bool = False

    def __post_init__(self) -> None:
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {self.activations!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be at least 1, got {self.num_kv_blocks}")
        if self.batch_invariant and (self.tensor_parallel_size > 1 or self.distributed):
            raise ValueError("batch_invariant runs on one rank; set tensor_parallel_size=1")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
