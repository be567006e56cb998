"""``inference.GRPCInferenceService`` on the gateway's gRPC port: the Open Inference Protocol (KServe v2).

ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer, and Triton's ModelStreamInfer
(each request answered by one ``ModelStreamInferResponse``, with ``error_message`` set instead of failing the
stream, as Triton does), ModelConfig and ModelStatistics (Triton's extensions, for perf_analyzer and Model
Analyzer). The model and its errors are ``service.frontends.oip.core``'s. ModelInfer takes its request as
bytes, counted on the wire before parsing (:func:`check_infer`), as Predict and Classify do, when it is larger
than ``wire.PARSE_FIRST_BYTES`` (a smaller one is parsed first, its parse bounded by its size, and counted by
:func:`to_call` with the same errors); its answer puts
every output in ``raw_output_contents``, as Triton does. Latency is recorded by method (``ModelInfer``,
``ModelStreamInfer``, ...) and code, as for the other APIs.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format

from service.core.calls import Observed, service_error
from service.core.errors import MAX_MESSAGE_CHARS, FieldViolation, InvalidArgument, ServiceError, clip
from service.core.metrics import Metrics
from service.core.streams import StreamSlots
from service.dataplane.pipeline import Call, Converted, Metadata
from service.frontends.grpc.calls import Reserve, deadline, parse_message, refuse_stream, unary, windowed_answers
from service.frontends.oip.core import (
    CLASSIFICATION,
    IMAGE,
    InferAnswer,
    InferCall,
    InputTensor,
    OutputRequest,
    Surface,
)
from service.preprocess import wire
from service.protos import oip

#: Most inputs, requested outputs and raw_input_contents entries a ModelInferRequest may hold (one input is used).
MAX_TENSORS = 16
#: The most bytes a tensor's packed shape may take: ``MAX_TENSOR_DIMS`` dims of at most 10 bytes each.
MAX_SHAPE_BYTES = 10 * wire.MAX_TENSOR_DIMS


def check_infer(buf: bytes | memoryview, max_drawings: int) -> None:
    """Refuse a serialized ModelInferRequest with far more inputs, outputs or BYTES elements than any real one has,
    before parsing it (``service.preprocess.wire``: a small request of a million empty elements parses into a million
    objects)."""
    others = wire.MAX_OTHER_FIELDS + 3 * MAX_TENSORS
    try:  # one walk of the top level for the three repeated fields, one per input for its shape and contents
        found, n = wire.scan_fields(buf, 0, len(buf), (5, 6, 7), MAX_TENSORS, others)
        for spans, what in zip(found, ("inputs", "outputs", "raw_input_contents"), strict=True):
            if len(spans) > MAX_TENSORS:
                raise wire.too_many(what, "entries", MAX_TENSORS)
        if n > others:  # the scan stopped early: what follows was not counted (81 empty ids did it)
            raise wire.hand_made("request", others)
        for i, (a, b) in enumerate(found[0]):
            # InferInputTensor.shape (packed) and .contents
            (shapes, contents), n = wire.scan_fields(buf, a, b, (3, 5), 4, wire.MAX_OTHER_FIELDS)
            if len(shapes) > 4 or any(b2 - a2 > MAX_SHAPE_BYTES for a2, b2 in shapes):
                raise wire.too_many(f"inputs[{i}].shape", "dimensions", wire.MAX_TENSOR_DIMS)
            if len(contents) > 4 or n > wire.MAX_OTHER_FIELDS:
                raise wire.hand_made(f"inputs[{i}]", wire.MAX_OTHER_FIELDS)
            for a2, b2 in contents:
                elements = wire.scan(buf, a2, b2, 8, wire.SCAN_FACTOR * max_drawings)  # bytes_contents
                if len(elements.spans) > wire.SCAN_FACTOR * max_drawings:
                    raise wire.too_many("inputs.contents.bytes_contents", "elements", max_drawings,
                                        "max_drawings_per_request")  # fmt: skip
    except wire.Malformed:
        return


def request_id(buf: bytes | memoryview) -> str:
    """A ModelInferRequest's ``id`` (field 3) read from its wire bytes within the first fields, as check_infer
    bounds them, without parsing the rest: what an error answer on the stream needs ("" if not found there)."""
    spans = wire.scan(buf, 0, len(buf), 3, 1, wire.MAX_OTHER_FIELDS + 3 * MAX_TENSORS)
    if not spans.spans:
        return ""
    a, b = spans.spans[-1]
    return bytes(buf[a:b]).decode("utf-8", "replace")


def _parameter(p: Any) -> Any:
    """An ``InferParameter``'s value (None when unset)."""
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def to_call(request: Any, max_drawings: int) -> InferCall:
    """A parsed ModelInferRequest as the shared ``InferCall``; raw_input_contents matched to inputs in order.

    Counts what :func:`check_infer` counts, with its errors, so a request parsed before it was counted (at most
    ``wire.PARSE_FIRST_BYTES``: its parse was bounded by its size) is held to the same limits."""
    raw = list(request.raw_input_contents)
    tensors = request.inputs
    asked = request.outputs
    if len(tensors) > MAX_TENSORS or len(asked) > MAX_TENSORS or len(raw) > MAX_TENSORS:
        what = next(w for w, n in (("inputs", len(tensors)), ("outputs", len(asked)), ("raw_input_contents", len(raw)))
                    if n > MAX_TENSORS)  # fmt: skip
        raise wire.too_many(what, "entries", MAX_TENSORS)
    if raw and len(raw) != len(tensors):
        raise InvalidArgument(
            [FieldViolation("raw_input_contents", f"{len(raw)} entries for {len(tensors)} inputs; give one "
                                                  "per input, in order, or none")],
            f"expected {len(tensors)} raw_input_contents (one per input), got {len(raw)}",
        )  # fmt: skip
    inputs = []
    for i, t in enumerate(tensors):
        shape = list(t.shape)
        if len(shape) > wire.MAX_TENSOR_DIMS:
            raise wire.too_many(f"inputs[{i}].shape", "dimensions", wire.MAX_TENSOR_DIMS)
        tensor = InputTensor(t.name, t.datatype, shape)
        has_contents = t.HasField("contents")
        if has_contents and len(t.contents.bytes_contents) > wire.SCAN_FACTOR * max_drawings:
            raise wire.too_many("inputs.contents.bytes_contents", "elements", max_drawings,
                                "max_drawings_per_request")  # fmt: skip
        if raw:
            if has_contents:
                raise InvalidArgument(
                    [FieldViolation(f"inputs[{t.name}].contents", "set with raw_input_contents; use one or the other")],
                    f"contents field must not be specified when using raw_input_contents for '{t.name}'",
                )  # fmt: skip
            tensor.raw = raw[i]
        elif t.datatype == "BYTES":
            tensor.values = list(t.contents.bytes_contents)
        elif t.datatype == "UINT8":
            tensor.values = np.asarray(t.contents.uint_contents, np.int64)
        inputs.append(tensor)
    outputs = None
    if asked:
        outputs = []
        for o in asked:
            parameters = o.parameters
            k = _parameter(parameters[CLASSIFICATION]) if parameters and CLASSIFICATION in parameters else 0
            if isinstance(k, bool) or not isinstance(k, int):
                raise InvalidArgument([FieldViolation(f"outputs[{o.name}].parameters[{CLASSIFICATION}]",
                                                      f"is {k!r}; expected an integer class count")])  # fmt: skip
            outputs.append(OutputRequest(o.name, k))
    parameters = request.parameters
    params = {key: _parameter(p) for key, p in parameters.items()} if parameters else {}
    return InferCall(request.model_name, request.model_version, request.id, inputs, outputs, params)


def fast_convert(request: Any, surface: Surface) -> Converted | None:
    """The commonest ModelInferRequest converted without an ``InferCall`` (``Surface.convert_image``): one input,
    ``image`` UINT8 in one raw_input_contents entry, no parameters anywhere, outputs without parameters. None for
    any other request (then :func:`to_call` and ``Surface.convert`` check it and word its errors)."""
    tensors = request.inputs
    raw = request.raw_input_contents
    if len(tensors) != 1 or len(raw) != 1 or request.parameters:
        return None
    t = tensors[0]
    if t.name != IMAGE or t.datatype != "UINT8" or t.parameters or t.HasField("contents"):
        return None
    names = []
    for o in request.outputs:
        if o.parameters or len(names) == MAX_TENSORS:
            return None
        names.append(o.name)
    return surface.convert_image(request.model_name, request.model_version, request.id, raw[0], t.shape, names)


def to_response(answer: InferAnswer) -> Any:
    """The answer as a ModelInferResponse, every output in ``raw_output_contents``."""
    resp = oip.ModelInferResponse(model_name=answer.model_name, model_version=answer.model_version, id=answer.id)
    for t in answer.outputs:
        resp.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        resp.raw_output_contents.append(t.raw())
    return resp


class InferenceService:
    """The servicer; every method's latency is recorded under its own name."""

    def __init__(self, surface: Surface, streams: StreamSlots) -> None:
        self.surface = surface
        self.metrics = surface.metrics
        #: The open-stream cap ModelStreamInfer shares with ClassifyStream (service.core.streams).
        self.streams = streams

    @unary("ServerLive")
    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Live while the server answers."""
        return oip.ServerLiveResponse(live=True)

    @unary("ServerReady")
    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Ready once the model is loaded and the backend serves."""
        return oip.ServerReadyResponse(ready=self.surface.ready())

    @unary("ModelReady")
    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """The model (and version) is served and ready."""
        return oip.ModelReadyResponse(ready=self.surface.model_ready(request.name, request.version))

    @unary("ServerMetadata")
    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Name, version and the extensions offered."""
        return oip.ServerMetadataResponse(**self.surface.server_metadata())

    @unary("ModelMetadata")
    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """The model's inputs and outputs (``service.frontends.oip.core``)."""
        meta = self.surface.model_metadata(request.name, request.version)
        resp = oip.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"])
        for key in ("inputs", "outputs"):
            for t in meta[key]:
                getattr(resp, key).add(**t)
        resp.properties.update(meta["properties"])
        return resp

    @unary("ModelConfig")
    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Triton's model configuration extension (``service.frontends.oip.core``: Surface.model_config)."""
        config = self.surface.model_config(request.name, request.version)
        return json_format.ParseDict({"config": config}, oip.ModelConfigResponse())

    @unary("ModelStatistics")
    async def ModelStatistics(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Triton's statistics extension: what this gateway's inference calls did, per version."""
        stats = self.surface.model_statistics(request.name, request.version)
        return json_format.ParseDict({"model_stats": stats}, oip.ModelStatisticsResponse())

    @unary("ModelInfer")
    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Inference through the gateway (``request`` as bytes: counted on the wire first)."""
        return await self._infer(request, deadline(context), transport_deadline=True,
                                 metadata=context.invocation_metadata)

    async def _infer(self, request: bytes, deadline_s: float | None, reserve: Reserve | None = None,
                     transport_deadline: bool = False, metadata: Metadata | None = None) -> Any:
        """One ModelInferRequest (its bytes: counted on the wire when over ``wire.PARSE_FIRST_BYTES``, parsed and
        converted by the pipeline's converter, the commonest form by :func:`fast_convert`);
        ``transport_deadline``: gRPC cancels it at its deadline (unary ModelInfer; see ``Call``)."""
        surface = self.surface
        max_drawings = surface.plane.limits.max_drawings_per_request

        def converted(raw: bytes) -> Converted:
            if len(raw) > wire.PARSE_FIRST_BYTES:  # smaller: parsed first (bounded by its size), counted by to_call
                check_infer(raw, max_drawings)
            message = parse_message(oip.ModelInferRequest, raw)
            fast = fast_convert(message, surface)
            return fast if fast is not None else surface.convert(to_call(message, max_drawings))

        return to_response(await surface.infer(Call(request, converted, 1, len(request), deadline_s,
                                                    transport_deadline=transport_deadline, reserve=reserve,
                                                    metadata=metadata)))  # fmt: skip

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        """Each request answered as soon as it is ready (at most ``STREAM_WINDOW`` messages and
        ``STREAM_WINDOW_BYTES`` of them held per stream: ``windowed_answers``, shared with ClassifyStream); a failed
        one is answered with ``error_message`` (and counted by its code), the stream goes on."""
        if await refuse_stream(self.metrics, "ModelStreamInfer", self.streams, self.surface.attached, context):
            return
        with self.streams.held():
            async for answer in self._stream_infer(request_iterator, context):
                yield answer

    async def _stream_infer(self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[Any]:  # fmt: skip
        """The open stream's answers (its slot is held by :meth:`ModelStreamInfer`)."""
        limit = deadline(context)

        async def one(raw: bytes, reserve: Reserve) -> Any:
            ident = ""
            with Observed(self.metrics, "ModelStreamInfer", limit) as call:
                try:
                    inferred = await self._infer(raw, limit, reserve, metadata=context.invocation_metadata)
                    return oip.ModelStreamInferResponse(infer_response=inferred)
                except Exception as exc:
                    err: ServiceError = service_error(exc)
                    call.fail(err)
                    with contextlib.suppress(Exception):  # from the wire, bounded: never parse the refused bytes
                        ident = request_id(raw)
                    answer = oip.ModelStreamInferResponse(error_message=clip(err.message, MAX_MESSAGE_CHARS))
                    answer.infer_response.id = ident
                    return answer

        async for answer in windowed_answers(request_iterator, len, one):
            yield answer


def add_to_server(server: grpc.aio.Server, metrics: Metrics, streams: StreamSlots) -> Surface:
    """Register ``inference.GRPCInferenceService``; returns the surface to ``attach`` the gateway to once ready.
    ``streams``: the open-stream cap shared with the other streaming doors."""
    surface = Surface(metrics)
    service = InferenceService(surface, streams)
    handlers = {}
    for name, request, response, streaming in oip.METHODS:
        method = getattr(service, name)
        if streaming:
            handlers[name] = grpc.stream_stream_rpc_method_handler(
                method, request_deserializer=None, response_serializer=response.SerializeToString)
        else:  # ModelInfer takes bytes, so its tensors are counted on the wire before parsing
            deserializer = None if name == "ModelInfer" else request.FromString
            handlers[name] = grpc.unary_unary_rpc_method_handler(
                method, request_deserializer=deserializer, response_serializer=response.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(oip.SERVICE, handlers),))
    return surface
