"""SamplingParams (vLLM's names and meanings) and the batched sampler.

The sampler turns the logits of the rows being sampled ([N, vocab], one per sequence) into one token each:
penalties -> temperature -> top_k / top_p / min_p -> draw. A request with a seed owns a torch.Generator,
so its draws do not depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_GREEDY_EPS = 1e-5


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
    # vLLM's RequestOutputKind: "cumulative" reports the request at every step (streaming); "final_only"
    # only when it finishes, and detokenizes once at the end unless stop strings need the text earlier.
    output_kind: str = "cumulative"

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (self.n >= 1, "n", "must be at least 1"),
            (self.temperature >= 0, "temperature", "must be >= 0"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (self.top_k >= -1, "top_k", "must be -1, 0 (off) or a positive number"),
            (0 <= self.min_p <= 1, "min_p", "must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty", "must be > 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]"),
            (self.max_tokens >= 1, "max_tokens", "must be at least 1"),
            (0 <= self.min_tokens <= self.max_tokens, "min_tokens", "must be in [0, max_tokens]"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", "must be in [0, 20]"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "prompt_logprobs", "must be in [0, 20]"),
            (all(s for s in self.stop), "stop", "must not contain empty strings"),
            (self.output_kind in ("cumulative", "final_only"), "output_kind", "must be cumulative or final_only"),
        ]
        for ok, name, reason in checks:
            if not ok:
                raise ValueError(f"{name} {reason}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def plain_greedy(self) -> bool:
        """An argmax of the model's logits, with nothing to report but the token (min_tokens aside)."""
        return self.greedy and not self.needs_penalties and self.logprobs is None


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
        seen = torch.tensor(sorted(set(req.prompt_token_ids) | set(req.output_token_ids)), dtype=torch.long)
        seen = seen[seen < vocab]
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if req.output_token_ids and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(req.output_token_ids, dtype=torch.long), minlength=vocab)[:vocab]
        logits -= params.frequency_penalty * counts.to(logits.dtype)
        logits -= params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top_k / top_p / min_p as -inf masks. logits: [vocab] float32."""
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already cover top_p; the first token always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= params.top_p
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), float("-inf"))
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def plain_greedy(request: SampleRequest) -> bool:
    """An argmax of the model's logits and nothing else: decided where the logits are, nothing to report."""
    return request.params.plain_greedy and not request.banned_token_ids


def sample(logits: torch.Tensor, requests: list[SampleRequest], default_generator: torch.Generator) -> SampleResult:
    """logits [N, vocab] of the N sequences that sample this step -> one token each (+ logprobs if asked).
    On a GPU, a batch of plain greedy rows is decided there (N ids cross to the host, not N x vocab
    logits); anything else is sampled on the CPU."""
    plain = [not r.params.needs_penalties and not r.banned_token_ids for r in requests]
    all_plain_greedy = all(plain) and all(r.params.greedy for r in requests)
    wants_logprobs = any(r.params.logprobs is not None for r in requests)
    if all(plain_greedy(r) for r in requests):
        return SampleResult(logits.argmax(dim=-1).tolist(), [None] * len(requests))
    logits = logits.float().cpu()
    raw_logprobs = None
    if wants_logprobs:
        raw_logprobs = torch.log_softmax(logits, dim=-1)  # as vLLM: of the model's distribution

    if all_plain_greedy:  # one argmax over the batch
        token_ids = logits.argmax(dim=-1).tolist()
    else:
        token_ids = []
        for row, req in zip(logits, requests):
            row = row.clone()
            if req.params.needs_penalties:
                row = apply_penalties(row, req)
            if req.banned_token_ids:
                row[torch.tensor(req.banned_token_ids, dtype=torch.long)] = float("-inf")
            if req.params.greedy:
                token_ids.append(int(row.argmax()))
                continue
            probs = filter_logits(row, req.params).softmax(-1)
            generator = req.generator or default_generator
            token_ids.append(int(torch.multinomial(probs, 1, generator=generator)))

    logprobs: list[tuple[float, list[tuple[int, float]]] | None] = []
    for i, req in enumerate(requests):
        if req.params.logprobs is None or raw_logprobs is None:
            logprobs.append(None)
            continue
        top = []
        if req.params.logprobs > 0:
            values, ids = torch.topk(raw_logprobs[i], req.params.logprobs)
            top = list(zip(ids.tolist(), values.tolist()))
        logprobs.append((float(raw_logprobs[i, token_ids[i]]), top))
    return SampleResult(token_ids, logprobs)
