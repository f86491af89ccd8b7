"""The paged KV cache: one preallocated pool of fixed-size blocks per device, shared by all sequences.

k and v: [num_layers, num_blocks, block_size, num_kv_heads, head_dim]. Layer i's attention module gets
views k[i], v[i]; a sequence's block table lists which blocks hold its tokens, in order.
"""

from __future__ import annotations

import torch
from torch import nn

from glassbox.config import ModelConfig
from glassbox.layers.attention import attention_layers


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

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def bind(self, model: nn.Module) -> None:
        """Point every attention layer of `model` at its slice of the pool."""
        for i, layer in enumerate(attention_layers(model)):
            layer.k_cache, layer.v_cache = self.k[i], self.v[i]
