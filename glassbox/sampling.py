"""SamplingParams (vLLM's names and meanings) and the batched sampler.

The sampler turns the logits of the rows being sampled ([N, vocab], one per sequence) into one token each:
penalties -> temperature -> top_k / top_p / min_p -> draw, batched on the logits' device. A request with a
seed owns a torch.Generator (on that device), so its draws do not depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import math

import torch

from glassbox.errors import FieldError
from glassbox.kernels import cpu_native

_GREEDY_EPS = 1e-5
OUTPUT_KINDS = ("cumulative", "delta", "final_only")
# vLLM takes (0, 2]; the floor keeps logits finite (a penalty of 1e-300 turns them into inf).
REPETITION_PENALTY = (0.01, 2.0)
TOP_P_PREFIX = 1024  # top_p on the CPU first looks for its tokens among this many (see filter_logits)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # in (0, 1]
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and the output
    presence_penalty: float = 0.0  # subtracted once from tokens already in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    max_tokens: int = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # log-probability of each sampled token plus this many top alternatives
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # vLLM's RequestOutputKind: "cumulative" reports the request at every step with everything so far;
    # "delta" at every step with what the step added (streaming: a step's cost does not grow with the
    # output), the whole result once finished; "final_only" only when it finishes, and detokenizes once at
    # the end unless stop strings need the text earlier.
    output_kind: str = "cumulative"

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (self.n >= 1, "n", "must be at least 1"),
            (math.isfinite(self.temperature) and self.temperature >= 0, "temperature", "must be a finite number >= 0"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (self.top_k >= -1, "top_k", "must be -1, 0 (off) or a positive number"),
            (0 <= self.min_p <= 1, "min_p", "must be in [0, 1]"),
            (REPETITION_PENALTY[0] <= self.repetition_penalty <= REPETITION_PENALTY[1], "repetition_penalty", f"must be in [{REPETITION_PENALTY[0]}, {REPETITION_PENALTY[1]}]"),
            (self.seed is None or -(2**63) <= self.seed < 2**64, "seed", "must fit in 64 bits"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]"),
            (self.max_tokens >= 1, "max_tokens", "must be at least 1"),
            (0 <= self.min_tokens <= self.max_tokens, "min_tokens", "must be in [0, max_tokens]"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", "must be in [0, 20]"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "prompt_logprobs", "must be in [0, 20]"),
            (all(s for s in self.stop), "stop", "must not contain empty strings"),
            (self.output_kind in OUTPUT_KINDS, "output_kind", f"must be one of {', '.join(OUTPUT_KINDS)}"),
        ]
        for ok, name, reason in checks:
            if not ok:
                raise FieldError(name, f"{reason}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def device_only(self) -> bool:
        """Its tokens can be drawn where the logits are with nothing from the host: no logprobs to report,
        no penalties (they read the output so far). min_tokens aside."""
        return not self.needs_penalties and self.logprobs is None


@dataclass
class SampleRequest:
    """One row of the batch to sample: its parameters, history and (if seeded) its generator."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None
    # Token ids that must not be sampled yet (EOS/stop tokens while min_tokens is not reached).
    banned_token_ids: list[int] = field(default_factory=list)


@dataclass
class SampleResult:
    token_ids: list[int]
    # Per row, if logprobs were asked: (logprob of the sampled token, [(token_id, logprob)] top alternatives)
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]


def apply_penalties(logits: torch.Tensor, req: SampleRequest) -> torch.Tensor:
    """logits [vocab] (float32) with repetition / presence / frequency penalties applied (vLLM's rules)."""
    params = req.params
    vocab = logits.shape[-1]
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(
            sorted(set(req.prompt_token_ids) | set(req.output_token_ids)), dtype=torch.long, device=logits.device
        )
        seen = seen[seen < vocab]
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if req.output_token_ids and (params.presence_penalty or params.frequency_penalty):
        output_ids = torch.tensor(req.output_token_ids, dtype=torch.long, device=logits.device)
        counts = torch.bincount(output_ids, minlength=vocab)[:vocab]
        logits -= params.frequency_penalty * counts.to(logits.dtype)
        logits -= params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def host_values(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A short host list as a tensor on `device` without waiting for the device. On CUDA a plain
    torch.tensor(values, device=...) waits for every queued kernel first, which would stall a step that
    was launched ahead of the host (the engine's async scheduling)."""
    tensor = torch.tensor(values, dtype=dtype)
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor


def filter_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top_k / top_p / min_p as -inf masks, each row with its own parameters, batched.
    logits: [N, vocab] float32 (a greedy row passes through unscaled: its argmax is taken elsewhere)."""
    device = logits.device
    vocab = logits.shape[-1]
    # x (1 / temperature), as `draw` scales a temperature-only batch: a row's numbers do not depend on
    # whether a neighbour's top_k / top_p / min_p sent the batch through here.
    scale = host_values([1.0 if p.greedy else 1.0 / p.temperature for p in params], torch.float32, device)
    logits = logits * scale[:, None]
    limited = [0 < p.top_k < vocab for p in params]
    if any(limited):
        k_max = max(p.top_k for p, on in zip(params, limited) if on)
        values = torch.topk(logits, k_max, dim=-1).values  # [N, k_max], descending
        # The k-th largest value of each row; -inf (keeps all) for rows without top_k.
        index = host_values([p.top_k - 1 if on else 0 for p, on in zip(params, limited)], torch.int64, device)
        kth = values.gather(1, index[:, None])
        kth = kth.masked_fill(~host_values(limited, torch.bool, device)[:, None], float("-inf"))
        logits = logits.masked_fill(logits < kth, float("-inf"))  # ties with the k-th value stay
    if any(p.top_p < 1.0 for p in params):
        top_p = host_values([p.top_p for p in params], torch.float32, device)[:, None]
        probs = logits.softmax(-1)
        # On the CPU, where sorting the whole vocabulary costs more than the forward pass at batch 32, look
        # among the top TOP_P_PREFIX tokens first: when they hold a row's top_p mass, every later token is
        # dropped anyway. On a GPU the sort is cheap and needs no host check.
        prefix = min(vocab, TOP_P_PREFIX)
        sorted_probs = None
        if device.type == "cpu" and prefix < vocab:
            sorted_probs = torch.topk(probs, prefix, dim=-1).values
            cumulative = sorted_probs.cumsum(-1)
            if not bool(((cumulative[:, -1:] >= top_p) | (top_p >= 1.0)).all()):
                sorted_probs = None
        if sorted_probs is None:
            sorted_probs = torch.sort(probs, dim=-1, descending=True).values
            if sorted_probs.is_cuda and sorted_probs.shape[0] == 1:
                # CUDA scans a lone row with another kernel (a 1-D scan) than rows of a batch, and it rounds
                # differently: scanned beside a copy of itself, a row's sums do not depend on the batch.
                cumulative = sorted_probs.expand(2, -1).cumsum(-1)[:1]
            else:
                cumulative = sorted_probs.cumsum(-1)
        # Keep a token while the tokens before it cover less than top_p (the first always stays), then keep
        # every token as likely as the last one kept: ties stay together, so the kept set does not depend on
        # how a sort orders equal values (nor on whether the prefix or the whole vocabulary was sorted).
        num_kept = (cumulative - sorted_probs < top_p).sum(-1, keepdim=True)
        threshold = sorted_probs.gather(1, num_kept - 1).masked_fill(top_p >= 1.0, 0.0)
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    if any(p.min_p > 0.0 for p in params):
        probs = logits.softmax(-1)
        min_p = host_values([p.min_p for p in params], torch.float32, device)[:, None]
        logits = logits.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    return logits


def draw(
    logits: torch.Tensor, scale: torch.Tensor | None, requests: list[SampleRequest], default_generator: torch.Generator
) -> torch.Tensor:
    """One token per row of softmax(logits [N, vocab] x scale [N] (1 / temperature; None = 1)) by inverse
    CDF: the first token whose cumulative probability exceeds u x total, with u ~ U[0, 1) — one random
    number per row (not per vocabulary entry), and no host round trip. A seeded request draws its row's u
    from its own generator, so its tokens do not depend on the rest of the batch; the others' come from the
    default. On CUDA a Triton kernel draws straight from the logits (kernels/sampling_triton.py)."""
    u = torch.rand(logits.shape[0], device=logits.device, generator=default_generator)
    for i, r in enumerate(requests):
        if r.generator is not None:
            u[i] = torch.rand(1, device=logits.device, generator=r.generator)
    if logits.is_cuda:
        from glassbox.kernels import sampling_triton  # Triton is GPU-only here

        return sampling_triton.draw(logits, torch.ones_like(u) if scale is None else scale, u)
    logits = logits.float() if scale is None else logits.float() * scale[:, None]
    probs = logits.softmax(-1)
    cdf = probs.cumsum(-1)
    # u < 1, so the target is below the last entry, and cdf steps up at tokens of positive probability, so
    # the first entry above the target (right=True) is one of them. A scan that rounds differently between
    # neighbours could put a 1-ulp step at a filtered-out token: the row's argmax then stands in for it.
    # (A row with no finite logit has no cdf to search: clamped to a valid index, as the GPU kernel returns one.)
    drawn = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).clamp(max=cdf.shape[-1] - 1)
    return torch.where(probs.gather(1, drawn) > 0, drawn, probs.argmax(-1, keepdim=True)).squeeze(1)


def device_only(request: SampleRequest) -> bool:
    """`sample_tokens` alone decides the row, and the host has nothing to apply or report."""
    return request.params.device_only and not request.banned_token_ids


def greedy_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits [N, vocab] -> argmax per row [N] int64 (the native kernel for CPU float32: ~10x torch's)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and cpu_native.available():
        return cpu_native.argmax(logits)
    return logits.argmax(dim=-1)


def sample_tokens(
    logits: torch.Tensor, requests: list[SampleRequest], default_generator: torch.Generator
) -> torch.Tensor:
    """logits [N, vocab] of the N sequences that sample this step -> their tokens [N] (int64, on the
    logits' device). Batched, and without waiting for the device unless a row has penalties or banned
    tokens (applied row by row, as only those rows pay for them; such rows never run ahead anyway)."""
    greedy = [r.params.greedy for r in requests]
    adjusted = [i for i, r in enumerate(requests) if r.params.needs_penalties or r.banned_token_ids]
    if all(greedy) and not adjusted:
        return greedy_rows(logits)
    if adjusted:
        logits = logits.to(torch.float32, copy=True)
        for i in adjusted:
            req = requests[i]
            if req.params.needs_penalties:
                logits[i] = apply_penalties(logits[i], req)
            if req.banned_token_ids:
                logits[i, torch.tensor(req.banned_token_ids, device=logits.device)] = float("-inf")
    if all(greedy):
        return greedy_rows(logits)
    params = [r.params for r in requests]
    if any(0 < p.top_k < logits.shape[-1] or p.top_p < 1.0 or p.min_p > 0.0 for p in params):
        drawn = draw(filter_logits(logits.float(), params), None, requests, default_generator)
    else:  # temperature alone: the draw applies it (on CUDA without a float32 copy of the logits)
        scale = host_values([1.0 if p.greedy else 1.0 / p.temperature for p in params], torch.float32, logits.device)
        drawn = draw(logits, scale, requests, default_generator)
    if not any(greedy):
        return drawn
    return torch.where(host_values(greedy, torch.bool, logits.device), greedy_rows(logits), drawn)


def sample(logits: torch.Tensor, requests: list[SampleRequest], default_generator: torch.Generator) -> SampleResult:
    """`sample_tokens`, brought to the host, with the logprobs the requests ask for (of the model's own
    distribution, before penalties and filters, as vLLM reports them)."""
    token_ids = sample_tokens(logits, requests, default_generator).tolist()
    logprobs: list[tuple[float, list[tuple[int, float]]] | None] = [None] * len(requests)
    wanted = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
    if wanted:
        raw_logprobs = torch.log_softmax(logits[wanted].float(), dim=-1).cpu()
        for row, i in zip(raw_logprobs, wanted):
            top = []
            if requests[i].params.logprobs > 0:
                values, ids = torch.topk(row, requests[i].params.logprobs)
                top = list(zip(ids.tolist(), values.tolist()))
            logprobs[i] = (float(row[token_ids[i]]), top)
    return SampleResult(token_ids, logprobs)
