"""Engine introspection: /cache/*, /debug/*, /optimization/batch_schedule and scheduling_policy, /plugins,
/parallel/*, /pipeline/*. Each runs on the engine's loop thread between two steps (so what it reads is one
consistent state), in pieces of at most about one step where it could take longer (a schedule, a
pipeline), and within the budgets of research/limits.py (GET /limits)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, Response

from glassbox.errors import FieldError
from glassbox.research import parallel, parallel_ranks, pipeline
from glassbox.research.attention import attention_scores
from glassbox.research.cache import cache_stats, clear_prefix_cache
from glassbox.research.heatmap import attention_png
from glassbox.research.limits import LimitError, Limits, check
from glassbox.research.memory import memory_usage
from glassbox.research.overlap import overlap_schedule
from glassbox.research.profiler import Profiler, ProfilerError, untrace_this_thread
from glassbox.research.schedule import ScheduledRequest, ScheduleRun, pool_spec
from glassbox.server.deps import engine_client, json_body, sparsity_of
from glassbox.server.engine_client import EngineClient
from glassbox.server.errors import APIError
from glassbox.server.schemas import (
    AttentionScoresRequest,
    BatchScheduleRequest,
    ParallelExecuteRequest,
    PipelineInput,
    PipelineScheduleRequest,
    PolicyRequest,
    ProfilingStart,
    StepExecuteRequest,
    TensorSplitRequest,
)

router = APIRouter()


def limits_of(request: Request) -> Limits:
    return request.app.state.settings.limits


@router.get("/cache/stats")
async def get_cache_stats(client: EngineClient = Depends(engine_client)) -> dict[str, Any]:
    return await client.call(cache_stats)


@router.post("/cache/clear")
async def post_cache_clear(client: EngineClient = Depends(engine_client)) -> dict[str, Any]:
    """Drops unreferenced cached prefix blocks; blocks of running requests are kept."""
    return await client.call(clear_prefix_cache)


@router.get("/debug/memory_usage")
async def get_memory_usage(client: EngineClient = Depends(engine_client)) -> dict[str, Any]:
    return await client.call(memory_usage)


@router.post("/debug/profiling/start")
async def profiling_start(
    request: Request, body: ProfilingStart = Depends(json_body(ProfilingStart)), client: EngineClient = Depends(engine_client)
) -> dict[str, Any]:
    """Record the engine's steps (at most limits.profiling_max_steps steps / profiling_max_seconds)."""
    profiler: Profiler = request.app.state.profiler
    try:
        started = await client.call(
            lambda engine: profiler.start(engine, body.activities, body.record_shapes, body.with_stack)
        )
    except ProfilerError as error:
        raise APIError(409, str(error)) from None
    if body.with_stack:  # the engine's Python calls, not the server's event loop's
        untrace_this_thread()
    return started


@router.post("/debug/profiling/stop")
async def profiling_stop(request: Request, client: EngineClient = Depends(engine_client)) -> dict[str, Any]:
    """Stops the session: the top operators by self time, and the id of its Chrome/Perfetto trace (none if
    the session was over profiling_max_events or its trace over profiling_max_trace_bytes)."""
    profiler: Profiler = request.app.state.profiler
    try:
        session = await client.call(profiler.stop)
    except ProfilerError as error:
        raise APIError(409, str(error)) from None
    result = await profiler.summarize(session)
    result["trace_url"] = f"/debug/profiling/traces/{result['trace_id']}" if result["trace_id"] else None
    return result


@router.get("/debug/profiling/traces")
async def profiling_traces(request: Request) -> dict[str, Any]:
    """The traces kept (at most limits.profiling_traces_kept, oldest first)."""
    return {"trace_ids": request.app.state.profiler.traces()}


@router.get("/debug/profiling/traces/{trace_id}")
async def profiling_trace(request: Request, trace_id: str) -> FileResponse:
    path = request.app.state.profiler.trace_path(trace_id)
    if path is None:
        raise APIError(404, f"trace_id: no trace {trace_id!r}", "trace_id", "not_found_error")
    return FileResponse(path, media_type="application/json", filename=f"glassbox-trace-{trace_id}.json")


@router.delete("/debug/profiling/traces/{trace_id}")
async def delete_profiling_trace(request: Request, trace_id: str) -> dict[str, Any]:
    if not request.app.state.profiler.delete(trace_id):
        raise APIError(404, f"trace_id: no trace {trace_id!r}", "trace_id", "not_found_error")
    return {"deleted": trace_id}


@router.post("/optimization/batch_schedule")
async def batch_schedule(
    request: Request,
    body: BatchScheduleRequest = Depends(json_body(BatchScheduleRequest)),
    client: EngineClient = Depends(engine_client),
) -> Any:
    """Run a set of requests to the end under one policy (built in or the plugin's); compare the per-request
    times across policies. One private step per engine call: serving goes on between them, and the run is
    dropped as soon as its client leaves."""
    limits = limits_of(request)
    state = request.app.state
    if state.schedule_runs >= limits.schedule_max_concurrent:
        raise LimitError("schedule_max_concurrent", f"{state.schedule_runs} schedule(s) already running; retry when done", 429)
    state.schedule_runs += 1
    try:
        requests = [ScheduledRequest(r.prompt, r.priority, r.max_tokens) for r in body.requests]
        # The private pool is zeroed off the engine thread; the run is built on it, its slices hand the
        # thread back as soon as a serving request waits.
        spec = await client.call(lambda engine: pool_spec(engine, requests, limits))
        pool = await state.background.run(spec.make)
        run = await client.call(
            lambda engine: ScheduleRun(
                engine, requests, body.algorithm, body.max_batch_size, body.strategy, limits,
                serving_waits=client.serving_waits, kv_cache=pool,
            )  # fmt: skip
        )
        try:
            while not await client.call(lambda engine: run.step()):
                if await request.is_disconnected():
                    return Response(status_code=499)  # the client left: the run is dropped with its pool
            return run.result()
        finally:
            await client.call(lambda engine: run.close())
    finally:
        state.schedule_runs -= 1


@router.get("/optimization/scheduling_policy")
async def get_scheduling_policy(client: EngineClient = Depends(engine_client)) -> dict[str, str]:
    return await client.scheduling_policy()


@router.post("/optimization/scheduling_policy")
async def post_scheduling_policy(
    body: PolicyRequest = Depends(json_body(PolicyRequest)), client: EngineClient = Depends(engine_client)
) -> dict[str, str]:
    """Set the policy for all traffic."""
    return await client.set_scheduling_policy(body.algorithm)


@router.get("/plugins")
async def plugins_status(request: Request) -> dict[str, Any]:
    """The plugin file given with --plugin: version, what it registered, the last load error, and whether
    a fault while serving unloaded it."""
    manager = request.app.state.plugins
    if manager is None:
        raise APIError(404, "no plugin: start the server with --plugin FILE", None, "not_found_error")
    return manager.status()


@router.get("/debug/latency_stats")
async def latency_stats(request: Request, client: EngineClient = Depends(engine_client)) -> dict[str, Any]:
    """Per-stage count, mean, p50, p95 and totals (ms) since the last reset, while enabled."""
    return await client.call(lambda engine: request.app.state.latency.report())


@router.post("/debug/latency_stats/enable")
async def latency_enable(request: Request, client: EngineClient = Depends(engine_client)) -> dict[str, Any]:
    return await client.call(request.app.state.latency.enable)


@router.post("/debug/latency_stats/disable")
async def latency_disable(request: Request, client: EngineClient = Depends(engine_client)) -> dict[str, Any]:
    return await client.call(lambda engine: request.app.state.latency.disable())


@router.post("/debug/latency_stats/reset")
async def latency_reset(request: Request, client: EngineClient = Depends(engine_client)) -> dict[str, Any]:
    return await client.call(lambda engine: request.app.state.latency.reset())


@router.post("/parallel/tensor_split")
async def tensor_split(
    request: Request, body: TensorSplitRequest = Depends(json_body(TensorSplitRequest)), client: EngineClient = Depends(engine_client)
) -> dict[str, Any]:
    """Split a model weight (by name) or a seeded random tensor (1-D to 4-D, at most
    limits.tensor_max_elements) into shards; returns a split_id (expires, limits.handle_ttl_s)."""
    max_elements = limits_of(request).tensor_max_elements
    if body.weight is None and client.facts.model_info["tensor_parallel_size"] == 1:  # touches no engine state
        args = (None, None, body.tensor_shape, body.split_dim, body.num_splits, body.seed, max_elements)
        parts = await request.app.state.background.run(parallel.split, *args)
    else:
        parts = await client.call(
            lambda engine: parallel_ranks.split_for_engine(
                engine, body.weight, body.tensor_shape, body.split_dim, body.num_splits, body.seed, max_elements
            )
        )
    split_id = request.app.state.handles.put(parts, parallel.nbytes(parts))
    return {
        "split_id": split_id,
        "source": parts.source,
        "shape": list(parts.full.shape),
        "dtype": str(parts.full.dtype).removeprefix("torch."),
        "split_dim": parts.split_dim,
        "shards": [{"index": i, "shape": list(s.shape)} for i, s in enumerate(parts.shards)],
        "splits": [f"{split_id}#{i}" for i in range(len(parts.shards))],
        "placement": parts.placement or {"threads": len(parts.shards)},
    }


@router.post("/parallel/execute")
async def parallel_execute(
    request: Request,
    body: ParallelExecuteRequest = Depends(json_body(ParallelExecuteRequest)),
    client: EngineClient = Depends(engine_client),
) -> dict[str, Any]:
    """Run the operation shard by shard on parallel workers; with `gather`, gather and compare with the
    unsplit result."""
    split_id = parallel.split_id_of(body.splits)
    parts = request.app.state.handles.get(split_id)
    if not isinstance(parts, parallel.SplitTensor):
        raise APIError(404, f"splits: no split {split_id!r} (unknown or expired)", "splits", "not_found_error")
    if isinstance(body.splits, list) and sorted(body.splits) != sorted(f"{split_id}#{i}" for i in range(len(parts.shards))):
        raise FieldError("splits", f"name every shard of the split ({len(parts.shards)} ids '{split_id}#<index>'), or its split_id")
    max_elements = limits_of(request).tensor_max_elements
    if parts.placement is not None:  # on the ranks that hold the shards, between two steps
        return await client.call(
            lambda engine: parallel_ranks.execute_on_ranks(engine, parts, body.other_columns, body.seed, body.gather, max_elements)
        )
    background = request.app.state.background
    return await background.run(parallel.execute, parts, body.other_columns, body.seed, body.gather, max_elements)


@router.post("/debug/attention_scores", responses={200: {"content": {"image/png": {}}, "description": "JSON, or a PNG with format png"}})
async def debug_attention_scores(
    request: Request,
    body: AttentionScoresRequest = Depends(json_body(AttentionScoresRequest)),
    client: EngineClient = Depends(engine_client),
) -> Any:
    """Post-softmax attention of the live model on a prompt: a [query][key] matrix for one head, one per
    head for a layer, or per-head statistics for every layer; sparsity, entropy and k for 90% mass.
    At most limits.attention_max_tokens tokens and attention_max_values matrix values in the response."""
    field = "prompt" if body.prompt is not None else "token_ids"
    try:
        ids = client.encode_prompt(body.prompt if body.prompt is not None else body.token_ids)
    except FieldError as error:
        raise error.renamed(field) from None
    limits = limits_of(request)
    check("attention_max_tokens", len(ids), limits.attention_max_tokens, f"the {field}'s length in tokens")
    heads = client.facts.model_info["num_heads"]
    matrices = 1 if body.head_idx is not None else heads if body.layer_idx is not None else 0
    check("attention_max_values", matrices * len(ids) ** 2, limits.attention_max_values, "the attention values to return")
    sparsity = sparsity_of(body.sparsity)
    scores = await client.call(
        lambda e: attention_scores(e, ids, body.layer_idx, body.head_idx, body.threshold, sparsity)
    )
    if body.format == "png":
        title = f"layer {body.layer_idx}, head {body.head_idx}: sparsity {scores['sparsity_ratio']:.2f}, entropy {scores['entropy']:.2f}"
        png = await request.app.state.background.run(attention_png, scores["attention_matrix"], scores["tokens"], title)
        return Response(png, media_type="image/png")
    return scores


def _pipeline_input(request: Request, client: EngineClient, body: PipelineInput) -> pipeline.Activation:
    if body.input is not None:
        activation = request.app.state.handles.get(body.input)
        if not isinstance(activation, pipeline.Activation):
            raise APIError(404, f"input: no activation handle {body.input!r} (unknown or expired)", "input", "not_found_error")
        return activation
    field = "prompt" if body.prompt is not None else "input_ids"
    try:
        ids = client.encode_prompt(body.prompt if body.prompt is not None else body.input_ids)
    except FieldError as error:
        raise error.renamed(field) from None
    if not ids:
        raise FieldError(field, "must hold at least one token")
    check("pipeline_max_tokens", len(ids), limits_of(request).pipeline_max_tokens, f"the {field}'s length in tokens")
    return pipeline.Activation(None, ids)


async def _run_pipeline(
    request: Request, client: EngineClient, body: PipelineInput, steps: list[tuple[str, int | None]]
) -> dict[str, Any]:
    activation = _pipeline_input(request, client, body)
    handles = request.app.state.handles
    kept = steps[-handles.max_entries :]  # the handles of earlier steps make room for later ones
    handles.check_fits(await client.call(lambda engine: pipeline.output_bytes(engine, kept, len(activation.token_ids))))
    reports = []
    for step in steps:  # one engine call per step (or per slice of lm_head): serving steps run between them
        parts = []
        for piece in pipeline.pieces(step[0], activation):
            if await request.is_disconnected():
                return Response(status_code=499)
            parts.append(await client.call(lambda engine, piece=piece: pipeline.run_timed(engine, step, piece)))
        # (statistics over [T, vocab] logits: ~0.1 s, off the event loop)
        report, out = await request.app.state.background.run(pipeline.joined, step, parts, body.return_intermediate)
        activation = pipeline.Activation(out, activation.token_ids)
        report["handle"] = handles.put(activation, out.numel() * out.element_size())
        reports.append(report)
    return {"token_ids": activation.token_ids, "steps": reports, "total_ms": sum(r["ms"] for r in reports)}


@router.post("/pipeline/step_execute")
async def step_execute(
    request: Request, body: StepExecuteRequest = Depends(json_body(StepExecuteRequest)), client: EngineClient = Depends(engine_client)
) -> Any:
    """Run one piece of the model (embed, norm, attention, mlp, layer, final_norm, lm_head); the output's
    shape, dtype, statistics, a handle to chain from, and its values if asked (capped)."""
    result = await _run_pipeline(request, client, body, [(body.step, body.layer_idx)])
    if isinstance(result, Response):
        return result
    return {"token_ids": result["token_ids"], **result["steps"][0]}


@router.post("/pipeline/schedule")
async def pipeline_schedule(
    request: Request,
    body: PipelineScheduleRequest = Depends(json_body(PipelineScheduleRequest)),
    client: EngineClient = Depends(engine_client),
) -> Any:
    """Run a list of steps in order, each on the previous one's output, with the time of each; with
    `overlap_comm` (tensor parallelism), serially and overlapped over micro-batches, both timed."""
    steps = [(s.step, s.layer_idx) for s in body.steps]
    if body.overlap_comm:
        activation = _pipeline_input(request, client, body)
        check("pipeline_max_tokens", len(activation.token_ids) * body.micro_batches, limits_of(request).pipeline_max_tokens,
              "the input's tokens times micro_batches")  # fmt: skip
        return await client.call(lambda engine: overlap_schedule(engine, steps, activation, body.micro_batches))
    return await _run_pipeline(request, client, body, steps)
