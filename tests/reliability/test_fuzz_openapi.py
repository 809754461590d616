"""Fuzzing a live server (real uvicorn, real engine, real database) from its own schema:
schemathesis generates requests from ``/openapi.json`` (valid and invalid ones, for every
operation, with an admin key so every route is exercised): no 5xx, and every 4xx in OpenAI's
error shape.

On both databases; each case ends with :func:`~tests.reliability._fuzz.assert_healthy`.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.reliability._fuzz import (
    ERROR_TYPES_4XX,
    assert_healthy,
    auth,
)

pytestmark = pytest.mark.usefixtures("fuzz_report")

OPENAPI_EXAMPLES = 30  # per operation and generation mode (13 operations), after the coverage phase


@schemathesis.check
def openai_error_shape(ctx, response, case) -> None:
    """Every 4xx is ``{"error": {"message", "type", "param", "code"}}`` (OpenAI's shape)."""
    if 400 <= response.status_code < 500:
        body = response.json()
        assert isinstance(body, dict) and set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert body["error"]["type"] in ERROR_TYPES_4XX, body


def _call(server, operation, case) -> None:
    response = case.call_and_validate(
        base_url=server.url,
        headers=auth(server.admin_key),
        checks=[not_a_server_error, openai_error_shape],
        timeout=60,
    )
    server.stats["schemathesis_cases"] += 1
    server.stats[f"op:{operation.label}"] += 1
    server.stats[f"status_{response.status_code}"] += 1
    server.stats["server_errors_5xx"] += response.status_code >= 500


def _fuzz_operation(server, operation, mode: GenerationMode) -> None:
    """Hypothesis over one operation's generated cases (valid or invalid per ``mode``)."""

    @settings(
        max_examples=OPENAPI_EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        _call(server, operation, case)

    run()


def _coverage_cases(schema, operation) -> list:
    """schemathesis's deterministic coverage phase: boundary values, each wrong type per
    field, missing required fields, unexpected methods."""
    config = schema.config.generation_for(operation=operation)
    return list(
        schema.iter_coverage_cases(
            operation, generation_modes=list(GenerationMode), generation_config=config
        )
    )


def test_openapi_fuzz_gets_no_server_errors(fuzz_server) -> None:
    """schemathesis over every operation of the live server's /openapi.json, with valid and
    invalid inputs and an admin key: no 5xx, every 4xx in OpenAI's shape; then still serving."""
    stats = fuzz_server.stats
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    failures: dict[str, str] = {}
    labels = []
    for result in schema.get_all_operations():
        operation = result.ok()
        labels.append(operation.label)
        try:
            for case in _coverage_cases(schema, operation):
                stats["schemathesis_coverage_cases"] += 1
                _call(fuzz_server, operation, case)
        except Exception as e:
            failures[f"{operation.label} (coverage)"] = f"{type(e).__name__}: {e}"[:3000]
        # a free-form path string cannot be made invalid: negative cases need a body or query
        negative = len(operation.body) + len(operation.query) > 0
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)[: 1 + negative]:
            try:
                _fuzz_operation(fuzz_server, operation, mode)
            except Unsatisfiable:  # nothing to make invalid (no parameters, free-form strings)
                continue
            except Exception as e:  # one operation's failure must not hide the others'
                failures[f"{operation.label} ({mode.value})"] = f"{type(e).__name__}: {e}"[:3000]
    statuses = {k[7:]: v for k, v in stats.items() if k.startswith("status_")}
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
    paths = httpx.get(f"{fuzz_server.url}/openapi.json").json()["paths"]
    assert len(labels) == sum(len(ops) for ops in paths.values()) >= 12
    assert all(stats[f"op:{label}"] > 0 for label in labels)  # every operation was called
    # the key was sent (no 401 at all) and routes were really exercised (some 200s)
    assert "401" not in statuses and statuses.get("200", 0) > 0
    assert stats["server_errors_5xx"] == 0
    assert_healthy(fuzz_server)
