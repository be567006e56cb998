"""One error hierarchy for the gateway, each class carrying its gRPC status code, and the one place that
turns an error into a rich ``google.rpc.Status`` (with ``BadRequest`` field violations where there are any)
and into an HTTP status.

Handlers raise these; ``service.frontends.grpc.classifier`` converts them with :func:`to_rpc_status` for unary calls
and for the
per-message errors of the stream, so both carry the same code, message and details; ``service.frontends.http.server``
sends the
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
#: Most bytes of the serialized google.rpc.Status (gRPC's ``grpc-status-details-bin`` trailer, which repeats the
#: message). gRPC's PROTOCOL-HTTP2.md suggests clients limit trailers to 8 KiB, and gRPC core's default soft limit
#: (``grpc.max_metadata_size``) rejects trailers past 8 KiB at random: 100 violations of 250 bad bitmaps made an
#: 8.6 KB trailer that a default client sometimes got as RESOURCE_EXHAUSTED ("Stream removed") instead of the
#: INVALID_ARGUMENT. This leaves room for ``grpc-message`` (at most ``MAX_MESSAGE_CHARS``, percent-encoded).
MAX_STATUS_BYTES = 4096
#: What one more listed violation costs in the BadRequest beyond its own fields (tag and length bytes), and the
#: room kept for the Any wrapper and the closing "and N more" violation.
_VIOLATION_OVERHEAD_BYTES = 4
_DETAIL_ROOM_BYTES = 200


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, marked with how much was cut."""
    if len(text) <= limit:
        return text
    note = f"... ({len(text) - limit} more characters)"
    return text[: max(0, limit - len(note))] + note


def to_rpc_status(error: ServiceError) -> status_pb2.Status:
    """The ``google.rpc.Status`` for an error, with a ``BadRequest`` detail for field violations.

    Bounded whatever the request held: each text clipped, and at most ``MAX_VIOLATIONS`` violations, fewer where
    they would take the status past ``MAX_STATUS_BYTES``; the rest are counted in one last violation.
    """
    status = status_pb2.Status(code=_CODES[error.code][0], message=_clip_utf8(clip(error.message, MAX_MESSAGE_CHARS)))
    if isinstance(error, InvalidArgument):
        budget = MAX_STATUS_BYTES - status.ByteSize() - _DETAIL_ROOM_BYTES
        listed: list[error_details_pb2.BadRequest.FieldViolation] = []
        for v in error.violations[:MAX_VIOLATIONS]:
            fv = error_details_pb2.BadRequest.FieldViolation(
                field=clip(v.field, MAX_FIELD_CHARS), description=clip(v.description, MAX_DESCRIPTION_CHARS)
            )
            budget -= fv.ByteSize() + _VIOLATION_OVERHEAD_BYTES
            if budget < 0:
                break
            listed.append(fv)
        rest = len(error.violations) - len(listed)
        if rest:
            listed.append(error_details_pb2.BadRequest.FieldViolation(
                description=f"and {rest} more violations not listed (at most {MAX_VIOLATIONS}, in at most "
                            f"{MAX_STATUS_BYTES} bytes, are)"))  # fmt: skip
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.BadRequest(field_violations=listed))
        status.details.append(detail)
    return status


def _clip_utf8(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` cut to at most ``limit`` bytes of UTF-8 (a message of multi-byte characters may not fill the
    trailers with ``MAX_MESSAGE_CHARS`` characters of up to 4 bytes each)."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    return data[:limit].decode("utf-8", "ignore")


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
