"""GPT-2: learned positions, LayerNorm, fused qkv, GELU MLP. Parameter names and shapes are Hugging Face's
(`Conv1D` stores its weight as [in, out]); how checkpoints are named and read is the class's
`checkpoint_format` (models/gpt2_checkpoint.py). Its parts are Llama's (models/llama.py): `embed`, `layers`,
`final_norm`, `compute_logits`; per block `attention_residual` and `mlp_residual`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from glassbox.config import ModelConfig
from glassbox.errors import UnsupportedModelError
from glassbox.layers.attention import Attention, AttentionMetadata
from glassbox.models.checkpoint_format import CheckpointFormat, PackedModulesMapping
from glassbox.models.gpt2_checkpoint import GPT2

ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


class Conv1D(nn.Module):
    """A linear layer whose weight is stored transposed ([in, out]), as in the original GPT-2 checkpoints."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x, self.weight)


class GPT2Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.c_attn = Conv1D(config.hidden_size, 3 * config.hidden_size)
        self.c_proj = Conv1D(config.hidden_size, config.hidden_size)
        self.attn = Attention(self.num_heads, self.num_heads, self.head_dim, layer_idx)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.c_attn(x).view(num_tokens, 3, self.num_heads, self.head_dim).unbind(1)
        out = self.attn(q, k, v, meta)
        return self.c_proj(out.reshape(num_tokens, -1))


class GPT2MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = Conv1D(config.hidden_size, config.intermediate_size)
        self.c_proj = Conv1D(config.intermediate_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = GPT2MLP(config)

    @property
    def input_norm(self) -> nn.LayerNorm:
        return self.ln_1

    @property
    def post_norm(self) -> nn.LayerNorm:
        return self.ln_2

    @property
    def attention(self) -> GPT2Attention:
        return self.attn

    def attention_residual(
        self, x: torch.Tensor, layer_args: tuple[torch.Tensor, ...], meta: AttentionMetadata
    ) -> torch.Tensor:
        """x [T, hidden] + attention(input_norm(x)); layer_args is () (positions are added in embed)."""
        return x + self.attn(self.ln_1(x), *layer_args, meta)

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] + mlp(post_norm(x))."""
        return x + self.mlp(self.ln_2(x))

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # Written out in one frame, as LlamaDecoderLayer.forward (why there).
        x = x + self.attn(self.ln_1(x), meta)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    """The decoder stack's modules under their checkpoint names (transformer.wte, .wpe, .h.N, .ln_f);
    GPT2LMHeadModel runs them."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # _weight skips the random init (slow on the meta device, and the loader overwrites it anyway).
        self.wte = nn.Embedding(
            config.vocab_size, config.hidden_size, _weight=torch.empty(config.vocab_size, config.hidden_size)
        )
        self.wpe = nn.Embedding(
            config.max_position_embeddings,
            config.hidden_size,
            _weight=torch.empty(config.max_position_embeddings, config.hidden_size),
        )
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


class GPT2LMHeadModel(nn.Module):
    checkpoint_format: ClassVar[CheckpointFormat] = GPT2
    packed_modules_mapping: ClassVar[PackedModulesMapping] = GPT2.packed_modules_mapping

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.hidden_act not in ACTIVATIONS:
            raise UnsupportedModelError(f"unsupported GPT-2 activation_function {config.hidden_act!r}")
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    @property
    def layers(self) -> nn.ModuleList:
        return self.transformer.h

    @property
    def final_norm(self) -> nn.LayerNorm:
        return self.transformer.ln_f

    @property
    def embedding(self) -> nn.Embedding:
        return self.transformer.wte

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, tuple[()]]:
        """input_ids, positions [T] -> hidden [T, hidden] (token + position embeddings) and the layers'
        extra inputs: none."""
        return self.transformer.wte(input_ids) + self.transformer.wpe(positions), ()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T] (flattened batch) -> final hidden states [T, hidden]."""
        x, layer_args = self.embed(input_ids, positions)
        for layer in self.layers:
            x = layer(x, *layer_args, meta)
        return self.final_norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab]."""
        return self.lm_head(hidden)
