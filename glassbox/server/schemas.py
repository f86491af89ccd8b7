"""Request and response bodies of the HTTP API (pydantic). Routes stay thin: they validate into these,
call the engine, and shape the answer.

Every request body is strict (`Body`): no coercion (`[false]` is not token 0, `1.0` is not `n`), no NaN or
Infinity, unknown fields refused (OpenAI's bodies excepted: their clients send fields we do not use), and
every number bounded, so a field error is a 400 naming the field before anything runs. Ranges of the
sampler follow vLLM's SamplingParams (repetition_penalty kept finite: [0.01, 2]).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from glassbox.sampling import REPETITION_PENALTY, SamplingParams

INT32 = 2**31 - 1
MAX_TOKENS = 1 << 20  # beyond any context length; the engine checks the real one
SEED = {"ge": -(2**63), "le": 2**64 - 1}  # what torch.Generator.manual_seed takes
StopList = list[str]


class Body(BaseModel):
    """Base of every request body: strict types, finite numbers, no unknown fields."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class SamplingFields(Body):
    """Every sampler parameter, with vLLM's names. `temperature` 0 means greedy."""

    max_tokens: int = Field(50, ge=1, le=MAX_TOKENS)
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1, le=INT32, description="-1 or 0: off; else at most the vocabulary size")
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, ge=REPETITION_PENALTY[0], le=REPETITION_PENALTY[1])
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    seed: int | None = Field(None, **SEED)
    stop: str | StopList | None = Field(None, max_length=16)
    stop_token_ids: list[int] | None = Field(None, max_length=1024)
    include_stop_str_in_output: bool = False
    min_tokens: int = Field(0, ge=0, le=MAX_TOKENS)
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
# sliding_window and h2o evict what they drop from the request's KV cache after its prompt (engine/eviction.py).
SparsitySpec = dict[str, Any] | None


class GenerateRequest(SamplingFields):
    prompt: str | list[int] = Field(..., description="text, or token ids")
    stream: bool = False
    priority: int = Field(0, ge=-INT32, le=INT32)
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
    # The mask applied and its realised density; under eviction also evicted_tokens and kv_tokens_kept.
    sparsity: dict[str, Any] | None = None


class BatchGenerateResponse(BaseModel):
    results: list[GenerateResponse]


class TokenizeRequest(Body):
    text: str
    add_special_tokens: bool = True
    with_pieces: bool = False


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    pieces: list[str] | None = None


class DetokenizeRequest(Body):
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
class StreamOptions(Body):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    include_usage: bool = False


class OpenAICommon(Body):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)  # OpenAI clients send fields we do not use (user, ...)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | StopList | None = Field(None, max_length=16)
    seed: int | None = Field(None, **SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    # vLLM's extra sampling parameters
    top_k: int = Field(0, ge=-1, le=INT32)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, ge=REPETITION_PENALTY[0], le=REPETITION_PENALTY[1])
    min_tokens: int = Field(0, ge=0, le=MAX_TOKENS)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = Field(None, max_length=1024)
    sparsity: SparsitySpec = None  # glassbox's own: a sparse-attention mask


class CompletionRequest(OpenAICommon):
    prompt: str | list[int] | list[str] = Field(..., min_length=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class ChatMessage(Body):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")


class ChatCompletionRequest(OpenAICommon):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=1024)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


# ---- research
class ProfilingStart(Body):
    activities: list[Literal["cpu", "cuda"]] | None = Field(None, min_length=1, max_length=2)
    record_shapes: bool = False
    with_stack: bool = False


class ScheduleItem(Body):
    prompt: str | list[int] = Field(..., min_length=1)
    priority: int = Field(0, ge=-INT32, le=INT32)
    max_tokens: int = Field(32, ge=1, le=1024)


class BatchScheduleRequest(Body):
    algorithm: str = "fcfs"
    requests: list[ScheduleItem] = Field(..., min_length=1, max_length=1024, description="at most limits.schedule_max_requests")
    max_batch_size: int = Field(8, ge=1, le=256)
    strategy: Literal["minimize_latency", "maximize_throughput"] = "maximize_throughput"


class PolicyRequest(Body):
    algorithm: str


Dimension = Annotated[int, Field(ge=1, le=1 << 24)]


class TensorSplitRequest(Body):
    weight: str | None = None
    tensor_shape: list[Dimension] | None = Field(
        None, min_length=1, max_length=4, description="a seeded random tensor of this shape (at most limits.tensor_max_elements)"
    )
    split_dim: int = Field(0, ge=-4, le=3)
    num_splits: int = Field(2, ge=1, le=64)
    seed: int = Field(0, ge=0, le=2**63 - 1)


class ParallelExecuteRequest(Body):
    # The split_id from /parallel/tensor_split, or the list of its shard ids ("<split_id>#<index>", its
    # response's "splits"), as the design writes it: every shard of one split.
    splits: str | list[str] = Field(..., description="a split_id, or the shard ids of one split")
    operation: Literal["matmul"] = "matmul"
    other_columns: int = Field(64, ge=1, le=1 << 16)  # the other operand: a seeded random [inner, other_columns] matrix
    gather: bool = True  # gather the shards' results (and check them against the unsplit product)
    seed: int = Field(0, ge=0, le=2**63 - 1)


class AttentionScoresRequest(Body):
    prompt: str | None = Field(None, min_length=1)
    token_ids: list[int] | None = Field(None, min_length=1)
    layer_idx: int | None = Field(None, ge=0, le=INT32)
    head_idx: int | None = Field(None, ge=0, le=INT32)
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


class PipelineStep(Body):
    step: Literal["embed", "norm", "attention", "mlp", "layer", "final_norm", "lm_head"]
    layer_idx: int | None = Field(None, ge=0, le=INT32)


class PipelineInput(Body):
    prompt: str | None = Field(None, min_length=1)
    input_ids: list[int] | None = Field(None, min_length=1)
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
    # Under tensor parallelism: run the steps over micro-batches twice, serially and with one micro-batch's
    # all-reduces overlapping the next one's compute, and report both (research/overlap.py).
    overlap_comm: bool = False
    micro_batches: int = Field(2, ge=2, le=8)


class SparsityMaskRequest(BaseModel):
    """The body of POST /optimization/sparsity_mask: a sparsity spec, as the `sparsity` field of a request
    (its parameters depend on the method: checked by layers.sparsity.parse_sparsity, naming the field)."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class EvaluateSpeed(Body):
    """/optimization/evaluate's speed-and-memory part: the texts' tokens (cycled) as one prompt of
    `context_tokens`, then `decode_steps` tokens, dense and under the method (research/decode_speed.py)."""

    context_tokens: int = Field(4096, ge=2)
    decode_steps: int = Field(16, ge=1)


class EvaluateRequest(Body):
    texts: list[str | list[int]] = Field(..., min_length=1, max_length=16)
    sparsity: dict[str, Any]
    add_special_tokens: bool = True
    speed: EvaluateSpeed | None = None
