"""The /v1 JSON API and the playground on the gateway's HTTP port: an adapter over the data plane, like every door.

Routes (the HTTP server's transport guards first: Host and Origin, credentials, the body's headers, length and
timeouts, ``service.frontends.http.server``):

- ``POST /v1/classify``: a ``quickdraw.v1.ClassifyRequest`` in the proto3 JSON mapping (``jsonbody``), the Classify
  door's converter, one pipeline call, the ``ClassifyResponse`` in the same mapping; ``?bitmaps=true`` adds the
  28x28 image the model was given per drawing;
- ``GET /v1/model``: the ``ModelInfo`` that GetModelInfo returns;
- ``GET /openapi.json``: the OpenAPI 3.1 document of these routes (``openapi``);
- ``GET /`` and ``GET /static/<file>``: the playground (files in ``playground/``).
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any, NamedTuple

from aiohttp import web

from quickdraw_client.v1 import classifier_pb2 as pb
from service.core.calls import Observed, service_error
from service.core.errors import InvalidArgument, ServiceError
from service.dataplane.pipeline import Call, Converted, DataPlane, Metadata
from service.frontends.grpc.classifier import classify_response, convert_classify, model_info
from service.frontends.http import openapi
from service.frontends.http.jsonbody import check_shape, parse_body, respelled
from service.frontends.http.requests import deadline
from service.frontends.http.server import HttpServer, error_response, to_json

PLAYGROUND_DIR = Path(__file__).with_name("playground")
#: The page loads nothing from anywhere but this server, and says so to the browser.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}
#: Where a request keeps its raw JSON body (``web.Request`` is a mapping), to name fields as the body spells them.
RAW_BODY_KEY = web.RequestKey("quickdraw_raw_body", bytes)


class _Serialized(NamedTuple):
    """A JSON body parsed in a worker process: the serialized ClassifyRequest it gave."""

    wire: bytes


def _flag(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes")


def add_routes(app: web.Application, server: HttpServer) -> None:
    """Register /v1, /openapi.json and the playground on ``app`` for ``server``."""
    routes = _Routes(server)
    app.router.add_post("/v1/classify", routes._classify)
    app.router.add_get("/v1/model", routes._model)
    app.router.add_get("/openapi.json", routes._openapi)
    app.router.add_get("/", routes._index)
    app.router.add_get("/static/{name}", routes._static)


class _Routes:
    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self._openapi_doc: dict[str, Any] | None = None
        self._files = {p.name: p for p in PLAYGROUND_DIR.iterdir() if p.is_file()}

    async def _classify(self, request: web.Request) -> web.Response:
        server = self.server
        """POST /v1/classify: the body read through the HTTP guards, then one pipeline call (the Classify door's
        converter after the JSON mapping: ``parse_body``)."""
        with Observed(server.metrics, "http:Classify") as call:
            try:
                server.check_host(request)
                server.authorize(request)
                server.check_body_headers(request)
                plane = server.plane
                limit = call.deadline_s = deadline(request)
                plane.batcher.admit(1)  # before the body is read: an overloaded gateway reads nothing more
                raw = await server.read_body(request)
                request[RAW_BODY_KEY] = raw  # field violations are named as this body spells the fields
                check_shape(raw, plane.limits)
                result = await plane.infer(self._classify_call(plane, raw, limit, request.headers.items))
                body = to_json(classify_response(plane, result))
                if _flag(request.query.get("bitmaps")):
                    body["bitmaps"] = [{"pixels": base64.b64encode(image.tobytes()).decode("ascii")}
                                       for image in result.images]
                return web.json_response(body)
            except Exception as exc:
                err = service_error(exc)
                call.fail(err)
                raw = request.get(RAW_BODY_KEY)
                if type(err) is InvalidArgument and raw is not None:
                    err = respelled(err, raw)
                return error_response(err)

    def _classify_call(self, plane: DataPlane, raw: bytes, deadline_s: float | None,
                       metadata: Metadata | None = None) -> Call[Any]:  # fmt: skip
        """A /v1/classify body as a pipeline call: parsed as the JSON mapping of a ClassifyRequest (in a worker
        process when large: ``service.frontends.http.jsonparse``), then the Classify door's converter."""
        server = self.server
        max_bytes, limits = server.max_message_bytes, plane.limits

        def convert(body: bytes | _Serialized) -> Converted:
            if isinstance(body, _Serialized):
                return convert_classify(plane, body.wire)
            return convert_classify(plane, parse_body(body, pb.ClassifyRequest(), max_bytes, limits))

        async def in_process(body: bytes | _Serialized) -> bytes | _Serialized:
            assert isinstance(body, bytes) and server.json_parser is not None
            return _Serialized(await server.json_parser.parse(body, max_bytes, limits))

        pre_parse = in_process if server.json_parser is not None else None
        return Call(raw, convert, 1, len(raw), deadline_s, pre_parse=pre_parse, metadata=metadata)

    async def _model(self, request: web.Request) -> web.Response:
        server = self.server
        with Observed(server.metrics, "http:GetModelInfo") as call:
            try:
                server.check_host(request)
                server.authorize(request)
                return web.json_response(to_json(model_info(server.plane, server.max_message_bytes)))
            except Exception as exc:
                err = service_error(exc)
                call.fail(err)
                return error_response(err)

    async def _openapi(self, request: web.Request) -> web.Response:
        """The JSON API's OpenAPI document (``service.frontends.http.openapi``, generated from the proto descriptors);
        like the
        page, it needs no token."""
        server = self.server
        try:
            server.check_host(request)
        except ServiceError as err:
            return error_response(err)
        if self._openapi_doc is None:
            self._openapi_doc = openapi.document(bearer=server.auth is not None)
        return web.json_response(self._openapi_doc, headers={"Cache-Control": "no-cache"})

    async def _index(self, request: web.Request) -> web.StreamResponse:
        server = self.server
        try:
            server.check_host(request)
        except ServiceError as err:
            return error_response(err)
        return web.FileResponse(PLAYGROUND_DIR / "index.html", headers=PAGE_HEADERS)

    async def _static(self, request: web.Request) -> web.StreamResponse:
        server = self.server
        try:
            server.check_host(request)
        except ServiceError as err:
            return error_response(err)
        path = self._files.get(request.match_info["name"])
        if path is None:
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers=PAGE_HEADERS)



