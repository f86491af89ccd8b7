"""Request and response bodies of the HTTP API (pydantic). Routes stay thin: they validate into these,
call the engine, and shape the answer."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from glassbox.sampling import SamplingParams


class SamplingFields(BaseModel):
    """Every sampler parameter, with vLLM's names. `temperature` 0 means greedy."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(50, ge=1)
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    prompt_logprobs: int | None = Field(None, ge=0, le=20)
    skip_special_tokens: bool = True

    def sampling_params(self, **overrides: Any) -> SamplingParams:
        fields = {name: getattr(self, name) for name in SamplingFields.model_fields}
        fields["stop"] = [fields["stop"]] if isinstance(fields["stop"], str) else list(fields["stop"] or [])
        fields["stop_token_ids"] = list(fields["stop_token_ids"] or [])
        fields.update(overrides)
        return SamplingParams(**fields)

    @model_validator(mode="after")
    def _min_tokens_not_above_max(self) -> SamplingFields:
        if self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must not exceed max_tokens")
        return self


# A sparse-attention mask for the request: {"method": "top_k", "k": 32}, or the design's
# {"mask_pattern": "top_k", "k": 32, "threshold": 0.1}; parsed by layers.sparsity.parse_sparsity.
SparsitySpec = dict[str, Any] | None


class GenerateRequest(SamplingFields):
    prompt: str | list[int] = Field(..., description="text, or token ids")
    stream: bool = False
    priority: int = 0
    sparsity: SparsitySpec = None

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt: str | list[int]) -> str | list[int]:
        if len(prompt) == 0:
            raise ValueError("must not be empty")
        return prompt


class BatchGenerateRequest(SamplingFields):
    prompts: list[str | list[int]] = Field(..., min_length=1, max_length=256)
    sparsity: SparsitySpec = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GenerateResponse(BaseModel):
    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: Usage
    timings: dict[str, float | None]
    logprobs: list[dict[str, Any]] | None = None
    prompt_logprobs: list[Any] | None = None
    cached_tokens: int = 0
    sparsity: dict[str, Any] | None = None  # the mask applied and its realised density


class BatchGenerateResponse(BaseModel):
    results: list[GenerateResponse]


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str
    add_special_tokens: bool = True
    with_pieces: bool = False


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    pieces: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tokens: list[int]
    skip_special_tokens: bool = True


class DetokenizeResponse(BaseModel):
    text: str


class HealthResponse(BaseModel):
    status: Literal["ok"]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    """One error shape for every failure (OpenAI's, as vLLM returns it)."""

    error: ErrorBody


# ---- OpenAI-compatible
class StreamOptions(BaseModel):
    include_usage: bool = False


class OpenAICommon(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, ...)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    # vLLM's extra sampling parameters
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    sparsity: SparsitySpec = None  # glassbox's own: a sparse-attention mask


class CompletionRequest(OpenAICommon):
    prompt: str | list[int] | list[str]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")


class ChatCompletionRequest(OpenAICommon):
    messages: list[ChatMessage] = Field(..., min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


# ---- research
class ProfilingStart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    activities: list[Literal["cpu", "cuda"]] | None = None
    record_shapes: bool = False
    with_stack: bool = False


class ScheduleItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str | list[int]
    priority: int = 0
    max_tokens: int = Field(32, ge=1, le=1024)


class BatchScheduleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    algorithm: str = "fcfs"
    requests: list[ScheduleItem] = Field(..., min_length=1, max_length=128)
    max_batch_size: int = Field(8, ge=1, le=256)
    strategy: Literal["minimize_latency", "maximize_throughput"] = "maximize_throughput"


class PolicyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    algorithm: str


class TensorSplitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weight: str | None = None
    tensor_shape: list[int] | None = None
    split_dim: int = 0
    num_splits: int = Field(2, ge=1, le=64)
    seed: int = 0


class ParallelExecuteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    splits: str  # the split_id from /parallel/tensor_split
    operation: Literal["matmul"] = "matmul"
    other_columns: int = Field(64, ge=1)  # the other operand: a seeded random [inner, other_columns] matrix
    seed: int = 0


class AttentionScoresRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    token_ids: list[int] | None = None
    layer_idx: int | None = None
    head_idx: int | None = None
    threshold: float = Field(0.01, gt=0, lt=1)
    format: Literal["json", "png"] = "json"
    sparsity: SparsitySpec = None  # show the attention as this mask leaves it

    @model_validator(mode="after")
    def _one_input(self) -> AttentionScoresRequest:
        if (self.prompt is None) == (self.token_ids is None):
            raise ValueError("give exactly one of prompt and token_ids")
        if self.format == "png" and (self.layer_idx is None or self.head_idx is None):
            raise ValueError("format png draws one head: give layer_idx and head_idx")
        return self


class PipelineStep(BaseModel):
    model_config = ConfigDict(extra="forbid")

    step: Literal["embed", "norm", "attention", "mlp", "layer", "final_norm", "lm_head"]
    layer_idx: int | None = None


class PipelineInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    input_ids: list[int] | None = None
    input: str | None = None  # a handle returned by an earlier step
    return_intermediate: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> PipelineInput:
        if sum(x is not None for x in (self.prompt, self.input_ids, self.input)) != 1:
            raise ValueError("give exactly one of prompt, input_ids and input (a handle)")
        return self


class StepExecuteRequest(PipelineInput, PipelineStep):
    pass


class PipelineScheduleRequest(PipelineInput):
    steps: list[PipelineStep] = Field(..., min_length=1, max_length=512)


class SparsityMaskRequest(BaseModel):
    """The body of POST /optimization/sparsity_mask: a sparsity spec, as the `sparsity` field of a request."""

    model_config = ConfigDict(extra="allow")


class EvaluateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[str | list[int]] = Field(..., min_length=1, max_length=16)
    sparsity: dict[str, Any]
    add_special_tokens: bool = True
