"""One error hierarchy for the gateway, each class carrying its gRPC status code, and the one place that
turns an error into a rich ``google.rpc.Status`` (with ``BadRequest`` field violations where there are any)
and into an HTTP status.

Handlers raise these; ``service.api`` converts them with :func:`to_rpc_status` for unary calls and for the
per-message errors of the stream, so both carry the same code, message and details; ``service.http`` sends the
same status as JSON with the HTTP status from :func:`http_status`. Both mappings live in one table, ``_CODES``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2


@dataclass(frozen=True)
class FieldViolation:
    """One bad field: its path in the request (``drawings[2].strokes.strokes[0].x``) and what limit it broke."""

    field: str
    description: str


class ServiceError(Exception):
    """Base class: an error with a gRPC status code and a message a developer can act on.

    ``http_status`` overrides the HTTP status the code maps to, for the errors only HTTP tells apart (408, 413,
    415, 421).
    """

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    http_status: int | None = None
    #: Who caused it: "client" (a bad, oversized, unauthenticated, cancelled or too-short-deadline call) or
    #: "server". Only server faults feed the error-ratio alert (``quickdraw_request_errors_total{fault}``).
    fault: str = "server"

    def __init__(self, message: str, *, fault: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if fault is not None:
            self.fault = fault


class InvalidArgument(ServiceError):
    """The request is malformed or breaks a limit; carries field violations."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    fault = "client"

    def __init__(self, violations: Sequence[FieldViolation], message: str | None = None) -> None:
        self.violations = list(violations)
        if message is None:
            first = self.violations[0]
            more = f" (and {len(self.violations) - 1} more)" if len(self.violations) > 1 else ""
            message = f"{first.field}: {first.description}{more}" if first.field else f"{first.description}{more}"
        super().__init__(message)


class NotFound(ServiceError):
    """The requested model version is not served."""

    code = grpc.StatusCode.NOT_FOUND
    fault = "client"


class ResourceExhausted(ServiceError):
    """The queue is full; the call was refused at once and may be retried later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PayloadTooLarge(ResourceExhausted):
    """An HTTP request body over the size limit (gRPC refuses such a message with RESOURCE_EXHAUSTED too)."""

    http_status = 413
    fault = "client"


class DeadlineExceeded(ServiceError):
    """The call's deadline passed before the backend could run it (the caller's deadline: a client fault)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    fault = "client"


class RequestTimeout(DeadlineExceeded):
    """An HTTP request body that did not arrive within the body timeout (HTTP 408; the client's fault)."""

    http_status = 408


class UnsupportedMediaType(InvalidArgument):
    """An HTTP request body of a Content-Type or Content-Encoding the API does not take (HTTP 415)."""

    http_status = 415

    def __init__(self, header: str, message: str) -> None:
        super().__init__([FieldViolation(f"{header} header", message)], message)


class PermissionDenied(ServiceError):
    """The caller may not make this call: over HTTP, a browser request from an Origin not allowed (403)."""

    code = grpc.StatusCode.PERMISSION_DENIED
    fault = "client"


class MisdirectedRequest(PermissionDenied):
    """An HTTP request for a Host the gateway does not answer to (HTTP 421; a DNS-rebinding guard)."""

    http_status = 421


class Cancelled(ServiceError):
    """The client cancelled the call."""

    code = grpc.StatusCode.CANCELLED
    fault = "client"


class Unavailable(ServiceError):
    """The service is not ready (model loading) or is shutting down; safe to retry elsewhere."""

    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(ServiceError):
    """The call has no valid credentials (bearer token or client certificate); the message never echoes them."""

    code = grpc.StatusCode.UNAUTHENTICATED
    fault = "client"


class BackendError(ServiceError):
    """The backend failed on a batch; only that batch's calls see it."""

    code = grpc.StatusCode.INTERNAL


#: Most field violations an answer carries; the rest are counted in one last violation.
MAX_VIOLATIONS = 100
#: Longest field path or description echoed back, and longest status message (requests can hold huge strings,
#: and gRPC's trailers are small: a 3 MB output_filter once became a 5 MB grpc-message).
MAX_FIELD_CHARS = 200
MAX_DESCRIPTION_CHARS = 300
MAX_MESSAGE_CHARS = 1000


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, marked with how much was cut."""
    if len(text) <= limit:
        return text
    note = f"... ({len(text) - limit} more characters)"
    return text[: max(0, limit - len(note))] + note


def capped_violations(violations: Sequence[FieldViolation]) -> list[FieldViolation]:
    """At most ``MAX_VIOLATIONS`` violations, each clipped; the rest summed up in a last one."""
    out = [FieldViolation(clip(v.field, MAX_FIELD_CHARS), clip(v.description, MAX_DESCRIPTION_CHARS))
           for v in violations[:MAX_VIOLATIONS]]  # fmt: skip
    if len(violations) > MAX_VIOLATIONS:
        out.append(FieldViolation("", f"and {len(violations) - MAX_VIOLATIONS} more violations not listed "
                                      f"(at most {MAX_VIOLATIONS} are)"))  # fmt: skip
    return out


def to_rpc_status(error: ServiceError) -> status_pb2.Status:
    """The ``google.rpc.Status`` for an error, with a ``BadRequest`` detail for field violations.

    Bounded whatever the request held: at most ``MAX_VIOLATIONS`` violations, each text clipped.
    """
    status = status_pb2.Status(code=_CODES[error.code][0], message=clip(error.message, MAX_MESSAGE_CHARS))
    if isinstance(error, InvalidArgument):
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                    for v in capped_violations(error.violations)
                ]
            )
        )
        status.details.append(detail)
    return status


def http_status(error: ServiceError) -> int:
    """The HTTP status for an error: the one its gRPC code maps to, as google.rpc.Code documents them."""
    return error.http_status or _CODES[error.code][1]


#: Each gRPC status code: its google.rpc.Code number and its HTTP status (the mapping in google/rpc/code.proto).
_CODES: dict[grpc.StatusCode, tuple[int, int]] = {
    sc: (getattr(code_pb2, sc.name), http)
    for sc, http in {
        grpc.StatusCode.OK: 200,
        grpc.StatusCode.CANCELLED: 499,
        grpc.StatusCode.UNKNOWN: 500,
        grpc.StatusCode.INVALID_ARGUMENT: 400,
        grpc.StatusCode.DEADLINE_EXCEEDED: 504,
        grpc.StatusCode.NOT_FOUND: 404,
        grpc.StatusCode.ALREADY_EXISTS: 409,
        grpc.StatusCode.PERMISSION_DENIED: 403,
        grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
        grpc.StatusCode.FAILED_PRECONDITION: 400,
        grpc.StatusCode.ABORTED: 409,
        grpc.StatusCode.OUT_OF_RANGE: 400,
        grpc.StatusCode.UNIMPLEMENTED: 501,
        grpc.StatusCode.INTERNAL: 500,
        grpc.StatusCode.UNAVAILABLE: 503,
        grpc.StatusCode.DATA_LOSS: 500,
        grpc.StatusCode.UNAUTHENTICATED: 401,
    }.items()
}
