"""Family name (ModelConfig.architecture) -> model class."""

from torch import nn

from glassbox.config import ModelConfig
from glassbox.models.gpt2 import GPT2LMHeadModel
from glassbox.models.llama import LlamaForCausalLM

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,  # q/k/v bias: config.attention_bias
    "qwen3": LlamaForCausalLM,  # q/k RMSNorm: config.qk_norm
    "gpt2": GPT2LMHeadModel,
}


def build_model(config: ModelConfig) -> nn.Module:
    return MODEL_CLASSES[config.architecture](config)
