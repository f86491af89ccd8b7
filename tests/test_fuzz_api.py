"""schemathesis over the served OpenAPI schema: every operation that takes a body (POST, DELETE), fuzzed
with schema-valid and schema-breaking bodies against a real server (the tiny Llama: the same engine and
routes, a 256-token context, so that any generated request finishes in milliseconds).

What it holds the server to: no response >= 500, every response in the documented schema and content
type (issue 17). Bounded: `EXAMPLES` examples per operation (~1 minute on 2 cores).
"""

from __future__ import annotations

from collections import Counter

import httpx
import pytest
import schemathesis
from schemathesis import GenerationMode
from conftest import start_server, stop_server
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import content_type_conformance, not_a_server_error, response_schema_conformance

EXAMPLES = 8  # per operation and mode (schema-valid, schema-breaking)
STATUSES: Counter[int] = Counter()


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir):
    proc, url = start_server("--model", str(tiny_model_dir("llama")))
    yield url
    stop_server(proc)


def test_every_post_declares_its_body(fuzz_server):
    """The schema describes each body (a POST without one takes none: /cache/clear, profiling stop, ...)."""
    spec = httpx.get(f"{fuzz_server}/openapi.json", timeout=60).json()
    with_body = {path for path, ops in spec["paths"].items() for method, op in ops.items() if "requestBody" in op}
    assert {"/generate", "/v1/chat/completions", "/parallel/tensor_split", "/optimization/batch_schedule"} <= with_body
    assert len(with_body) == 16  # every POST but the five that take no body


def test_fuzzed_bodies_never_500_and_match_the_schema(fuzz_server):
    """Each POST/DELETE operation, EXAMPLES generated cases (hypothesis, derandomized: the same cases every
    run). schemathesis's pytest plugin is not used (it does not load under this pytest); the loop is its
    documented per-operation strategy."""
    schema = schemathesis.openapi.from_url(f"{fuzz_server}/openapi.json")
    checks = [not_a_server_error, response_schema_conformance, content_type_conformance]
    operations = [result.ok() for result in schema.get_all_operations()]
    operations = [op for op in operations if op.method.upper() in ("POST", "DELETE")]
    assert len(operations) >= 20

    for operation, mode in [(op, mode) for op in operations for mode in GenerationMode]:  # valid, then broken bodies

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def fuzz(case) -> None:
            response = case.call(base_url=fuzz_server, timeout=120)
            STATUSES[response.status_code] += 1
            case.validate_response(response, checks=checks)

        try:
            fuzz()
        except Unsatisfiable:  # a body no schema-breaking value exists for (e.g. one that takes any object)
            assert mode is GenerationMode.NEGATIVE


def test_the_server_is_healthy_after_the_fuzzing(fuzz_server):
    assert httpx.get(f"{fuzz_server}/health", timeout=60).status_code == 200
    out = httpx.post(f"{fuzz_server}/generate", json={"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0, "ignore_eos": True}, timeout=60)
    assert out.status_code == 200 and len(out.json()["token_ids"]) == 4
    print(f"fuzzed responses by status: {dict(sorted(STATUSES.items()))}")
    assert STATUSES and not any(status >= 500 for status in STATUSES)
