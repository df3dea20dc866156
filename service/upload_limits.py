"""How large a request body may be, route by route.

Every route: ``CASCADE_MAX_BODY_BYTES`` (64 KiB) of JSON or form fields. The routes that take an
input image allow ``CASCADE_MAX_IMAGE_BYTES`` of image file on top: base64 in JSON on
``/v1/generate`` (4/3 of the file, plus room for line breaks and a ``data:`` prefix), a file part
on the multipart OpenAI routes. RequestMiddleware refuses a body over its route's total before
anything parses it (413); once parsed, ``check_fields_size`` holds the fields to theirs, so a
request without an image still gets the JSON limit, and the image is held to its own
(``image_input.check_file_size``).
"""

from __future__ import annotations

import math
from typing import Any

from service.errors import BodyTooLarge
from service.settings import Settings

JSON_IMAGE_PATHS = frozenset({"/v1/generate"})
FORM_IMAGE_PATHS = frozenset({"/v1/images/edits", "/v1/images/variations"})
# base64 wrapped in lines (JSON-escaped \n) and a data: URL prefix: a few percent over 4/3
_BASE64_SLACK = 1.05


def base64_length(size: int) -> int:
    """Characters of ``size`` bytes in padded base64."""
    return 4 * math.ceil(size / 3)


def route_limits(settings: Settings) -> dict[str, tuple[int, str]]:
    """path -> (largest body, the 413 message) for the routes whose limit is not the default."""
    fields = settings.max_body_bytes
    image = settings.max_image_bytes
    json_total = fields + math.ceil(base64_length(image) * _BASE64_SLACK)
    form_total = fields + image
    limits: dict[str, tuple[int, str]] = {}
    for path in JSON_IMAGE_PATHS:
        limits[path] = (json_total, _message(json_total, "in base64, 4/3 of it", settings))
    for path in FORM_IMAGE_PATHS:
        limits[path] = (form_total, _message(form_total, "as a file part", settings))
    return limits


def _message(total: int, how: str, settings: Settings) -> str:
    return (
        f"the request body is larger than {total} bytes: an image file of up to "
        f"{settings.max_image_bytes} bytes (CASCADE_MAX_IMAGE_BYTES; {how}) plus "
        f"{settings.max_body_bytes} bytes of other fields (CASCADE_MAX_BODY_BYTES); send a "
        "smaller image"
    )


def body_bytes(request: Any) -> int:
    """The size of a request's body, as RequestMiddleware counted it (``request.state``)."""
    return int(getattr(request.state, "body_bytes", 0))


def check_fields_size(body_bytes: int, image_chars: int | None, settings: Settings) -> None:
    """The fields of a parsed body besides the image (``body_bytes`` less the ``image_chars`` the
    image took; None: the request has no image) within CASCADE_MAX_BODY_BYTES; 413 otherwise.
    The image file itself is held to CASCADE_MAX_IMAGE_BYTES where its decoded size is known
    (``image_input.check_file_size``)."""
    rest = body_bytes - (image_chars or 0)
    if rest <= settings.max_body_bytes:
        return
    if image_chars is None:
        raise BodyTooLarge(
            f"the request body is larger than {settings.max_body_bytes} bytes "
            "(CASCADE_MAX_BODY_BYTES; only an image may take more); send a smaller body"
        )
    raise BodyTooLarge(
        f"the fields besides the image take {rest} bytes, more than {settings.max_body_bytes} "
        "bytes (CASCADE_MAX_BODY_BYTES); send shorter fields"
    )


def oversized(
    path: str, body_bytes: int, parsed: object, settings: Settings
) -> BodyTooLarge | None:
    """For a JSON body that failed validation: the 413 it deserves first, when it is over the
    limit for what it holds (an image string counts apart), else None."""
    if path not in JSON_IMAGE_PATHS or body_bytes <= settings.max_body_bytes:
        return None
    image = parsed.get("image") if isinstance(parsed, dict) else None
    try:
        check_fields_size(body_bytes, len(image) if isinstance(image, str) else None, settings)
    except BodyTooLarge as exc:
        return exc
    return None
