"""Schema fuzzing: Schemathesis generates schema-valid and schema-violating requests for every route from
the app's own /openapi.json (which carries the loaded model's limits) and sends them to a real uvicorn
server (tiny model, tight limits). Every response must conform to the documented schema (status, content
type, headers, body); schema-violating requests must be refused (422 on our routes, 400 on the OpenAI
ones) and schema-valid ones accepted; no 5xx.

More than 1,000 requests in all; derandomized, so a failure is reproducible run to run."""

from __future__ import annotations

from collections import Counter

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

# (mode, examples) per operation label; GET routes have no parameters, so few distinct examples exist.
BUDGET = {
    "POST /v1/generate": [(GenerationMode.POSITIVE, 150), (GenerationMode.NEGATIVE, 870)],
    # The OpenAI route refuses schema-violating bodies with 400 (its client's BadRequestError).
    "POST /v1/images/generations": [(GenerationMode.POSITIVE, 40), (GenerationMode.NEGATIVE, 120)],
}
GET_BUDGET = [(GenerationMode.POSITIVE, 25)]
MIN_TOTAL_REQUESTS = 1000

# not_a_server_error is replaced by the stricter assertion in `check`, which allows exactly one 5xx: the
# documented 504 for a request whose own timeout_s is shorter than any generation.
EXCLUDED = [not_a_server_error]


def _asked_for_tiny_deadline(case) -> bool:
    timeout = case.body.get("timeout_s") if isinstance(case.body, dict) else None
    return isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and 0 < timeout < 1.0


def _run(operation, mode: GenerationMode, examples: int, url: str, session, seen: Counter) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
    )
    def check(case) -> None:
        response = case.call(base_url=url, session=session, timeout=30)
        seen[(operation.label, response.status_code)] += 1
        if response.status_code == 504 and _asked_for_tiny_deadline(case):
            # The client gave itself a deadline shorter than one generation: 504 is the documented answer.
            assert response.json()["error"]["code"] == "deadline_exceeded"
        else:
            assert response.status_code < 500, (response.status_code, response.text[:500])
        case.validate_response(response, excluded_checks=EXCLUDED)

    check()


@pytest.mark.slow
def test_schemathesis_every_route(live_server) -> None:
    schema = schemathesis.openapi.from_url(live_server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /v1/generate", "GET /health/live", "GET /health/ready", "GET /metrics"} <= labels
    assert {"POST /v1/images/generations", "GET /v1/models", "GET /v1/models/{model_id}"} <= labels
    seen: Counter = Counter()
    with requests.Session() as session:
        for operation in operations:
            for mode, examples in BUDGET.get(operation.label, GET_BUDGET):
                _run(operation, mode, examples, live_server.url, session, seen)
    total = sum(seen.values())
    summary = ", ".join(f"{label} {status}: {n}" for (label, status), n in sorted(seen.items()))
    print(f"schemathesis: {total} requests: {summary}")
    assert total >= MIN_TOTAL_REQUESTS, summary
    # The generator must have reached the model, not only the validators.
    assert seen[("POST /v1/generate", 200)] >= 50, summary
    assert seen[("POST /v1/images/generations", 200)] >= 15, summary
