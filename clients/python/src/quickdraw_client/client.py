"""The blocking client, and what the asyncio one shares with it: retries, deadlines, request building, errors.

    from quickdraw_client import QuickDrawClient
    with QuickDrawClient("localhost:50051") as client:
        [result] = client.classify([bitmap_28x28_uint8], top_k=3)
        print(result.top)       # [('cat', 0.96), ('sun', 0.01), ('train', 0.00)]
        print(result.known)     # True, False ("I don't know this one"), or None (the model makes no such decision)
        for item in client.classify_stream(drawings):   # numpy arrays, image bytes or strokes, as many as you like
            print(item.result or item.error)

UNAVAILABLE is retried with exponential backoff by gRPC's own retry policy (a service config, throttled by
``retryThrottling``), which is safe because classification has no side effects; RESOURCE_EXHAUSTED (an
overloaded gateway or TF Serving) is not retried. Every unary call has a deadline (``timeout_s``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

from quickdraw_client.drawings import D, DrawingLike, Result, StreamItem, to_drawing
from quickdraw_client.security import ClientSecurity
from quickdraw_client.v1 import classifier_pb2 as pb
from quickdraw_client.v1 import classifier_pb2_grpc as pb_grpc

DEFAULT_TARGET = "localhost:50051"
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
STATUS_DETAILS_KEY = "grpc-status-details-bin"

#: gRPC's retryThrottling (gRFC A6): each failed attempt takes a token, each success gives back 0.1; retries stop
#: while half or fewer of the 10 tokens are left. A fleet-wide outage therefore costs about one attempt per call,
#: not max_attempts (no retry storm on top of the gateway's own retries towards TF Serving).
RETRY_THROTTLING = {"maxTokens": 10, "tokenRatio": 0.1}


def retry_service_config(max_attempts: int = DEFAULT_MAX_ATTEMPTS, initial_backoff_s: float = 0.1,
                         max_backoff_s: float = 2.0) -> str:  # fmt: skip
    """gRPC service config that retries UNAVAILABLE with exponential backoff (and nothing else: not
    RESOURCE_EXHAUSTED, the answer of an overloaded gateway or TF Serving), throttled by ``RETRY_THROTTLING``."""
    return json.dumps({
        "methodConfig": [{
            "name": [{"service": "quickdraw.v1.Classifier"}],
            "retryPolicy": {
                "maxAttempts": max_attempts,
                "initialBackoff": f"{initial_backoff_s}s",
                "maxBackoff": f"{max_backoff_s}s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }],
        "retryThrottling": RETRY_THROTTLING,
    })  # fmt: skip


def channel_options(max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:  # fmt: skip
    """Channel options: message size limits, and the retry policy (``max_attempts`` 1 turns retries off)."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
    if max_attempts > 1:  # gRPC's retry policy needs at least 2 attempts; 1 means no retries
        return [*options, ("grpc.service_config", retry_service_config(max_attempts)), ("grpc.enable_retries", 1)]
    return [*options, ("grpc.enable_retries", 0)]


def build_request(
    drawings: Iterable[DrawingLike], *, top_k: int = 3, version: int | None = None, raw: bool = False
) -> pb.ClassifyRequest:
    """A ClassifyRequest for ``drawings`` (any form :func:`quickdraw_client.to_drawing` takes)."""
    return pb.ClassifyRequest(
        drawings=[to_drawing(d, raw) for d in drawings],
        top_k=top_k,
        model=pb.ModelSpec(version=version) if version else None,
    )


def results_of(response: pb.ClassifyResponse) -> list[Result]:
    """One Result per drawing of a ClassifyResponse, in request order."""
    return [Result.of(p, response.model_version) for p in response.predictions]


def status_code_name(code: int) -> str:
    """``3`` -> ``"INVALID_ARGUMENT"``."""
    return next((c.name for c in grpc.StatusCode if c.value[0] == code), str(code))


def describe_status(status: status_pb2.Status) -> str:
    """``CODE: message``, then one indented line per field violation (google.rpc.BadRequest)."""
    lines = [f"{status_code_name(status.code)}: {status.message}"]
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            detail.Unpack(br)
            lines += [f"  {v.field}: {v.description}" for v in br.field_violations]
    return "\n".join(lines)


def describe_error(err: grpc.RpcError) -> str:
    """A failed call (blocking or asyncio) described as ``CODE: message`` plus its field violations."""
    code, details = err.code(), err.details()  # type: ignore[attr-defined]
    status = status_pb2.Status(code=code.value[0] if code else 2, message=details or "")
    trailing = err.trailing_metadata() or ()  # type: ignore[attr-defined]
    for key, value in trailing:
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            parsed = status_pb2.Status.FromString(value)
            status.details.extend(parsed.details)
    return describe_status(status)


def stream_item(drawing: D, answer: pb.ClassifyStreamResponse) -> StreamItem[D]:
    """A ClassifyStreamResponse (for a one-drawing request) as a StreamItem."""
    if answer.HasField("response"):
        return StreamItem(drawing, results_of(answer.response)[0])
    return StreamItem(drawing, None, describe_status(answer.error))


class QuickDrawClient:
    """Blocking client for ``quickdraw.v1.Classifier``; thread-safe, one channel."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        channel: grpc.Channel | None = None,
        security: ClientSecurity | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        security = security or ClientSecurity()
        self._metadata = security.metadata()  # the bearer token, sent with every call
        self._channel = channel or security.channel(target, channel_options(max_attempts, max_message_bytes))
        self._stub = pb_grpc.ClassifierStub(self._channel)

    def classify(
        self,
        drawings: Iterable[DrawingLike],
        *,
        top_k: int = 3,
        version: int | None = None,
        raw: bool = False,
        timeout_s: float | None = None,
    ) -> list[Result]:
        """Classify drawings in one call; raises ``grpc.RpcError`` with the server's status on failure."""
        return results_of(self.classify_request(build_request(drawings, top_k=top_k, version=version, raw=raw),
                                                timeout_s))  # fmt: skip

    #: Build a ClassifyRequest (see :func:`build_request`).
    request = staticmethod(build_request)

    def classify_request(self, request: pb.ClassifyRequest, timeout_s: float | None = None) -> pb.ClassifyResponse:
        """Send a prepared ClassifyRequest."""
        return self._stub.Classify(request, timeout=timeout_s or self.timeout_s, metadata=self._metadata)

    def classify_stream(
        self,
        drawings: Iterable[D],
        *,
        top_k: int = 3,
        version: int | None = None,
        raw: bool = False,
        timeout_s: float | None = None,
    ) -> Iterator[StreamItem[D]]:
        """Classify drawings over one ClassifyStream, one drawing per message, and yield each drawing (as given:
        a numpy array, image bytes or strokes) with its result as soon as it is ready, so not always in input
        order. ``drawings`` is read lazily (a generator may go on for as long as it likes); ``timeout_s`` is a
        deadline for the whole stream (default: none). A drawing the gateway refuses comes back with its error;
        a failure of the stream itself raises ``grpc.RpcError``."""
        pending: dict[str, D] = {}

        def requests() -> Iterator[pb.ClassifyStreamRequest]:
            for i, d in enumerate(drawings):
                pending[str(i)] = d
                request = build_request([d], top_k=top_k, version=version, raw=raw)  # type: ignore[list-item]
                yield pb.ClassifyStreamRequest(id=str(i), request=request)

        for answer in self.stream(((m.id, m.request) for m in requests()), timeout_s):
            yield stream_item(pending.pop(answer.id), answer)

    def stream(
        self, requests: Iterable[tuple[str, pb.ClassifyRequest]], timeout_s: float | None = None
    ) -> Iterator[pb.ClassifyStreamResponse]:
        """The raw bidirectional stream: (id, request) pairs in, answers (each with its request's id) out as they
        are ready."""
        msgs = (pb.ClassifyStreamRequest(id=i, request=r) for i, r in requests)
        return self._stub.ClassifyStream(msgs, timeout=timeout_s, metadata=self._metadata)  # type: ignore[no-any-return]

    def model_info(self, timeout_s: float | None = None) -> pb.ModelInfo:
        """The served model's name, versions, labels and limits."""
        return self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout_s or self.timeout_s,
                                       metadata=self._metadata)  # fmt: skip

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> QuickDrawClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
