"""Every error the service answers with: an HTTP status, a stable machine-readable ``code``, the
``reason`` label it is counted under, and a message a person can act on. app.py maps them to one
JSON envelope ``{"error": {"code", "message", "field", "request_id"}}`` in one place."""

from __future__ import annotations


class ServiceError(Exception):
    """Base class; subclasses fix ``status``, ``code`` and ``reason`` (a metric label, or None)."""

    status: int = 500
    code: str = "internal_error"
    reason: str | None = (
        None  # cascade_rejected_requests_total{reason}; None for failures after admission
    )

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def headers(self, retry_after_s: int) -> dict[str, str]:
        """Extra response headers (Retry-After for capacity problems)."""
        return {}


class InvalidRequest(ServiceError):
    status, code, reason = 422, "invalid_field", "invalid"


class InvalidJson(ServiceError):
    status, code, reason = 400, "invalid_json", "invalid"


class BodyTooLarge(ServiceError):
    status, code, reason = 413, "body_too_large", "too_large"


class ImageTooLarge(BodyTooLarge):
    """An input image file over CASCADE_MAX_IMAGE_BYTES (the rest of the body may be fine)."""

    code = "image_too_large"


class InvalidForm(ServiceError):
    """A multipart/form-data body that cannot be parsed (the routes that take an upload)."""

    status, code, reason = 400, "invalid_form", "invalid"


class Unavailable(ServiceError):
    """503: the server cannot take the request now; the client should retry (elsewhere or later)."""

    status = 503

    def headers(self, retry_after_s: int) -> dict[str, str]:
        return {"Retry-After": str(retry_after_s)}


class QueueFull(Unavailable):
    code, reason = "queue_full", "queue_full"


class NotReady(Unavailable):
    code, reason = "not_ready", "not_ready"


class Draining(Unavailable):
    code, reason = "draining", "draining"


class DeadlineExceeded(ServiceError):
    status, code, reason = 504, "deadline_exceeded", "deadline"


class ClientDisconnected(ServiceError):
    """The client went away; nobody reads this answer, but it is logged and counted (499, as
    nginx does)."""

    status, code, reason = 499, "client_disconnected", "disconnected"


class GenerationFailed(ServiceError):
    status, code = 500, "generation_failed"


class NonFiniteImage(ServiceError):
    status, code = 500, "non_finite_output"


class OutOfMemory(ServiceError):
    status, code = 500, "gpu_out_of_memory"


class InternalError(ServiceError):
    status, code = 500, "internal_error"


class Cancelled(ServiceError):
    """The job was cancelled (DELETE /v1/requests/{id}) before it finished."""

    status, code = 409, "cancelled"


class RequestIdInUse(ServiceError):
    """A client-chosen X-Request-ID names a request that is still queued or running."""

    status, code, reason = 409, "request_id_in_use", "invalid"


class NotFound(ServiceError):
    status, code = 404, "not_found"
