"""Schema fuzzing: Schemathesis generates schema-valid and schema-violating requests for every route from
the app's own /openapi.json (which carries the loaded model's limits) and sends them to a real uvicorn
server (tiny model, tight limits). Every response must conform to the documented schema (status, content
type, headers, body); schema-violating requests must be refused (422 on our routes, 400 on the OpenAI
ones) and schema-valid ones accepted; no 5xx.

The image fields get real pictures (format byte: base64, format binary: a file part): any bytes
would be schema-valid, and a server that refuses non-images must refuse them. More than 1,000
requests in all; derandomized, so a failure is reproducible run to run."""

from __future__ import annotations

import base64
import io
from collections import Counter

import jsonschema
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.checks import (
    negative_data_rejection,
    not_a_server_error,
    positive_data_acceptance,
)
from schemathesis.core.transforms import to_wire_text
from schemathesis.specs.openapi.formats import unregister_string_format

# (mode, examples) per operation label; GET routes have no parameters, so few distinct examples exist.
BUDGET = {
    "POST /v1/generate": [(GenerationMode.POSITIVE, 150), (GenerationMode.NEGATIVE, 870)],
    # The OpenAI route refuses schema-violating bodies with 400 (its client's BadRequestError).
    "POST /v1/images/generations": [(GenerationMode.POSITIVE, 40), (GenerationMode.NEGATIVE, 120)],
    # The routes that take an image (multipart); cheap images, so fewer examples.
    "POST /v1/images/edits": [(GenerationMode.POSITIVE, 30), (GenerationMode.NEGATIVE, 60)],
    "POST /v1/images/variations": [(GenerationMode.POSITIVE, 20), (GenerationMode.NEGATIVE, 40)],
}
GET_BUDGET = [(GenerationMode.POSITIVE, 25)]
# Most schema-valid /v1/generate bodies carry the optional image; text-to-image gets a pass of its
# own, so its valid requests are still exercised in number.
TEXT_ONLY = ("POST /v1/generate", GenerationMode.POSITIVE, 60)
MIN_TOTAL_REQUESTS = 1000

# not_a_server_error is replaced by the stricter assertion in `check`, which allows exactly one 5xx: the
# documented 504 for a request whose own timeout_s is shorter than any generation.
EXCLUDED = [not_a_server_error]


def _image_files() -> list[bytes]:
    """Small real pictures in every accepted format and kind (the schema's image fields say
    "a PNG, JPEG or WebP file": random bytes would be schema-valid and still refused)."""
    files = []
    for size, mode, kind in [
        ((64, 64), "RGB", "PNG"),
        ((100, 60), "RGBA", "PNG"),
        ((30, 40), "RGB", "JPEG"),
        ((128, 96), "RGB", "WEBP"),
        ((200, 130), "L", "PNG"),
    ]:
        buffer = io.BytesIO()
        Image.effect_noise(size, 60).convert(mode).save(buffer, kind)
        files.append(buffer.getvalue())
    return files


IMAGES = st.sampled_from(_image_files())
BASE64_IMAGES = st.one_of(
    IMAGES.map(lambda data: base64.b64encode(data).decode()),
    IMAGES.map(lambda data: "data:image/png;base64," + base64.b64encode(data).decode()),
)


@pytest.fixture
def image_formats():
    """Real pictures for the schema's image fields: base64 in JSON (format byte), file parts in
    forms (format binary)."""
    schemathesis.openapi.format("byte", BASE64_IMAGES)
    schemathesis.openapi.format("binary", IMAGES)
    yield
    unregister_string_format("byte")
    unregister_string_format("binary")


# The refusals of schema-valid requests the document cannot express: rules on a sum or product of
# two fields. (field, words of the message)
CROSS_FIELD = (
    ("strength", "at least 1 / prior_steps"),  # int(prior_steps x strength) >= 1 Stage C step
    ("seed", "- 1 must be <= 4294967295"),  # seed + num_images - 1 within the seed range
)


def _cross_field_refusal(response) -> bool:
    if response.status_code not in (400, 422):
        return False
    error = response.json()["error"]
    field = error.get("field", error.get("param"))
    return any(field == name and words in error["message"] for name, words in CROSS_FIELD)


FORMS = {
    "POST /v1/images/edits": "ImageEditRequest",
    "POST /v1/images/variations": "ImageVariationRequest",
}


def _valid_as_sent(case, components: dict) -> bool:
    """Whether a schema-violating multipart case is schema-valid as it travels. Every form value
    is text: a string parameter mutated into an object or a number arrives as that value's text,
    a valid string, a number mutated into the string "5" arrives as the text 5 all the same, and
    a list is one part per item, so an empty one is no part at all. Such a case breaks nothing
    once sent; Schemathesis judges it before serialization."""
    name = FORMS.get(case.operation.label)
    if name is None or not isinstance(case.body, dict):
        return False
    schema = components[name]
    sent: dict = {}
    for field, value in case.body.items():
        declared = schema["properties"].get(field, {})
        if isinstance(value, list):  # sent as one part per item: [] sends nothing
            if not value:
                continue
            (value,) = value  # (more than one part of a field is refused: never 2xx)
        if declared.get("format") == "binary":
            sent[field] = "(a file)"
            continue
        text = value if isinstance(value, str) else to_wire_text(value)
        sent[field] = _read_as(declared.get("type"), text)
    return jsonschema.Draft202012Validator(schema).is_valid(sent)


def _read_as(kind: str | None, text: str) -> object:
    """A form field's text as the server reads it for its declared type (unreadable: the text)."""
    try:
        if kind == "integer" and float(text).is_integer():
            return int(float(text))
        if kind == "number":
            return float(text)
    except ValueError:
        return text
    if kind == "boolean" and text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def _asked_for_tiny_deadline(case) -> bool:
    timeout = case.body.get("timeout_s") if isinstance(case.body, dict) else None
    return isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and 0 < timeout < 1.0


def _with_image(case) -> bool:
    return isinstance(case.body, dict) and "image" in case.body


def _without_image(case) -> bool:
    return isinstance(case.body, dict) and "image" not in case.body


def _run(
    operation,
    mode: GenerationMode,
    examples: int,
    url: str,
    session,
    seen: Counter,
    components,
    keep=None,
) -> None:
    strategy = operation.as_strategy(generation_mode=mode)

    @given(case=strategy.filter(keep) if keep is not None else strategy)
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
        if operation.label == "POST /v1/generate" and _with_image(case):
            seen[(operation.label + " with an image", response.status_code)] += 1
        if response.status_code == 504 and _asked_for_tiny_deadline(case):
            # The client gave itself a deadline shorter than one generation: 504 is the documented answer.
            assert response.json()["error"]["code"] == "deadline_exceeded"
        else:
            assert response.status_code < 500, (response.status_code, response.text[:500])
        excluded = list(EXCLUDED)
        if _cross_field_refusal(response):
            excluded.append(positive_data_acceptance)
        if response.status_code < 300 and _valid_as_sent(case, components):
            excluded.append(negative_data_rejection)
        case.validate_response(response, excluded_checks=excluded)

    check()


@pytest.mark.slow
def test_schemathesis_every_route(live_server, image_formats) -> None:
    schema = schemathesis.openapi.from_url(live_server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /v1/generate", "GET /health/live", "GET /health/ready", "GET /metrics"} <= labels
    assert {"POST /v1/images/generations", "GET /v1/models", "GET /v1/models/{model_id}"} <= labels
    assert {"POST /v1/images/edits", "POST /v1/images/variations"} <= labels
    seen: Counter = Counter()
    with requests.Session() as session:
        components = session.get(live_server.url + "/openapi.json").json()["components"]["schemas"]
        for operation in operations:
            for mode, examples in BUDGET.get(operation.label, GET_BUDGET):
                _run(operation, mode, examples, live_server.url, session, seen, components)
            if operation.label == TEXT_ONLY[0]:
                _, mode, examples = TEXT_ONLY
                _run(operation, mode, examples, live_server.url, session, seen, components,
                     keep=_without_image)  # fmt: skip
    total = sum(n for (label, _), n in seen.items() if not label.endswith(" with an image"))
    summary = ", ".join(f"{label} {status}: {n}" for (label, status), n in sorted(seen.items()))
    print(f"schemathesis: {total} requests: {summary}")
    assert total >= MIN_TOTAL_REQUESTS, summary
    # The generator must have reached the model, not only the validators.
    assert seen[("POST /v1/generate", 200)] >= 50, summary
    assert seen[("POST /v1/images/generations", 200)] >= 15, summary
    with_image = seen[("POST /v1/generate with an image", 200)]
    assert with_image >= 10 and seen[("POST /v1/generate", 200)] - with_image >= 40, summary
    assert seen[("POST /v1/images/edits", 200)] >= 10, summary
    assert seen[("POST /v1/images/variations", 200)] >= 8, summary
