"""A small typed Python client for backend teams calling the gateway.

    from service.client import QuickDrawClient
    with QuickDrawClient("localhost:50051") as client:
        [top3] = client.classify([bitmap_28x28_uint8], top_k=3)
        print(top3.top)         # [('cat', 0.93), ('dog', 0.04), ('horse', 0.01)]
        print(top3.known)       # True, False ("I don't know this one"), or None (the model makes no such decision)

A drawing may be a numpy array (28x28 or 784 uint8, as numpy_bitmap), PNG/JPEG bytes, or strokes in
Google's layout (``[[[x...], [y...]], ...]``, optionally with a third ``[t...]`` list; ``raw=True`` for screen
coordinates). UNAVAILABLE is retried with exponential backoff by gRPC's own retry policy (a service config,
with ``retryThrottling``), which is safe because classification has no side effects; RESOURCE_EXHAUSTED (an
overloaded gateway or TF Serving) is not retried; every call has a deadline.

A gateway with TLS, mTLS or a bearer token (see ``service.security``):

    from service.security import ClientSecurity
    security = ClientSecurity(ca_file="ca.pem", cert_file="client.pem", key_file="client.key", token=token)
    with QuickDrawClient("quickdraw.example:50051", security=security) as client: ...
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc
import numpy as np
from numpy.typing import NDArray

from doodle import BITMAP_PIXELS
from quickdraw.v1 import classifier_pb2 as pb
from quickdraw.v1 import classifier_pb2_grpc as pb_grpc
from service.security import ClientSecurity

StrokeList = Sequence[Sequence[Sequence[float]]]
DrawingLike = NDArray[np.uint8] | bytes | StrokeList | pb.Drawing

DEFAULT_TIMEOUT_S = 10.0


#: gRPC's retryThrottling (gRFC A6): each failed attempt takes a token, each success gives back 0.1; retries stop
#: while half or fewer of the 10 tokens are left. A fleet-wide outage therefore costs about one attempt per call,
#: not max_attempts (no retry storm on top of the gateway's own retries towards TF Serving).
RETRY_THROTTLING = {"maxTokens": 10, "tokenRatio": 0.1}


def retry_service_config(max_attempts: int = 5, initial_backoff_s: float = 0.1, max_backoff_s: float = 2.0) -> str:
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


def to_drawing(d: DrawingLike, raw: bool = False) -> pb.Drawing:
    """Any supported drawing form as a ``quickdraw.v1.Drawing``."""
    if isinstance(d, pb.Drawing):
        return d
    if isinstance(d, bytes | bytearray | memoryview):
        return pb.Drawing(image=pb.EncodedImage(data=bytes(d)))
    if isinstance(d, np.ndarray):
        if d.size != BITMAP_PIXELS:
            raise ValueError(f"a bitmap must have {BITMAP_PIXELS} pixels (28x28), got shape {d.shape}")
        return pb.Drawing(bitmap=pb.Bitmap(pixels=np.ascontiguousarray(d, dtype=np.uint8).tobytes()))
    strokes = [
        pb.Stroke(x=s[0], y=s[1], t_ms=s[2] if len(s) > 2 else ())  # Google's [[x...], [y...](, [t...])]
        for s in d
    ]
    coordinates = pb.Strokes.RAW if raw else pb.Strokes.SIMPLIFIED
    return pb.Drawing(strokes=pb.Strokes(strokes=strokes, coordinates=coordinates))


@dataclass(frozen=True)
class Result:
    """Top-k for one drawing, the model version that answered, and whether the drawing looks like one of the
    model's classes at all.

    ``known`` is True or False when the model version makes an out-of-class decision (``known_score >= threshold``),
    None when it makes none (models exported before it): then ``known_score`` and ``threshold`` are None too. When
    ``known`` is False, ``top`` holds the closest classes, not what the drawing is.
    """

    top: list[tuple[str, float]]
    model_version: int
    known: bool | None = None
    known_score: float | None = None
    threshold: float | None = None

    @staticmethod
    def of(prediction: pb.Prediction, model_version: int) -> Result:
        """A ``quickdraw.v1.Prediction`` as a Result."""
        top = [(s.label, s.score) for s in prediction.top]
        if not prediction.HasField("out_of_class"):
            return Result(top, model_version)
        ood = prediction.out_of_class
        return Result(top, model_version, ood.known, ood.score, ood.threshold)

    def __str__(self) -> str:
        best = "  ".join(f"{label} {score:.2f}" for label, score in self.top)
        if self.known is False:
            closest = f"; closest: {best}" if best else ""
            return f"not a known class (known_score {self.known_score:.2f} < {self.threshold:.2f}){closest}"
        return best


class QuickDrawClient:
    """Blocking client for ``quickdraw.v1.Classifier``; thread-safe, one channel."""

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_attempts: int = 5,
        max_message_bytes: int = 4 * 1024 * 1024,
        channel: grpc.Channel | None = None,
        security: ClientSecurity | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        security = security or ClientSecurity()
        self._metadata = security.metadata()  # the bearer token, sent with every call
        options: list[tuple[str, object]] = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        if max_attempts > 1:  # gRPC's retry policy needs at least 2 attempts; 1 means no retries
            options += [("grpc.service_config", retry_service_config(max_attempts)), ("grpc.enable_retries", 1)]
        else:
            options += [("grpc.enable_retries", 0)]
        self._channel = channel or security.channel(target, options)
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
        resp = self.classify_request(self.request(drawings, top_k=top_k, version=version, raw=raw), timeout_s)
        return [Result.of(p, resp.model_version) for p in resp.predictions]

    @staticmethod
    def request(
        drawings: Iterable[DrawingLike], *, top_k: int = 3, version: int | None = None, raw: bool = False
    ) -> pb.ClassifyRequest:
        """Build a ClassifyRequest."""
        return pb.ClassifyRequest(
            drawings=[to_drawing(d, raw) for d in drawings],
            top_k=top_k,
            model=pb.ModelSpec(version=version) if version else None,
        )

    def classify_request(self, request: pb.ClassifyRequest, timeout_s: float | None = None) -> pb.ClassifyResponse:
        """Send a prepared ClassifyRequest."""
        return self._stub.Classify(request, timeout=timeout_s or self.timeout_s, metadata=self._metadata)

    def stream(
        self, requests: Iterable[tuple[str, pb.ClassifyRequest]], timeout_s: float | None = None
    ) -> Iterator[pb.ClassifyStreamResponse]:
        """Bidirectional stream: yields answers (each with its request's id) as they are ready."""
        msgs = (pb.ClassifyStreamRequest(id=i, request=r) for i, r in requests)
        return self._stub.ClassifyStream(msgs, timeout=timeout_s, metadata=self._metadata)

    def model_info(self, timeout_s: float | None = None) -> pb.ModelInfo:
        """The served model's name, versions, labels and limits."""
        return self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout_s or self.timeout_s,
                                       metadata=self._metadata)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> QuickDrawClient:
        return self

    def __exit__(self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
        self.close()


def describe_error(err: grpc.RpcError) -> str:
    """A one-paragraph description of a failed call, with its field violations."""
    from grpc_status import rpc_status

    lines = [f"{err.code().name}: {err.details()}"]  # type: ignore[attr-defined]
    status: Any = rpc_status.from_call(err)  # type: ignore[arg-type]
    if status is not None:
        from google.rpc import error_details_pb2

        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                br = error_details_pb2.BadRequest()
                detail.Unpack(br)
                lines += [f"  {v.field}: {v.description}" for v in br.field_violations]
    return "\n".join(lines)
