"""A profiling session's summary read from its Chrome trace, in a child process: the top operators by self
CPU time, as torch.profiler's `key_averages()` gives them.

Why a child: torch's own reading of a session (`events()`, `key_averages()`) is pure Python over every
event — ~0.9 s for two short generates recorded with stacks — and a Python thread that busy in the
server's process takes the GIL from the engine thread at each of its torch calls (a prefill 2.5-3x
slower meanwhile). The child, at the lowest CPU priority, shares neither the GIL nor a core's time
slices with serving. Standard library only, so it starts in ~50 ms:

    python -m glassbox.research.trace_summary TRACE.json [--top 25]     # prints the summary as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

# The kinds of event torch.profiler counts as its events: operators, record_function ranges (ours:
# glassbox::forward, glassbox::executor[...]) and, with with_stack, Python frames.
OPERATORS = ("cpu_op", "user_annotation")
COUNTED = (*OPERATORS, "python_function")


def summarize_trace(trace: dict[str, Any], top: int = 25) -> dict[str, Any]:
    """num_events, and the `top` operators by self CPU time: name, calls, self_cpu_ms, cpu_total_ms.

    Self time is an event's duration less its direct children's (operators nested in it on the same
    thread), as torch computes it for a FunctionEvent."""
    spans = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and e.get("cat") in COUNTED]
    by_thread: dict[tuple[Any, Any], list[dict[str, Any]]] = defaultdict(list)
    for event in spans:
        if event["cat"] in OPERATORS:
            by_thread[(event.get("pid"), event.get("tid"))].append(event)
    calls: dict[str, int] = defaultdict(int)
    self_us: dict[str, float] = defaultdict(float)
    total_us: dict[str, float] = defaultdict(float)
    duplicates = 0
    for events in by_thread.values():
        events.sort(key=lambda e: (e["ts"], -e["dur"]))  # a parent before the children it starts with
        open_: list[_Frame] = []  # the enclosing events, innermost last
        for event in events:
            while open_ and open_[-1].end <= event["ts"]:
                duplicates += _close(open_, calls, self_us, total_us)
            if open_:
                open_[-1].children.append(frame := _Frame(event["ts"] + event["dur"], event["name"], event["dur"]))
            else:
                frame = _Frame(event["ts"] + event["dur"], event["name"], event["dur"])
            open_.append(frame)
        while open_:
            duplicates += _close(open_, calls, self_us, total_us)
    names = sorted(calls, key=lambda name: self_us[name], reverse=True)[:top]
    return {
        "num_events": len(spans) - duplicates,
        "top_ops_by_self_cpu_time": [
            {"name": n, "calls": calls[n], "self_cpu_ms": self_us[n] / 1000, "cpu_total_ms": total_us[n] / 1000}
            for n in names
        ],
    }


@dataclass
class _Frame:
    end: float
    name: str
    duration: float
    children: list[_Frame] = field(default_factory=list)  # direct children, as torch's tree has them


def _close(open_: list[_Frame], calls: dict, self_us: dict, total_us: dict) -> int:
    """Account the innermost open event (its children are accounted already); 1 if it held a duplicate
    torch drops, else 0.

    torch drops an event that is the only child of one with its name (an operator recorded twice, e.g.
    through autograd's wrapper): the parent stays and takes the child's children."""
    frame = open_.pop()
    duplicates = 0
    if len(frame.children) == 1 and frame.children[0].name == frame.name:
        child = frame.children[0]
        calls[child.name] -= 1
        total_us[child.name] -= child.duration
        self_us[child.name] -= child.duration - sum(c.duration for c in child.children)
        frame.children = child.children
        duplicates = 1
    calls[frame.name] += 1
    total_us[frame.name] += frame.duration
    self_us[frame.name] += frame.duration - sum(c.duration for c in frame.children)
    return duplicates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    os.nice(19)  # serving first
    with open(args.trace, encoding="utf-8") as f:
        trace = json.load(f)
    json.dump(summarize_trace(trace, args.top), sys.stdout)


if __name__ == "__main__":
    main()
