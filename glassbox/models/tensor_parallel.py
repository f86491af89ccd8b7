"""Shard a loaded Llama-family model (Llama, Mistral, SmolLM2, Qwen2, Qwen3) for one tensor-parallel rank, in
place and from outside the model file (gpt-fast's tp.py does the same to its plain model).

Attention is split by KV heads: rank r keeps the KV heads `shard_range(num_kv_heads, r, N)` and the query
heads that read them, so grouped-query attention stays local to a rank and the KV cache is split the same
way. The KV heads need not divide evenly (the default model has 3 over 2 ranks: 2 and 1); each rank's
slice of the stacked q/k/v rows is [its q rows; its k rows; its v rows]. The MLP is split by intermediate
features, the embedding and the head by vocabulary rows (layers/parallel.py).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from glassbox.config import ModelConfig
from glassbox.errors import UnsupportedModelError
from glassbox.layers.parallel import AllReduceOutput, Communicator, GatherLogits, VocabParallelEmbedding, shard_range, vocab_rows
from glassbox.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP


def check_shardable(config: ModelConfig, world_size: int) -> None:
    """Raise UnsupportedModelError, saying what to change, if the model cannot be split over `world_size`
    ranks."""
    if config.architecture not in ("llama", "qwen2", "qwen3"):
        raise UnsupportedModelError(
            f"tensor parallelism runs Llama-family models (llama, mistral, qwen2, qwen3), not {config.architecture}; "
            "use tensor_parallel_size=1"
        )
    if world_size > config.num_key_value_heads:
        raise UnsupportedModelError(
            f"tensor_parallel_size={world_size} is more than the model's {config.num_key_value_heads} KV heads "
            "(attention is split by KV heads); use at most that many ranks"
        )


def rank_config(config: ModelConfig, rank: int, world_size: int) -> ModelConfig:
    """The config of this rank's share of attention (its query and KV heads): what its KV cache holds."""
    kv_start, kv_end = shard_range(config.num_key_value_heads, rank, world_size)
    group = config.num_attention_heads // config.num_key_value_heads
    return dataclasses.replace(
        config, num_key_value_heads=kv_end - kv_start, num_attention_heads=(kv_end - kv_start) * group
    )


@torch.no_grad()
def shard_model(model: nn.Module, comm: Communicator) -> ModelConfig:
    """Keep this rank's slices of `model`'s weights (the rest is freed); returns the rank's config
    (`rank_config`). The linears stay plain `nn.Linear` (the engine may quantize them next); call
    `attach_collectives` once it has."""
    if not isinstance(model, LlamaForCausalLM):
        raise UnsupportedModelError(f"tensor parallelism runs Llama-family models, not {type(model).__name__}")
    config: ModelConfig = model.config
    check_shardable(config, comm.world_size)
    for layer in model.layers:
        _shard_attention(layer.self_attn, config, comm)
        _shard_mlp(layer.mlp, config, comm)
    embedding = VocabParallelEmbedding(model.model.embed_tokens.weight, comm)
    model.model.embed_tokens = embedding
    head = embedding.weight if config.tie_word_embeddings else nn.Parameter(vocab_rows(model.lm_head.weight, comm), requires_grad=False)
    model.lm_head = _linear(head, None)
    return rank_config(config, comm.rank, comm.world_size)


def attach_collectives(model: nn.Module, comm: Communicator) -> None:
    """The all-reduce after each o_proj and down_proj, the logits' gather after the head: forward hooks on
    whatever modules the engine left there (float or block-quantized linears)."""
    for layer in model.layers:
        layer.self_attn.o_proj.register_forward_hook(AllReduceOutput(comm))
        layer.mlp.down_proj.register_forward_hook(AllReduceOutput(comm))
    model.lm_head.register_forward_hook(GatherLogits(comm, model.config.vocab_size))


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding these tensors (no copy; built on the meta device, so nothing is initialized)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


def _shard_attention(attn: LlamaAttention, config: ModelConfig, comm: Communicator) -> None:
    head_dim = config.head_dim
    group = config.num_attention_heads // config.num_key_value_heads
    kv_start, kv_end = shard_range(config.num_key_value_heads, comm.rank, comm.world_size)
    q_rows = slice(kv_start * group * head_dim, kv_end * group * head_dim)
    kv_rows = slice(kv_start * head_dim, kv_end * head_dim)
    q_size, kv_size = attn.q_size, attn.kv_size  # the whole model's
    k_offset, v_offset = q_size, q_size + kv_size

    def rows(tensor: torch.Tensor) -> torch.Tensor:
        """This rank's q, k and v rows of a stacked [q_size + 2 * kv_size, ...] tensor, stacked again."""
        return torch.cat([
            tensor[q_rows],
            tensor[k_offset + kv_rows.start : k_offset + kv_rows.stop],
            tensor[v_offset + kv_rows.start : v_offset + kv_rows.stop],
        ])  # fmt: skip

    qkv = attn.qkv_proj
    attn.qkv_proj = _linear(rows(qkv.weight), None if qkv.bias is None else rows(qkv.bias))
    o = attn.o_proj
    # Row-parallel: this rank's input columns; the bias on rank 0 only, so that the all-reduce adds it once.
    attn.o_proj = _linear(o.weight[:, q_rows].contiguous(), o.bias if comm.rank == 0 else None)
    # The module's head counts become this rank's: its forward splits and views the local q/k/v with them.
    attn.num_heads = attn.attn.num_heads = (kv_end - kv_start) * group
    attn.num_kv_heads = attn.attn.num_kv_heads = kv_end - kv_start
    attn.q_size = attn.num_heads * head_dim
    attn.kv_size = attn.num_kv_heads * head_dim


def _shard_mlp(mlp: LlamaMLP, config: ModelConfig, comm: Communicator) -> None:
    size = config.intermediate_size
    start, end = shard_range(size, comm.rank, comm.world_size)
    gate_up = mlp.gate_up_proj.weight
    mlp.gate_up_proj = _linear(torch.cat([gate_up[start:end], gate_up[size + start : size + end]]), None)
    mlp.down_proj = _linear(mlp.down_proj.weight[:, start:end].contiguous(), None)


def unshard(name: str, parts: list[torch.Tensor], config: ModelConfig) -> torch.Tensor:
    """The whole model's tensor `name` from every rank's piece of it (in rank order): the inverse of
    `shard_model`, for research tools that read a weight by name under tensor parallelism."""
    world_size = len(parts)
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return torch.cat(parts)[: config.vocab_size]
    if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
        return torch.cat(parts, dim=1)
    if name.endswith(("self_attn.qkv_proj.weight", "self_attn.qkv_proj.bias")):
        group = config.num_attention_heads // config.num_key_value_heads
        pieces: list[list[torch.Tensor]] = [[], [], []]  # q, k, v of every rank
        for rank, part in enumerate(parts):
            kv_start, kv_end = shard_range(config.num_key_value_heads, rank, world_size)
            kv_rows = (kv_end - kv_start) * config.head_dim
            for piece, tensor in zip(pieces, part.split([kv_rows * group, kv_rows, kv_rows])):
                piece.append(tensor)
        return torch.cat([torch.cat(piece) for piece in pieces])
    if name.endswith("mlp.gate_up_proj.weight"):
        halves = [part.chunk(2) for part in parts]
        return torch.cat([torch.cat([gate for gate, _ in halves]), torch.cat([up for _, up in halves])])
    return parts[0]  # norms, biases after a row-parallel sum, rotary tables: the same on every rank
