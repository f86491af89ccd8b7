"""The offline API, like vLLM's:

    from glassbox import LLM, SamplingParams
    llm = LLM()                                   # the default model
    outputs = llm.generate(["Hello", "The sky is"], SamplingParams(temperature=0, max_tokens=16))
    print(outputs[0].text, outputs[0].token_ids, outputs[0].finish_reason, outputs[0].timings)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence as SequenceABC
from typing import Any

import torch

from glassbox.config import EngineConfig
from glassbox.engine.llm_engine import LLMEngine, RequestOutput
from glassbox.models.loader import load_model
from glassbox.sampling import SamplingParams


class LLM:
    def __init__(
        self,
        model: str | None = None,
        dtype: str | torch.dtype | None = None,
        device: str = "cpu",
        **engine_options: Any,
    ) -> None:
        """`model`: a GGUF file or Hugging Face folder (None = the embedded SmolLM2-135M-Instruct).
        `engine_options`: fields of EngineConfig (kv_cache_memory, max_num_seqs, scheduling_policy,
        tensor_parallel_size, ...). With tensor_parallel_size=N, N - 1 worker processes run until `shutdown()`
        (or the end of a `with LLM(...) as llm:` block, or of this process)."""
        self.engine = LLMEngine(load_model(model, dtype=dtype, device=device), EngineConfig(**engine_options))
        self.tokenizer = self.engine.tokenizer

    def shutdown(self) -> None:
        """Stop the engine's worker processes (tensor_parallel_size > 1; nothing to do otherwise)."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def generate(
        self,
        prompts: str | list[int] | SequenceABC[str | list[int]],
        params: SamplingParams | SequenceABC[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt through the engine together; the final outputs, in the prompts' order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params_list)} SamplingParams")
        # Only the final outputs are wanted: the engine skips the per-step reports (and their text).
        params_list = [dataclasses.replace(sp, output_kind="final_only") for sp in params_list]
        ids = [self.engine.add_request(p, sp) for p, sp in zip(prompts, params_list)]
        finished: dict[str, RequestOutput] = {}
        try:
            while len(finished) < len(ids):
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
        finally:
            for request_id in ids:
                if request_id not in finished:
                    self.engine.abort(request_id)
        return [finished[i] for i in ids]
