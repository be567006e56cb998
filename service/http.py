"""The gateway's HTTP side, on the gRPC server's asyncio loop: /metrics, the JSON API and the playground page.

Routes:

- ``GET /metrics``: the app's Prometheus registry (OpenMetrics when the scraper asks for it).
- ``POST /v1/classify``: a ``quickdraw.v1.ClassifyRequest`` in the proto3 JSON mapping, answered with a
  ``ClassifyResponse`` in the same mapping. The same ``Gateway`` as the gRPC API validates, renders, batches
  and runs it, and the metrics count it under ``method="http:Classify"``. ``?bitmaps=true`` adds ``bitmaps``:
  for each drawing, the 28x28 image the model was given, as a ``Bitmap`` (base64 ``pixels``, row-major).
  An ``X-Server-Timeout`` header (seconds) is the call's deadline, as a gRPC deadline would be.
- ``GET /v1/model``: the ``ModelInfo`` that GetModelInfo returns.
- ``GET /`` and ``GET /static/<file>``: the playground, a page to draw on (files in ``service/playground/``).

``http_api=False`` removes the API and the page; /metrics stays. With a bearer token configured, the API
routes need ``Authorization: Bearer <token>`` (the same tokens as gRPC; 401 otherwise); /metrics and the page's
files do not. With ``http_tls`` the port speaks TLS, and with mTLS configured the API routes also need a
verified client certificate. An error is the gRPC call's status as JSON,
``{"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": ..., "details": [google.rpc.BadRequest]}}``,
sent with the HTTP status that ``service.errors.http_status`` maps its code to.
"""

from __future__ import annotations

import base64
import json
import math
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import Message
from prometheus_client.exposition import choose_encoder

from quickdraw.v1 import classifier_pb2 as pb
from service.api import Gateway, Observed, service_error
from service.errors import (
    FieldViolation,
    InvalidArgument,
    PayloadTooLarge,
    ServiceError,
    Unauthenticated,
    Unavailable,
    http_status,
    to_rpc_status,
)
from service.metrics import Metrics
from service.security import TokenAuth

PLAYGROUND_DIR = Path(__file__).with_name("playground")
#: A JSON body may be this many times max_message_bytes: base64 and numbers as text are wordier than protobuf.
JSON_BODY_FACTOR = 4
#: The deadline header Google's JSON APIs read: seconds, a decimal number.
TIMEOUT_HEADER = "X-Server-Timeout"
#: The page loads nothing from anywhere but this server, and says so to the browser.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}
_UNKNOWN_FIELD = re.compile(r'Message type "(?P<type>[\w.]+)" has no field named "(?P<name>[^"]+)"')
_PARSE_AT = re.compile(r'\s+at "?[A-Za-z_]\w*\.?(?P<path>[^"\s]*?)"?\.*$')
M = TypeVar("M", bound=Message)
_HTTP_TO_GRPC = {
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def to_json(message: Message) -> dict[str, Any]:
    """A message in the proto3 JSON mapping, every field present (``index: 0`` too)."""
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


def error_body(error: ServiceError) -> dict[str, Any]:
    """The JSON error: the gRPC status (same message and details), with the HTTP status and the code's name."""
    status = json_format.MessageToDict(to_rpc_status(error))
    return {
        "error": {
            "code": http_status(error),
            "status": error.code.name,
            "message": status.get("message", ""),
            "details": status.get("details", []),
        }
    }


def error_response(error: ServiceError) -> web.Response:
    """An error as an HTTP response; retryable ones say when to retry."""
    headers = {"Retry-After": "1"} if error.code in (grpc.StatusCode.UNAVAILABLE,
                                                       grpc.StatusCode.RESOURCE_EXHAUSTED) else None
    if error.code == grpc.StatusCode.UNAUTHENTICATED:
        headers = {"WWW-Authenticate": "Bearer"}
    return web.json_response(error_body(error), status=http_status(error), headers=headers)


def parse_violation(exc: json_format.ParseError) -> FieldViolation:
    """A json_format error as a field violation: the path it names (JSON field names) and the innermost reason."""
    text = str(exc).split("\n", 1)[0]
    *chain, last = text.split(" field: ")
    match = _PARSE_AT.search(last)
    if match:
        path, reason = match.group("path"), last[: match.start()].strip()
        unknown = _UNKNOWN_FIELD.search(reason)
        if unknown:
            name = unknown.group("name")
            return FieldViolation(f"{path}.{name}" if path else name, f"is not a field of {unknown.group('type')}")
        return FieldViolation(path, reason)
    return FieldViolation(".".join(c.removeprefix("Failed to parse ") for c in chain), last.strip().rstrip("."))


def _deadline(request: web.Request) -> float | None:
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise InvalidArgument([FieldViolation(f"{TIMEOUT_HEADER} header", f"is {raw!r}; expected seconds > 0")])
    return time.monotonic() + seconds


def _flag(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes")


class HttpServer:
    """The HTTP server; the API answers UNAVAILABLE until :meth:`attach` hands it the ready gateway."""

    def __init__(
        self,
        metrics: Metrics,
        max_message_bytes: int,
        *,
        api: bool = True,
        auth: TokenAuth | None = None,
        require_client_cert: bool = False,
    ) -> None:
        self.metrics = metrics
        self.api = api
        self.auth = auth
        self.require_client_cert = require_client_cert
        self.max_message_bytes = max_message_bytes
        self.max_body_bytes = JSON_BODY_FACTOR * max_message_bytes
        self.port = 0
        self._gateway: Gateway | None = None
        self._runner: web.AppRunner | None = None
        self._files = {p.name: p for p in PLAYGROUND_DIR.iterdir() if p.is_file()} if api else {}

    @property
    def gateway(self) -> Gateway:
        """The data plane; Unavailable until the model is loaded."""
        if self._gateway is None:
            raise Unavailable("the model is still loading; retry shortly")
        return self._gateway

    def attach(self, gateway: Gateway) -> None:
        """Start serving the API through a ready gateway."""
        self._gateway = gateway

    def application(self) -> web.Application:
        """The aiohttp application with every route."""
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[_json_errors])
        app.router.add_get("/metrics", self._metrics)
        if self.api:
            app.router.add_post("/v1/classify", self._classify)
            app.router.add_get("/v1/model", self._model)
            app.router.add_get("/", self._index)
            app.router.add_get("/static/{name}", self._static)
        return app

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        """Bind and serve (over TLS with ``ssl_context``); returns the bound port (useful with port 0)."""
        runner = web.AppRunner(self.application(), handle_signals=False, access_log=None)
        await runner.setup()
        self._runner = runner
        await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
        self.port = int(runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        """Stop listening; calls in progress finish first."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- handlers --------------------------------------------------------------------------------------------

    async def _metrics(self, request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(self.metrics.registry), headers={"Content-Type": content_type})

    def _authorize(self, request: web.Request) -> None:
        """The API's credentials: a verified client certificate under mTLS, and the bearer token when one is set."""
        if self.require_client_cert:
            transport = request.transport
            if transport is None or not transport.get_extra_info("peercert"):
                raise Unauthenticated("a client certificate signed by the gateway's client CA is required")
        if self.auth is not None:
            self.auth.check(request.headers.get("Authorization"))

    async def _classify(self, request: web.Request) -> web.Response:
        with Observed(self.metrics, "http:Classify") as call:
            try:
                self._authorize(request)
                gateway = self.gateway
                deadline = _deadline(request)
                message = await self._read(request, pb.ClassifyRequest())
                prepared = await gateway.prepare(message)
                body = to_json(await gateway.predict(prepared, deadline))
                if _flag(request.query.get("bitmaps")):
                    body["bitmaps"] = [{"pixels": base64.b64encode(image.tobytes()).decode("ascii")}
                                       for image in prepared.images]
                return web.json_response(body)
            except Exception as exc:
                err = service_error(exc)
                call.code = err.code.name
                return error_response(err)

    async def _model(self, request: web.Request) -> web.Response:
        with Observed(self.metrics, "http:GetModelInfo") as call:
            try:
                self._authorize(request)
                return web.json_response(to_json(self.gateway.model_info(self.max_message_bytes)))
            except Exception as exc:
                err = service_error(exc)
                call.code = err.code.name
                return error_response(err)

    async def _index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(PLAYGROUND_DIR / "index.html", headers=PAGE_HEADERS)

    async def _static(self, request: web.Request) -> web.FileResponse:
        path = self._files.get(request.match_info["name"])
        if path is None:
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers=PAGE_HEADERS)

    async def _read(self, request: web.Request, message: M) -> M:
        """The body, parsed into ``message``; every way it can be wrong is an InvalidArgument (or a 413)."""
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise PayloadTooLarge(
                f"request body is over the limit of {self.max_body_bytes} bytes "
                f"({JSON_BODY_FACTOR} x max_message_bytes={self.max_message_bytes})"
            ) from None
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            reason = f"is not valid JSON: {exc}"
            raise InvalidArgument([FieldViolation("", reason)], f"request body {reason}") from None
        if not isinstance(data, dict):
            reason = f"must be a JSON object (a {message.DESCRIPTOR.name}), got {type(data).__name__}"
            raise InvalidArgument([FieldViolation("", reason)], f"request body {reason}")
        try:
            return json_format.ParseDict(data, message)
        except json_format.ParseError as exc:
            raise InvalidArgument([parse_violation(exc)]) from None


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's own refusals under /v1/ (no such route, wrong method) as JSON errors like every other."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if not request.path.startswith("/v1/") or exc.status < 400:
            raise
        code = _HTTP_TO_GRPC.get(exc.status, grpc.StatusCode.UNKNOWN)
        body = {"error": {"code": exc.status, "status": code.name, "message": f"{exc.reason}: {request.method} "
                          f"{request.path}", "details": []}}
        return web.json_response(body, status=exc.status, headers={k: v for k, v in exc.headers.items()
                                                                    if k.lower() == "allow"})
