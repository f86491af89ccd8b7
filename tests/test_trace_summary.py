"""research/trace_summary.py reads a profiling session's summary from its Chrome trace (in a child
process, off the server's GIL): the same figures as torch.profiler's key_averages()."""

import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from glassbox.research.trace_summary import summarize_trace


def test_summary_from_the_trace_equals_key_averages(tmp_path):
    x = torch.randn(32, 32)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as session:
        for _ in range(3):
            with record_function("outer"):
                (torch.nn.functional.linear(x, x).relu().softmax(-1) @ x).sum()  # sum: recorded twice, one kept
    reference = {row.key: row for row in session.key_averages()}
    num_events = len(session.events())
    session.export_chrome_trace(str(tmp_path / "trace.json"))
    summary = summarize_trace(json.loads((tmp_path / "trace.json").read_text()), top=100)
    assert summary["num_events"] == num_events
    rows = summary["top_ops_by_self_cpu_time"]
    assert {row["name"] for row in rows} == set(reference)
    for row in rows:
        ref = reference[row["name"]]
        assert row["calls"] == ref.count, row["name"]
        assert row["self_cpu_ms"] == pytest.approx(ref.self_cpu_time_total / 1000, rel=1e-3, abs=1e-5), row["name"]
        assert row["cpu_total_ms"] == pytest.approx(ref.cpu_time_total / 1000, rel=1e-3, abs=1e-5), row["name"]
    self_times = [row["self_cpu_ms"] for row in rows]
    assert self_times == sorted(self_times, reverse=True)
