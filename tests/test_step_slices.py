"""/optimization/batch_schedule's private steps in slices of layers (research/step_slices.py): the same
results as whole steps, serving steps run between the slices untouched, and a dropped run ends its thread."""

from __future__ import annotations

import os

import pytest

from glassbox import LLM, SamplingParams
from glassbox.research.schedule import ScheduledRequest, ScheduleRun

REQUESTS = [ScheduledRequest(p, 0, 12) for p in ("Tell me a story", "The capital of France is", "1, 2, 3,", "Hi")] * 2


@pytest.fixture(scope="module")
def llm():
    llm = LLM(quantization="auto", kv_cache_memory=64 << 20, enable_prefix_caching=False)
    if "native_layers" not in llm.engine.runner.executors:
        pytest.skip("needs the native CPU kernels (a C compiler)")
    return llm


def texts(run: ScheduleRun) -> list[str]:
    return [r["text"] for r in run.result()["results"]]


def test_sliced_run_gives_the_whole_steps_results_with_serving_between(llm):
    whole = ScheduleRun(llm.engine, REQUESTS, "fcfs", 8, sliced=False)
    while not whole.step():
        pass
    alone = llm.generate(["Serving goes on"], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]

    sliced = ScheduleRun(llm.engine, REQUESTS, "fcfs", 8)
    assert sliced.handover is not None
    serving = llm.engine
    state = serving.make_request("Serving goes on", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    serving.enqueue(state)
    calls, served = 0, []
    while not sliced.step():
        calls += 1
        if serving.has_unfinished_requests():  # a serving step between two slices (it binds its own pool)
            served += [out for out in serving.step() if out.finished]
    while serving.has_unfinished_requests():
        served += [out for out in serving.step() if out.finished]
    assert calls > 2 * whole.private.num_steps  # steps were cut
    assert texts(sliced) == texts(whole) and sliced.order == whole.order
    assert served[0].token_ids == alone.token_ids
    sliced.close()
    sliced.handover._thread.join(5)
    assert not sliced.handover._thread.is_alive()


def test_the_private_step_starts_no_openmp_team(llm):
    """The private step's kernels run on the engine thread (Handover.on_caller) and its own thread keeps one
    OpenMP thread: a team of its own would live as long as the run and slow every serving step beside it
    (kernels/openmp.py)."""
    llm.generate(["The engine's own team is up"], SamplingParams(temperature=0, max_tokens=2))
    before = len(os.listdir("/proc/self/task"))
    run = ScheduleRun(llm.engine, REQUESTS, "fcfs", 8)
    while not run.step():
        pass
    assert len(os.listdir("/proc/self/task")) == before + 1  # the run's thread, no OpenMP worker beside it
    run.close()


def test_a_run_dropped_mid_step_ends_its_thread(llm):
    run = ScheduleRun(llm.engine, REQUESTS, "fcfs", 8)
    assert run.step() is False and run.handover.busy  # paused inside the first private step
    run.close()
    run.handover._thread.join(5)
    assert not run.handover._thread.is_alive()
    out = llm.generate(["Still serving"], SamplingParams(temperature=0, max_tokens=4))[0]
    assert len(out.token_ids) == 4


def test_a_slice_ends_at_the_next_layer_while_serving_waits(llm):
    """With a serving request waiting, each call runs one layer of the private step (and pauses once more
    before its LM head): that request waits for a layer, not for a slice. Same results as whole steps."""
    whole = ScheduleRun(llm.engine, REQUESTS, "fcfs", 8, sliced=False)
    while not whole.step():
        pass
    eager = ScheduleRun(llm.engine, REQUESTS, "fcfs", 8, serving_waits=lambda: True)
    calls = 1
    while not eager.step():
        calls += 1
    layers = len(llm.engine.loaded.model.layers)
    assert calls == eager.private.num_steps * (layers + 1)
    assert texts(eager) == texts(whole) and eager.order == whole.order
    eager.close()


def test_a_run_on_a_pool_made_elsewhere(llm):
    """The server zeroes the private pool off the engine thread (pool_spec(...).make()); the run uses that
    pool, and refuses one too small for the set."""
    from glassbox.research.schedule import pool_spec

    spec = pool_spec(llm.engine, REQUESTS)
    pool = spec.make()
    run = ScheduleRun(llm.engine, REQUESTS, "fcfs", 8, kv_cache=pool)
    assert run.private.kv_cache is pool and run.private.num_parameters == llm.engine.num_parameters
    while not run.step():
        pass
    whole = ScheduleRun(llm.engine, REQUESTS, "fcfs", 8, sliced=False)
    while not whole.step():
        pass
    assert texts(run) == texts(whole)
    run.close()
    small = type(spec)(spec.config, spec.num_blocks - 1, spec.block_size, spec.dtype, spec.device).make()
    with pytest.raises(ValueError, match="the set needs"):
        ScheduleRun(llm.engine, REQUESTS, "fcfs", 8, kv_cache=small)
