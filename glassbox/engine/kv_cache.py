"""The paged KV cache: one preallocated pool of fixed-size blocks per device, shared by all sequences.

k and v: [num_layers, num_blocks, block_size, num_kv_heads, head_dim]. Layer i's attention module gets
views k[i], v[i]; a sequence's block table lists which blocks hold its tokens, in order.
"""

from __future__ import annotations

import torch
from torch import nn

from glassbox.config import ModelConfig
from glassbox.engine.step_metadata import filler_prompts
from glassbox.layers.attention import Attention, attention_layers

# Device memory kept out of the KV pool for CUDA graphs' private pool and the sampler's buffers.
CUDA_RESERVE_BYTES = 1 << 30


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers, keys and values."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * block_size * config.num_key_value_heads * config.head_dim * element


class KVCache:
    def __init__(
        self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got num_blocks={num_blocks}")
        shape = (config.num_hidden_layers, num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @classmethod
    def for_memory(
        cls, config: ModelConfig, memory_bytes: int, block_size: int, dtype: torch.dtype, device: torch.device
    ) -> KVCache:
        """As many blocks as fit in `memory_bytes`."""
        num_blocks = memory_bytes // bytes_per_block(config, block_size, dtype)
        if num_blocks < 1:
            need = bytes_per_block(config, block_size, dtype) / 2**20
            raise ValueError(f"KV cache memory {memory_bytes / 2**20:.1f} MiB holds no block; one block needs {need:.2f} MiB")
        return cls(config, int(num_blocks), block_size, dtype, device)

    @classmethod
    def for_free_device_memory(
        cls,
        config: ModelConfig,
        model: nn.Module,
        utilization: float,
        warmup_tokens: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> KVCache:
        """CUDA: run one forward pass of `warmup_tokens` tokens to measure the activations' peak, then take
        what is left of utilization x the device's memory (after weights, that peak, other processes and a
        reserve) for the pool."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        # As many tokens as a step may hold.
        with torch.inference_mode():
            hidden = model(*filler_prompts(warmup_tokens, config.max_position_embeddings, device))
            model.compute_logits(hidden[-256:])  # the sampled rows of a full decode batch
            del hidden
        torch.cuda.synchronize(device)
        activation_peak = torch.cuda.max_memory_allocated(device) - before
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        budget = int(total * utilization) - (total - free) - activation_peak - CUDA_RESERVE_BYTES
        if budget <= 0:
            raise ValueError(
                f"no device memory left for the KV cache: {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB, "
                f"activations need {activation_peak / 2**30:.2f} GiB; raise gpu_memory_utilization or free memory"
            )
        return cls.for_memory(config, budget, block_size, dtype, device)

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def bind(self, model: nn.Module | list[Attention]) -> None:
        """Point every attention layer of a model (or these layers, in layer order: the runner keeps the
        list) at its slice of the pool. Called before every step, since engines may take turns on one model;
        rebinding only when another pool was bound in between, which the first layer's key view tells (its
        data starts where this pool's does)."""
        layers = attention_layers(model) if isinstance(model, nn.Module) else model
        first = layers[0].k_cache if layers else None
        if first is not None and first.data_ptr() == self.k.data_ptr() and layers[0].v_cache.data_ptr() == self.v.data_ptr():
            return
        for i, layer in enumerate(layers):
            layer.k_cache, layer.v_cache = self.k[i], self.v[i]
