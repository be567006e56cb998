"""The quickdraw.v1 Classifier over gRPC: a thin adapter over the data plane (``service.dataplane.pipeline``).

Its converter (:func:`convert_classify`) turns a ClassifyRequest (the serialized bytes gRPC received, or a parsed
message from the JSON API) into the pipeline's terms; :func:`classify_response` turns the pipeline's result into a
ClassifyResponse. Errors become status codes with rich details in ``service.frontends.grpc.calls``.

Out-of-class decision (issue 18): each prediction carries ``out_of_class`` (known = score >= threshold) when the
version that answered makes one (``ModelDescription.out_of_class``) and the backend gave its score
(``Answered.known``); otherwise it is left unset, as for every model exported before issue 18.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np

from quickdraw_client.v1 import classifier_pb2 as pb
from quickdraw_client.v1 import classifier_pb2_grpc as pb_grpc
from service.backends import OutOfClassInfo, TopK
from service.core.calls import Observed, service_error
from service.core.errors import FieldViolation, InvalidArgument, to_rpc_status
from service.core.metrics import Metrics
from service.core.streams import StreamSlots
from service.dataplane.pipeline import Call, Converted, DataPlane, DataPlaneSlot, Metadata, Result
from service.frontends.grpc.calls import Reserve, deadline, parse_message, refuse_stream, unary, windowed_answers
from service.preprocess import wire
from service.preprocess.validation import ClassifyIn, Kind, bitmaps_only, validate
from service.preprocess.wire import Wire

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Classifier"].full_name
#: An answer's bytes per drawing, besides its classes (the Prediction, its out-of-class decision).
ANSWER_BYTES_PER_DRAWING = 48
#: An answer's bytes per class given (a ScoredLabel: score, index, framing), besides the label itself.
ANSWER_BYTES_PER_CLASS = 16


def convert_classify(plane: DataPlane, request: pb.ClassifyRequest | Wire, top: wire.Spans | None = None) -> Converted:
    """A ClassifyRequest (bytes: counted on the wire, then parsed; ``top``: its top level, found already)
    validated, in the pipeline's terms. One of at most ``wire.PARSE_FIRST_BYTES`` is parsed first (its parse
    bounded by its size), and its drawings' strokes are counted on the wire only when it is more than bitmaps."""
    lim = plane.limits
    counted = not isinstance(request, bytes | memoryview)
    if not counted and len(request) > wire.PARSE_FIRST_BYTES:
        wire.check_classify(request, lim.max_drawings_per_request, lim.max_strokes, top=top)
        counted = True
    raw = request
    if isinstance(request, bytes | memoryview):  # smaller: parsed first, its parse bounded by its size
        request = parse_message(pb.ClassifyRequest, request)
    fast = bitmaps_only(request, lim)  # bitmaps of the right size only: no strokes to count
    if fast is not None:
        drawings, top_k, version = fast
    else:
        if not counted:  # strokes are counted on the wire before validation builds anything of them
            wire.check_classify(raw, lim.max_drawings_per_request, lim.max_strokes, top=top)
        req = validate(request, lim)
        drawings, top_k, version = req, req.top_k, req.version
    label = plane.model.label_chars
    answer = len(drawings.drawings if isinstance(drawings, ClassifyIn) else drawings) * (
        ANSWER_BYTES_PER_DRAWING + top_k * (label + ANSWER_BYTES_PER_CLASS))
    return Converted(drawings, version, top_k, answer)


def classify_call(plane: DataPlane, request: pb.ClassifyRequest | Wire, deadline_s: float | None,
                  reserve: Reserve | None = None, transport_deadline: bool = False,
                  metadata: Metadata | None = None) -> Call[Any]:  # fmt: skip
    """One Classify as a pipeline call: its drawings counted on the wire's top level (admission).
    ``transport_deadline``: gRPC cancels the call at its deadline (unary Classify; see ``Call``)."""
    top = None
    if isinstance(request, bytes | memoryview):
        top = wire.top_level(request, plane.limits.max_drawings_per_request)
        n, size = (0 if top is None else len(top.spans)), len(request)
    else:
        n, size = len(request.drawings), request.ByteSize()
    return Call(request, lambda r: convert_classify(plane, r, top), max(n, 1), size, deadline_s, reserve=reserve,
                transport_deadline=transport_deadline, metadata=metadata)


def classify_response(plane: DataPlane, result: Result) -> pb.ClassifyResponse:
    """The pipeline's result as a ClassifyResponse."""
    answered = result.answered
    k = result.converted.top_k or 1
    scores = answered.scores
    top = scores if isinstance(scores, TopK) else TopK.of(scores, k)
    labels = plane.model.labels
    response = pb.ClassifyResponse(model_name=plane.model.name, model_version=answered.version)
    predictions = response.predictions
    for idx, val in zip(top.indices[:, :k].tolist(), top.scores[:, :k].tolist(), strict=True):
        add = predictions.add().top.add  # built in place: no message built to be copied in
        for j, v in zip(idx, val, strict=True):
            add(label=labels[j], score=v, index=j)
    ood = plane.model.out_of_class.get(answered.version)
    if answered.known is not None and ood is not None:
        threshold = float(np.float32(ood.threshold))  # as the answer carries it: its own decision holds there
        for p, score in zip(predictions, answered.known.tolist(), strict=True):
            decision = p.out_of_class
            decision.known, decision.score, decision.threshold = score >= threshold, score, threshold
    return response


async def classify(
    plane: DataPlane, request: pb.ClassifyRequest | Wire, deadline_s: float | None, reserve: Reserve | None = None,
    transport_deadline: bool = False, metadata: Metadata | None = None,
) -> pb.ClassifyResponse:
    """Answer one ClassifyRequest through the pipeline."""
    call = classify_call(plane, request, deadline_s, reserve, transport_deadline, metadata)
    return classify_response(plane, await plane.infer(call))


def model_info(plane: DataPlane, max_message_bytes: int) -> pb.ModelInfo:
    """The GetModelInfo answer."""
    lim = plane.limits
    labels = list(plane.model.labels)
    return pb.ModelInfo(
        name=plane.model.name,
        versions=list(plane.model.versions),
        default_version=plane.model.default_version,
        labels=labels,
        input_kinds=[k.value for k in Kind],
        limits=pb.Limits(
            max_drawings_per_request=lim.max_drawings_per_request,
            max_top_k=min(lim.max_top_k, len(labels)),
            max_strokes=lim.max_strokes,
            max_points=lim.max_points,
            max_raw_coordinate=lim.max_raw_coordinate,
            max_image_bytes=lim.max_image_bytes,
            max_image_pixels=lim.max_image_pixels,
            max_message_bytes=max_message_bytes,
        ),
        backend=plane.backend_name,
        out_of_class=out_of_class_info(plane.model.ood),
    )


def out_of_class_info(ood: OutOfClassInfo | None) -> pb.OutOfClassInfo | None:
    """A version's out-of-class decision as ModelInfo gives it (None: it makes none, the field stays unset)."""
    if ood is None:
        return None
    info = pb.OutOfClassInfo(score=ood.score, threshold=ood.threshold, method=ood.method, measured_on=ood.measured_on)
    if ood.known_kept is not None:
        info.known_kept = ood.known_kept
    return info


class ClassifierService(DataPlaneSlot, pb_grpc.ClassifierServicer):
    """The gRPC adapter over the data plane."""

    def __init__(
        self, metrics: Metrics, max_message_bytes: int, streams: StreamSlots, plane: DataPlane | None = None
    ) -> None:
        self.metrics = metrics
        self._plane = plane
        self._max_message_bytes = max_message_bytes
        #: The open-stream cap this door shares with every other streaming door (service.core.streams).
        self.streams = streams

    @unary("Classify")
    async def Classify(
        self, request: pb.ClassifyRequest | bytes, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        """Classify a batch of drawings (``request`` as gRPC received it: bytes, see :func:`add_to_server`)."""
        return await classify(self.plane, request, deadline(context), transport_deadline=True,
                              metadata=context.invocation_metadata)

    @unary("GetModelInfo")
    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        """Describe the served model."""
        return model_info(self.plane, self._max_message_bytes)

    async def ClassifyStream(
        self, request_iterator: AsyncIterator[pb.ClassifyStreamRequest | bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ClassifyStreamResponse]:
        """Answer each stream message as soon as it is ready; errors are per message, with its id.

        At most ``STREAM_WINDOW`` messages and ``STREAM_WINDOW_BYTES`` of them and their answers are held per
        stream, from the moment a message is read until its answer has been handed to gRPC: a client that stops
        reading its answers stops being read, and HTTP/2 flow control pushes back on it.
        """
        if await refuse_stream(self.metrics, "ClassifyStream", self.streams, self.attached, context):
            return
        with self.streams.held():
            async for answer in self._stream(self.plane, request_iterator, context):
                yield answer

    async def _stream(
        self, plane: DataPlane, request_iterator: AsyncIterator[pb.ClassifyStreamRequest | bytes],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ClassifyStreamResponse]:
        metrics = self.metrics
        limit = deadline(context)

        async def one(msg: pb.ClassifyStreamRequest | bytes, reserve: Reserve) -> pb.ClassifyStreamResponse:
            ident = ""
            with Observed(metrics, "ClassifyStream", limit) as call:
                try:
                    if isinstance(msg, bytes):
                        raw_id, request = _stream_parts(msg)
                        ident = _utf8(raw_id, "id")
                    else:
                        ident, request = msg.id, msg.request
                    answer = await classify(plane, request, limit, reserve, metadata=context.invocation_metadata)
                    return pb.ClassifyStreamResponse(id=ident, response=answer)
                except Exception as exc:
                    err = service_error(exc)
                    call.fail(err)
                    return pb.ClassifyStreamResponse(id=ident, error=to_rpc_status(err))

        def size_of(msg: pb.ClassifyStreamRequest | bytes) -> int:
            return len(msg) if isinstance(msg, bytes) else msg.ByteSize()

        async for answer in windowed_answers(request_iterator, size_of, one):
            yield answer


def _stream_parts(raw: Wire) -> tuple[bytes, Wire]:
    try:
        return wire.stream_parts(raw)
    except wire.Malformed:
        reason = f"is not a valid {pb.ClassifyStreamRequest.DESCRIPTOR.full_name} in protobuf's wire format"
        raise InvalidArgument([FieldViolation("", reason)], f"stream message {reason}") from None


def _utf8(raw: bytes, field: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument([FieldViolation(field, "is not valid UTF-8 (a proto3 string)")]) from None


def add_to_server(service: ClassifierService, server: grpc.aio.Server) -> None:
    """Register ``quickdraw.v1.Classifier``: Classify and ClassifyStream take their requests as bytes, so the
    gateway counts drawings and strokes on the wire before parsing (``service.preprocess.wire``)."""
    handlers = {
        "Classify": grpc.unary_unary_rpc_method_handler(
            service.Classify, request_deserializer=None, response_serializer=pb.ClassifyResponse.SerializeToString
        ),
        "ClassifyStream": grpc.stream_stream_rpc_method_handler(
            service.ClassifyStream, request_deserializer=None,
            response_serializer=pb.ClassifyStreamResponse.SerializeToString,
        ),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            service.GetModelInfo, request_deserializer=pb.GetModelInfoRequest.FromString,
            response_serializer=pb.ModelInfo.SerializeToString,
        ),
    }  # fmt: skip
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
