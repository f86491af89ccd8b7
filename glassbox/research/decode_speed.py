"""What a sparsity method buys when served: the speed-and-memory part of /optimization/evaluate.

One prompt of `context_tokens` tokens, then `decode_steps` greedy tokens, served by a private engine over the
live model (its own KV pool, as research/schedule.py's runs; the path a request under the method takes:
KV eviction, Quest's block reads, or the mask form) — dense, then under the method. Per run:
  decode_ms_per_token  median wall time of the decode steps
  kv_blocks_at_end     blocks the sequence holds at its last decode step
  attention_ms_per_step  the decode attention alone, replayed over the sequence's final cache in every layer
                       on the kernel the served step ran (native CPU or Triton; Quest's choice included),
                       median of ATTENTION_REPEATS; None where decode takes the readable path (masks; h2o off
                       the native stack)
The replay's query is random (the cost of a decode step's attention does not depend on its values) and it
stores its key where the sequence's last one is: the run is over, its blocks are freed right after.
The whole measurement runs on the engine thread: serving waits for it (bounded by Limits).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from glassbox.config import EngineConfig
from glassbox.engine.kv_cache import bytes_per_block
from glassbox.engine.llm_engine import LLMEngine
from glassbox.kernels import cpu_native
from glassbox.layers.attention import TritonAttentionBackend
from glassbox.layers.sparsity import SparsityMethod
from glassbox.sampling import SamplingParams

ATTENTION_REPEATS = 5


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_speed(engine: LLMEngine, prompt: list[int], method: SparsityMethod, decode_steps: int) -> dict[str, Any]:
    """Dense and sparse runs of `prompt` + `decode_steps` tokens on a private engine; see the module."""
    block_size = engine.config.block_size
    blocks = -(-(len(prompt) + decode_steps + 1) // block_size) + 1
    private = LLMEngine(
        engine.loaded,
        EngineConfig(
            block_size=block_size,
            num_kv_blocks=blocks,
            max_num_seqs=1,
            max_num_batched_tokens=max(engine.config.max_num_batched_tokens, 512),
            enable_prefix_caching=False,
            quantization=engine.config.quantization,
            kv_cache_dtype=engine.config.kv_cache_dtype,
            enforce_eager=True,  # no graphs to capture for a short-lived engine: dense decode runs eager too
        ),
    )
    try:
        runs = {name: _run(private, prompt, spec, decode_steps) for name, spec in (("dense", None), ("sparse", method))}
    finally:
        engine.runner.kv_cache.bind(engine.runner.attention_layers)  # the served pool back on the model
    dense, sparse = runs["dense"], runs["sparse"]
    speedup = {
        key: (dense[key] / sparse[key] if dense[key] and sparse[key] else None)
        for key in ("decode_ms_per_token", "attention_ms_per_step")
    }
    return {
        "context_tokens": len(prompt),
        "decode_steps": decode_steps,
        "dense": dense,
        "sparse": sparse,
        "speedup": speedup,
        "kv_pool_bytes": private.kv_cache.nbytes,
        "bytes_per_block": bytes_per_block(engine.loaded.config, block_size, private.kv_cache.dtype),
    }


def _run(private: LLMEngine, prompt: list[int], method: SparsityMethod | None, decode_steps: int) -> dict[str, Any]:
    device = private.loaded.device
    params = SamplingParams(temperature=0, max_tokens=decode_steps + 2, ignore_eos=True)  # still running at the end
    request_id = private.add_request(prompt, params, sparsity=method)
    seq = private.requests[request_id].seq
    times, executors = [], {}
    try:
        while seq.num_output_tokens < 1:  # the prompt
            private.step()
        while seq.num_output_tokens <= decode_steps:
            _sync(device)
            start = time.perf_counter()
            private.step()
            _sync(device)
            times.append(time.perf_counter() - start)
            executors[private.last_plan.executor] = executors.get(private.last_plan.executor, 0) + 1
        result = {
            "decode_ms_per_token": 1000 * statistics.median(times),
            "kv_blocks_at_end": len(seq.block_table),
            "executors": executors,
        }
        plan = private.last_plan
        result["attention_ms_per_step"] = None if plan.masked_rows else _attention_ms(private, seq, plan.quest.get(0))
        if seq.sparsity is not None:
            result["sparsity"] = seq.sparsity.report()
        return result
    finally:
        private.abort(request_id)


def _attention_ms(private: LLMEngine, seq, budgets: list[int] | None) -> float | None:
    """The decode attention of `seq`'s next token over its cache, every layer, on the served kernel: ms."""
    runner = private.runner
    kv = runner.kv_cache
    config = private.loaded.config
    device = private.loaded.device
    num_heads, num_kv, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    context = seq.num_kv_slots
    last = context - 1
    slot = torch.tensor([seq.block_table[last // kv.block_size] * kv.block_size + last % kv.block_size], device=device)
    table = torch.tensor([seq.block_table], dtype=torch.int32, device=device)
    lens = torch.tensor([context], dtype=torch.int32, device=device)
    layers = runner.attention_layers
    summaries = runner.quest.table if runner.quest is not None else None
    top = None if budgets is None else torch.tensor(budgets, dtype=torch.int32, device=device)[:, None]
    g = torch.Generator(device=device).manual_seed(0)
    if isinstance(layers[0].backend, TritonAttentionBackend):
        from glassbox.kernels import attention_triton

        q = torch.randn(1, num_heads, head_dim, generator=g, device=device).to(private.loaded.dtype)
        k_new = torch.randn(1, num_kv, head_dim, generator=g, device=device).to(private.loaded.dtype)

        def replay() -> None:
            for layer in layers:
                attention_triton.paged_decode_attention(
                    q, layer.k_cache, layer.v_cache, table, lens, layer.scale, layer.sliding_window,
                    k_new=k_new, v_new=k_new, slot_mapping=slot,
                    quest_summaries=None if top is None else summaries[layer.layer_idx],
                    quest_budgets=None if top is None else top[layer.layer_idx],
                )  # fmt: skip

    elif cpu_native.available() and kv.dtype in cpu_native.CACHE_DTYPES and "native_layers" in runner.executors:
        qkv = torch.randn(1, (num_heads + 2 * num_kv) * head_dim, generator=g)
        cos, sin = torch.ones(1, head_dim), torch.zeros(1, head_dim)
        starts = torch.tensor([0, 1], dtype=torch.int32)

        def replay() -> None:
            for layer in layers:
                cpu_native.paged_attention(
                    qkv, cos, sin, layer.k_cache, layer.v_cache, slot, starts, table, lens, num_heads, layer.scale,
                    layer.sliding_window,
                    quest_summaries=None if summaries is None else summaries[layer.layer_idx],
                    top_blocks=None if top is None else top[layer.layer_idx],
                )  # fmt: skip

    else:
        return None
    runner.kv_cache.bind(layers)
    replay()  # warm (Triton compiles for this table width)
    samples = []
    for _ in range(ATTENTION_REPEATS):
        _sync(device)
        start = time.perf_counter()
        replay()
        _sync(device)
        samples.append(time.perf_counter() - start)
    return 1000 * statistics.median(samples)
