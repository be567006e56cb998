"""The Open Inference Protocol (KServe v2) over HTTP/REST, on the gateway's HTTP port.

Routes (``service.frontends.http.server`` registers them beside its own; the model and its errors are
``service.frontends.oip.core``'s):

- ``GET /v2/health/live``, ``GET /v2/health/ready``: 200 when live / ready, else 503 (no credentials needed, as
  for orchestrators' probes);
- ``GET /v2``: server metadata; ``GET /v2/models/quickdraw[/versions/N]``: model metadata;
  ``GET /v2/models/quickdraw[/versions/N]/ready``: 200 when ready, else 503 (400 for an unknown model);
- ``GET /v2/models/quickdraw[/versions/N]/config``: Triton's model configuration (JSON);
  ``GET /v2/models/quickdraw[/versions/N]/stats`` and ``GET /v2/models/stats``: Triton's inference statistics;
- ``POST /v2/models/quickdraw[/versions/N]/infer``: inference, in the protocol's JSON, with the binary tensor
  data extension: a body of ``Inference-Header-Content-Length`` bytes of JSON followed by each input that has a
  ``binary_data_size`` parameter, in order; outputs asked for with ``binary_data`` (or, with none named, the
  request parameter ``binary_data_output``) come back the same way. In JSON ``data``, a BYTES element of
  ``encoded_image`` is base64 (images are not text); a ``strokes`` element is the JSON text itself.

Errors are ``{"error": "<message>"}`` (the protocol's error object) with the HTTP status of the gRPC code
(``service.core.errors.http_status``: 400 INVALID_ARGUMENT, 404 NOT_FOUND, 503 UNAVAILABLE ...); the gateway's
field violations ride along in ``details``. A path under ``/v2`` that names no route (or a method a route does not
take) gets the same JSON error object (``service.frontends.http.server``'s error middleware), never aiohttp's
text/plain. The API
routes take the same Host/Origin checks, credentials, body
limits and ``X-Server-Timeout`` deadline as ``/v1/classify``, and are counted as ``http:ModelInfer``,
``http:ModelMetadata`` and so on.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from aiohttp import web
from google.protobuf import json_format

from doodle import BITMAP_SIDE
from service.core.calls import Observed, service_error
from service.core.errors import (
    FieldViolation,
    InvalidArgument,
    PayloadTooLarge,
    ServiceError,
    Unavailable,
    http_status,
    to_rpc_status,
)
from service.frontends.http.jsonparse import refusal
from service.frontends.http.requests import deadline
from service.frontends.oip.core import (
    CLASSIFICATION,
    ENCODED_IMAGE,
    InferAnswer,
    InferCall,
    InputTensor,
    OutputRequest,
    Surface,
)
from service.preprocess import wire
from service.preprocess.validation import Limits

#: The binary tensor data extension's header: the length of the JSON part of the body.
HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_DATA_SIZE = "binary_data_size"
#: Most JSON values (numbers and strings) a body may hold before it is parsed: a full batch of JSON bitmaps.
_JSON_SLACK = 4096


def error_response(error: ServiceError) -> web.Response:
    """The protocol's error object, with the gateway's field violations as ``details``."""
    status = json_format.MessageToDict(to_rpc_status(error))
    body = {"error": status.get("message", ""), "code": error.code.name, "details": status.get("details", [])}
    headers = {"Retry-After": "1"} if error.code.name in ("UNAVAILABLE", "RESOURCE_EXHAUSTED") else None
    return web.json_response(body, status=http_status(error), headers=headers)


def add_routes(app: web.Application, server: Any) -> None:
    """Register the ``/v2`` routes on ``app`` for ``server`` (a ``service.frontends.http.server.HttpServer``: its
    ``oip`` surface,
    host checks, credentials and body limits)."""
    routes = _Routes(server)
    app.router.add_get("/v2/health/live", routes.live)
    app.router.add_get("/v2/health/ready", routes.ready)
    app.router.add_get("/v2", routes.server_metadata)
    for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        app.router.add_get(base, routes.model_metadata)
        app.router.add_get(base + "/ready", routes.model_ready)
        app.router.add_post(base + "/infer", routes.infer)
        app.router.add_get(base + "/config", routes.model_config)
        app.router.add_get(base + "/stats", routes.model_statistics)
    app.router.add_get("/v2/models/stats", routes.model_statistics)  # every model's


class _Routes:
    def __init__(self, server: Any) -> None:
        self.server = server

    @property
    def surface(self) -> Surface:
        surface = self.server.oip
        if surface is None:
            raise Unavailable("the gateway is still starting; retry shortly")
        return surface

    async def _observed(self, method: str, request: web.Request, checked: bool,
                        answer: Callable[[Observed], Awaitable[web.StreamResponse]]) -> web.StreamResponse:  # fmt: skip
        with Observed(self.server.metrics, f"http:{method}") as call:
            try:
                if checked:
                    self.server.check_host(request)
                    self.server.authorize(request)
                return await answer(call)
            except Exception as exc:
                err = service_error(exc)
                call.fail(err)
                return error_response(err)

    async def live(self, request: web.Request) -> web.StreamResponse:
        async def answer(call: Observed) -> web.StreamResponse:
            return web.json_response({"live": True})

        return await self._observed("ServerLive", request, False, answer)

    async def ready(self, request: web.Request) -> web.StreamResponse:
        async def answer(call: Observed) -> web.StreamResponse:
            ready = self.server.oip is not None and self.surface.ready()
            return web.json_response({"ready": ready}, status=200 if ready else 503)

        return await self._observed("ServerReady", request, False, answer)

    async def server_metadata(self, request: web.Request) -> web.StreamResponse:
        async def answer(call: Observed) -> web.StreamResponse:
            return web.json_response(self.surface.server_metadata())

        return await self._observed("ServerMetadata", request, True, answer)

    async def _describe(self, method: str, request: web.Request,
                        describe: Callable[[Surface, str, str], Any]) -> web.StreamResponse:  # fmt: skip
        """A per-model GET (metadata, config): ``describe(surface, model, version)`` as JSON."""
        async def answer(call: Observed) -> web.StreamResponse:
            info = request.match_info
            return web.json_response(describe(self.surface, info["model"], info.get("version", "")))

        return await self._observed(method, request, True, answer)

    async def model_metadata(self, request: web.Request) -> web.StreamResponse:
        return await self._describe("ModelMetadata", request, Surface.model_metadata)

    async def model_ready(self, request: web.Request) -> web.StreamResponse:
        async def answer(call: Observed) -> web.StreamResponse:
            info = request.match_info
            surface = self.surface
            surface.version(info["model"], info.get("version", ""))  # an unknown model or version: its error
            ready = surface.model_ready(info["model"], info.get("version", ""))
            return web.json_response({"name": info["model"], "ready": ready}, status=200 if ready else 503)

        return await self._observed("ModelReady", request, True, answer)

    async def model_config(self, request: web.Request) -> web.StreamResponse:
        return await self._describe("ModelConfig", request, Surface.model_config)

    async def model_statistics(self, request: web.Request) -> web.StreamResponse:
        async def answer(call: Observed) -> web.StreamResponse:
            info = request.match_info
            stats = self.surface.model_statistics(info.get("model", ""), info.get("version", ""))
            return web.json_response({"model_stats": stats})

        return await self._observed("ModelStatistics", request, True, answer)

    async def infer(self, request: web.Request) -> web.StreamResponse:
        async def answer(call: Observed) -> web.StreamResponse:
            surface = self.surface
            plane = surface.plane
            limit = call.deadline_s = deadline(request)
            plane.batcher.admit(1)  # before the body is read: an overloaded gateway reads nothing more
            body = await self._body(request)
            info = request.match_info
            args = (request.headers.get(HEADER_LENGTH), info["model"], info.get("version", ""), plane.limits,
                    self.server.max_message_bytes)  # fmt: skip
            parsed: list[tuple[InferCall, bool]] = []

            def convert(b: bytes | tuple[InferCall, bool]) -> InferCall:
                parsed.append(b if isinstance(b, tuple) else parse_infer(b, *args))
                return parsed[-1][0]

            parser = self.server.json_parser

            async def in_process(b: bytes | tuple[InferCall, bool]) -> tuple[InferCall, bool]:
                return await parser.run(parse_infer_in_worker, b, *args)  # type: ignore[no-any-return]

            result = await surface.infer(surface.call(body, convert, len(body), limit, metadata=request.headers.items,
                                                      pre_parse=in_process if parser is not None else None))
            infer_call, binary_output = parsed[-1]
            return self._answer(result, infer_call, binary_output)

        return await self._observed("ModelInfer", request, True, answer)

    async def _body(self, request: web.Request) -> bytes:
        """The body through the HTTP server's one set of body guards, as /v1/classify's: the Content-Encoding and
        Content-Type rules (415: JSON, or JSON then binary data as octet-stream, or no type as tritonclient sends),
        the length (413), the body timeout (408), a client leaving mid-body (CANCELLED)."""
        server = self.server
        server.check_body_encoding(request)
        server.check_content_type(request, ("application/json", "application/octet-stream"), "the inference API",
                                  absent_ok=True)  # fmt: skip
        server.check_body_length(request)
        return await server.read_body(request)

    @staticmethod
    def _answer(answer: InferAnswer, call: InferCall, binary_default: bool) -> web.Response:
        """The answer as JSON, or JSON then binary outputs (with ``Inference-Header-Content-Length``)."""
        wanted = {o.name: o for o in call.outputs or []}
        outputs = []
        blobs: list[bytes] = []
        for t in answer.outputs:
            entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
            requested = wanted.get(t.name)
            binary = binary_default if requested is None or requested.binary is None else requested.binary
            if binary:
                blob = t.raw()
                entry["parameters"] = {BINARY_DATA_SIZE: len(blob)}
                blobs.append(blob)
            elif t.datatype == "BYTES":
                entry["data"] = [b.decode("utf-8", "replace") for b in t.array.reshape(-1).tolist()]
            else:
                entry["data"] = t.array.reshape(-1).tolist()
            outputs.append(entry)
        doc: dict[str, Any] = {"model_name": answer.model_name, "model_version": answer.model_version,
                               "outputs": outputs}  # fmt: skip
        if answer.id:
            doc["id"] = answer.id
        text = json.dumps(doc, separators=(",", ":")).encode()
        if not blobs:
            return web.Response(body=text, content_type="application/json")
        return web.Response(body=text + b"".join(blobs), content_type="application/octet-stream",
                            headers={HEADER_LENGTH: str(len(text))})  # fmt: skip


def parse_infer(body: bytes, header: str | None, model: str, version: str, limits: Limits, max_message_bytes: int
                ) -> tuple[InferCall, bool]:  # fmt: skip
    """An inference body (JSON, then binary data after ``header`` bytes when the Inference-Header-Content-Length
    header is given) as an ``InferCall``, and whether outputs are wanted as binary data by default. Pure: the
    pipeline runs it on the loop, on a thread, or (large bodies) in a JSON parse worker.

    The same bounds as the gRPC door's: a body whose ModelInferRequest would not fit in ``max_message_bytes`` is
    RESOURCE_EXHAUSTED (413, as gRPC refuses such a message), and shapes, parameters and elements are counted as
    ``check_infer`` counts them on the wire (400)."""
    if header is None:
        json_part, rest = body, b""
    else:
        try:
            n = int(header)
        except ValueError:
            n = -1
        if not 0 <= n <= len(body):
            raise InvalidArgument([FieldViolation(f"{HEADER_LENGTH} header",
                                                  f"is {header[:40]!r}; expected 0..{len(body)}")])  # fmt: skip
        json_part, rest = body[:n], body[n:]
    # a full batch of bitmaps as nested lists, or of the most strokes (each {"x": [..], "y": [..]} in its element)
    per_drawing = max(1 + BITMAP_SIDE + BITMAP_SIDE * BITMAP_SIDE, 3 * limits.max_strokes + 8)
    if json_part.count(b"[") + json_part.count(b"{") > limits.max_drawings_per_request * per_drawing + _JSON_SLACK:
        raise InvalidArgument([FieldViolation("", "the JSON holds more arrays and objects than an inference "
                                                  "request within the limits can")])  # fmt: skip
    try:
        doc = json.loads(json_part)
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument([FieldViolation("", f"the body is not JSON: {str(exc)[:200]}")]) from None
    if not isinstance(doc, dict):
        raise InvalidArgument([FieldViolation("", "expected a JSON object")])
    inputs: list[InputTensor] = []
    offset = 0
    wire_bytes = len(rest)  # about what the request takes as protobuf: at least a byte per number
    for i, t in enumerate(_list(doc.get("inputs", []), "inputs")):
        where = f"inputs[{i}]"
        if not isinstance(t, dict):
            raise InvalidArgument([FieldViolation(where, "expected an object")])
        name, datatype, shape = t.get("name"), t.get("datatype"), t.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise InvalidArgument([FieldViolation(where, "needs a string 'name' and 'datatype'")])
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise InvalidArgument([FieldViolation(f"{where}.shape", "expected a list of integers")])
        tensor = InputTensor(name, datatype, shape)
        wire_bytes += len(shape)
        params = t.get("parameters") or {}
        size = params.get(BINARY_DATA_SIZE) if isinstance(params, dict) else None
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(rest):
                raise InvalidArgument([FieldViolation(f"{where}.parameters.{BINARY_DATA_SIZE}",
                                                      f"is {size!r}; {len(rest) - offset} binary bytes are left")])
            tensor.raw = memoryview(rest)[offset : offset + size]
            offset += size
        else:
            tensor.values = _values(t.get("data"), name, datatype, where)
            if isinstance(tensor.values, list):  # BYTES: each element after its length
                wire_bytes += sum(len(v) + 4 for v in tensor.values)
            else:
                wire_bytes += len(tensor.values)
        inputs.append(tensor)
    if offset != len(rest):
        raise InvalidArgument([FieldViolation("", f"{len(rest) - offset} bytes of binary data after the "
                                                  "inputs that claim them")])  # fmt: skip
    outputs = None
    params = doc.get("parameters") or {}
    # a map entry: its key, the value's InferParameter and their framing
    wire_bytes += sum(len(k) + 8 for k in params) if isinstance(params, dict) else 0
    if wire_bytes > max_message_bytes:
        raise PayloadTooLarge(f"the request would take about {wire_bytes} bytes as a ModelInferRequest, over the "
                              f"limit of max_message_bytes={max_message_bytes}")  # fmt: skip
    if isinstance(params, dict) and len(params) > wire.MAX_OTHER_FIELDS:
        raise wire.too_many("parameters", "entries", wire.MAX_OTHER_FIELDS)
    for i, tensor in enumerate(inputs):
        if len(tensor.shape) > wire.MAX_TENSOR_DIMS:
            raise wire.too_many(f"inputs[{i}].shape", "dimensions", wire.MAX_TENSOR_DIMS)
    binary_output = bool(params.get("binary_data_output", False)) if isinstance(params, dict) else False
    if doc.get("outputs"):
        outputs = []
        for i, o in enumerate(_list(doc["outputs"], "outputs")):
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise InvalidArgument([FieldViolation(f"outputs[{i}]", "needs a string 'name'")])
            p = o.get("parameters") or {}
            k = p.get(CLASSIFICATION, 0) if isinstance(p, dict) else 0
            if isinstance(k, bool) or not isinstance(k, int):
                raise InvalidArgument([FieldViolation(f"outputs[{i}].parameters.{CLASSIFICATION}",
                                                      f"is {k!r}; expected an integer class count")])  # fmt: skip
            binary = p.get("binary_data") if isinstance(p, dict) else None
            outputs.append(OutputRequest(o["name"], k, None if binary is None else bool(binary)))
    ident = doc.get("id", "")
    call = InferCall(model, version, ident if isinstance(ident, str) else str(ident),
                     inputs, outputs, params if isinstance(params, dict) else {})  # fmt: skip
    return call, binary_output


def parse_infer_in_worker(body: bytes, *args: Any) -> tuple[str, Any, Any]:
    """:func:`parse_infer` in a JSON parse worker: its answer with binary data as bytes (a view does not
    pickle), or its refusal as plain data."""
    try:
        call, binary = parse_infer(body, *args)
    except ServiceError as exc:
        return refusal(exc)
    for tensor in call.inputs:
        if isinstance(tensor.raw, memoryview):
            tensor.raw = bytes(tensor.raw)
    return "ok", (call, binary), None


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidArgument([FieldViolation(where, "expected a list")])
    return value


def _values(data: Any, name: str, datatype: str, where: str) -> Any:
    """JSON ``data`` (flat or nested, row-major) as typed values: integers for UINT8, bytes for BYTES."""
    if data is None:
        raise InvalidArgument([FieldViolation(f"{where}.data", "missing: give 'data' or binary data")])
    if datatype == "BYTES":
        flat = np.asarray(data, dtype=object).reshape(-1).tolist() if isinstance(data, list) else [data]
        out = []
        for j, v in enumerate(flat):
            if not isinstance(v, str):
                raise InvalidArgument([FieldViolation(f"{where}.data[{j}]", "expected a string")])
            if name == ENCODED_IMAGE:
                try:
                    out.append(base64.b64decode(v, validate=True))
                except ValueError:
                    raise InvalidArgument([FieldViolation(f"{where}.data[{j}]", "is not base64")]) from None
            else:
                out.append(v.encode("utf-8"))
        return out
    try:
        array = np.asarray(data)
    except ValueError:
        raise InvalidArgument([FieldViolation(f"{where}.data", "is a ragged nested list")]) from None
    # JSON booleans are not numbers: numpy would take true as 1 (alone, or mixed in with integers)
    has_bool = array.dtype.kind == "b" or (array.dtype.kind in "iu" and any(
        type(v) is bool for v in np.asarray(data, dtype=object).reshape(-1).tolist()))  # fmt: skip
    if array.dtype.kind not in "iu" or has_bool:
        if datatype == "UINT8":
            got = "booleans" if has_bool else f"{array.dtype.kind!r}-kind values"
            raise InvalidArgument([FieldViolation(f"{where}.data", f"expected integers 0..255 for UINT8, got {got}")])
        return array.reshape(-1)
    return array.reshape(-1).astype(np.int64)
