"""From sampled tokens to what a caller sees: incremental detokenization, stop strings, logprobs and the
`RequestOutput` of each step (vLLM v1's output processor, in the engine's process).

Per step and request the work does not grow with the output's length: the detokenizer decodes a short
window of ids (vLLM's prefix/read offsets), stop strings are searched in the new text's tail, and a
streamed ("delta") output carries only what the step added. `counters` count that work (ids decoded,
items put into outputs) so tests can check it without timing it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from glassbox.engine.sequence import Sequence
from glassbox.sampling import SamplingParams
from glassbox.tokenizer import Tokenizer

# One output token's logprobs: the sampled token's and the top alternatives, as {token_id: logprob}.
TokenLogprobs = dict[str, Any]
# (token id, logprob, [(alternative id, logprob)]) for one prompt position
PromptLogprob = tuple[int, float, list[tuple[int, float]]]


@dataclass(frozen=True)
class RequestError:
    """Why the engine ended a request before its end: whose fault it is — "internal" (ours: the server
    answers 500), "plugin" (an algorithm of the --plugin file that the request used: 422), "shutdown" (the
    server stopped before the request finished: 503) — and a message that says what happened."""

    fault: str
    message: str
    param: str | None = None  # the request field that chose the failing algorithm, if one did


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    # The whole generated text and tokens so far (stop string removed); in a "delta" output that has not
    # finished, only what this step added (and `logprobs` likewise).
    text: str
    token_ids: list[int]
    new_text: str  # what this step added to `text`
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error"
    logprobs: list[TokenLogprobs] | None
    prompt_logprobs: list[PromptLogprob | None] | None
    num_cached_tokens: int
    timings: dict[str, float | None]  # filled in the finished output (empty before)
    sparsity: dict[str, Any] | None = None  # the mask applied and its realised density
    error: RequestError | None = None  # set (with finish_reason "error") when the engine failed the request


@dataclass(eq=False)
class RequestState:
    """Engine-side state of a request beyond the scheduler's Sequence: sampling and detokenization."""

    seq: Sequence
    params: SamplingParams
    generator: torch.Generator | None
    text: str = ""
    emitted_text_len: int = 0
    # Incremental detokenization (vLLM's): `decoded` is the text of output tokens [0, read_offset), stable;
    # each step decodes only the window from prefix_offset on, so a step costs the same at any length.
    decoded: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    emitted_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[PromptLogprob | None] = field(default_factory=list)
    error: RequestError | None = None


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        # Work done, summed over requests: token ids handed to the tokenizer's decode, and list items and
        # characters put into outputs. Per step they stay flat whatever the outputs' lengths (streamed).
        self.counters = {"decoded_ids": 0, "output_items": 0}

    def record_prompt_logprobs(self, state: RequestState, start: int, entries: list[PromptLogprob]) -> None:
        """Prompt logprobs of the positions a chunk starting at `start` predicted."""
        if not state.prompt_logprobs:
            state.prompt_logprobs.append(None)  # the first prompt token has no context
        # After a preemption the prompt is recomputed: keep only positions not recorded yet.
        have = len(state.prompt_logprobs)
        for offset, entry in enumerate(entries):
            if start + 1 + offset >= have:
                state.prompt_logprobs.append(entry)

    def process_token(
        self, state: RequestState, token: int, logprob: tuple[float, list[tuple[int, float]]] | None, now: float
    ) -> bool:
        """Account for a token the scheduler just appended: timing, logprob, text. True if a stop string
        ended the request (the engine then finishes it)."""
        seq, params = state.seq, state.params
        if seq.timings.first_token is None:
            seq.timings.first_token = now
        seq.timings.token_times.append(now)
        if logprob is not None:
            state.logprobs.append({"token_id": token, "logprob": logprob[0], "top_logprobs": dict(logprob[1])})
        incremental = params.output_kind != "final_only" or bool(params.stop)
        if incremental:
            self._detokenize(state)
        stopped = False
        if params.stop and seq.num_output_tokens >= params.min_tokens and seq.finish_reason != "stop":
            stopped = self._truncate_at_stop(state)
        if seq.is_finished and not incremental:  # final_only: one decode of the whole output
            ids = seq.token_ids[seq.num_prompt_tokens :]
            self.counters["decoded_ids"] += len(ids)
            state.text = self.tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens)
        return stopped

    def _detokenize(self, state: RequestState) -> None:
        """Extend state.text by the new token's text. The window's text is the full text's tail only when
        decoded with the tokens before it (spaces, merged bytes); an incomplete UTF-8 character (U+FFFD)
        stays pending until the bytes that complete it arrive."""
        seq = state.seq
        first = seq.num_prompt_tokens + state.prefix_offset  # the window, in seq.token_ids
        read = seq.num_prompt_tokens + state.read_offset
        skip = state.params.skip_special_tokens
        before = self.tokenizer.decode(seq.token_ids[first:read], skip_special_tokens=skip)
        window = self.tokenizer.decode(seq.token_ids[first:], skip_special_tokens=skip)
        self.counters["decoded_ids"] += (read - first) + (seq.num_tokens - first)
        new = window[len(before) :]
        if window.endswith("\ufffd"):
            state.text = state.decoded + new
            return
        state.decoded += new
        state.text = state.decoded
        state.prefix_offset, state.read_offset = state.read_offset, seq.num_output_tokens

    def _truncate_at_stop(self, state: RequestState) -> bool:
        """If a stop string appeared, cut the text there (keeping it if asked) and say so."""
        params = state.params
        window_start = max(0, state.emitted_text_len - max(len(s) for s in params.stop))
        hits = [(state.text.find(s, window_start), s) for s in params.stop]
        hits = [(index, s) for index, s in hits if index >= 0]
        if not hits:
            return False
        index, stop = min(hits)
        state.text = state.text[: index + len(stop) if params.include_stop_str_in_output else index]
        return True

    def output(self, state: RequestState) -> RequestOutput:
        """The request's output for this step: cumulative (the text and ids so far), delta (what the step
        added, the whole result once finished) or final_only (the whole result)."""
        seq, params = state.seq, state.params
        text = state.text
        # Hold back an incomplete UTF-8 character (decoded as U+FFFD) until its next byte arrives.
        visible = len(text) if seq.is_finished or not text.endswith("\ufffd") else len(text.rstrip("\ufffd"))
        new_text = text[state.emitted_text_len : visible] if visible > state.emitted_text_len else ""
        state.emitted_text_len = max(state.emitted_text_len, visible)
        emitted, state.emitted_tokens = state.emitted_tokens, seq.num_output_tokens
        new_ids = seq.token_ids[seq.num_prompt_tokens + emitted :]
        logprobs = state.logprobs if params.logprobs is not None else None
        if params.output_kind == "delta" and not seq.is_finished:
            whole_text, whole_ids = new_text, new_ids
            logprobs = logprobs[emitted:] if logprobs is not None else None
        else:
            whole_text, whole_ids = text[:visible], seq.token_ids[seq.num_prompt_tokens :]  # fresh copies
            logprobs = list(logprobs) if logprobs is not None else None
        self.counters["output_items"] += (
            len(new_text) + len(new_ids) + len(whole_text) + len(whole_ids) + len(logprobs or ())
        )
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            text=whole_text,
            token_ids=whole_ids,
            new_text=new_text,
            new_token_ids=new_ids,
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            logprobs=logprobs,
            prompt_logprobs=list(state.prompt_logprobs) if params.prompt_logprobs is not None else None,
            num_cached_tokens=seq.num_cached_tokens,
            timings=seq.timings.summary() if seq.is_finished else {},  # summed up once, at the end
            sparsity=seq.sparsity.report() if seq.sparsity is not None else None,
            error=state.error,
        )
