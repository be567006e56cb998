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

import asyncio
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
import numpy as np
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import Message
from prometheus_client.exposition import choose_encoder

from quickdraw.v1 import classifier_pb2 as pb
from service.api import GatewaySlot, Observed, service_error
from service.errors import (
    FieldViolation,
    InvalidArgument,
    PayloadTooLarge,
    ServiceError,
    Unauthenticated,
    http_status,
    to_rpc_status,
)
from service.metrics import Metrics
from service.security import TokenAuth
from service.validation import Limits

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
_UNKNOWN_FIELD = re.compile(r'Message type "(?P<type>[\w.]+)" has no field named "(?P<name>.*)"$', re.DOTALL)
#: Bodies up to this size are parsed on the event loop, larger ones on a worker thread.
INLINE_PARSE_BYTES = 64 * 1024
#: Lists of more than this many times the drawings or strokes a request may hold are refused unparsed.
EARLY_REFUSAL = 2
#: The JSON names (and proto names) of a Stroke's number arrays.
_STROKE_ARRAYS = ("x", "y", "tMs", "t_ms")
_FAILED_TO_PARSE = re.compile(r"Failed to parse (?P<name>\w+) field: ")
_NOT_A_LIST = re.compile(r"repeated field (?P<name>\w+) must be in \[\] which is ")
#: The longest reason quoted from json_format in a field violation.
MAX_REASON_CHARS = 300
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
    """A json_format error as a field violation: the path it names (JSON field names) and the innermost reason.

    The reason is cut to ``MAX_REASON_CHARS``: json_format quotes the offending value, which may be huge.
    """
    last = str(exc).split("\n Available Fields", 1)[0]  # what follows lists the message's fields
    chain = []
    while match := _FAILED_TO_PARSE.match(last):  # json_format wraps the reason once per enclosing field
        chain.append(match.group("name"))
        last = last[match.end() :]
    match = _PARSE_AT.search(last)
    if match:
        path, reason = match.group("path"), last[: match.start()].strip()
        unknown = _UNKNOWN_FIELD.search(reason)
        if unknown:
            name = unknown.group("name")
            return FieldViolation(f"{path}.{name}" if path else name, f"is not a field of {unknown.group('type')}")
        repeated = _NOT_A_LIST.match(reason)
        if repeated:  # it names the field, and the path is its message's
            name = repeated.group("name")
            return FieldViolation(f"{path}.{name}" if path else name, "must be a JSON array (a repeated field)")
        return FieldViolation(path, _clip(reason))
    return FieldViolation(".".join(chain), _clip(last.strip().rstrip(".")))


def _clip(reason: str) -> str:
    return reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 3] + "..."


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


class HttpServer(GatewaySlot):
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
        self._runner: web.AppRunner | None = None
        self._files = {p.name: p for p in PLAYGROUND_DIR.iterdir() if p.is_file()} if api else {}

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
                message = await self._read(request, pb.ClassifyRequest(), gateway.limits)
                prepared = await gateway.prepare(message, deadline)
                body = to_json(await gateway.predict(prepared, deadline))
                if _flag(request.query.get("bitmaps")):
                    body["bitmaps"] = [{"pixels": base64.b64encode(image.tobytes()).decode("ascii")}
                                       for image in prepared.images]
                return web.json_response(body)
            except Exception as exc:
                err = service_error(exc)
                call.fail(err)
                return error_response(err)

    async def _model(self, request: web.Request) -> web.Response:
        with Observed(self.metrics, "http:GetModelInfo") as call:
            try:
                self._authorize(request)
                return web.json_response(to_json(self.gateway.model_info(self.max_message_bytes)))
            except Exception as exc:
                err = service_error(exc)
                call.fail(err)
                return error_response(err)

    async def _index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(PLAYGROUND_DIR / "index.html", headers=PAGE_HEADERS)

    async def _static(self, request: web.Request) -> web.FileResponse:
        path = self._files.get(request.match_info["name"])
        if path is None:
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers=PAGE_HEADERS)

    async def _read(self, request: web.Request, message: M, limits: Limits | None = None) -> M:
        """The body, parsed into ``message``; every way it can be wrong is an InvalidArgument (or a 413).

        A body over ``INLINE_PARSE_BYTES`` is parsed on a worker thread: the event loop also runs the gRPC
        server, and a body of a million values takes a while even on the fast path.
        """
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise PayloadTooLarge(
                f"request body is over the limit of {self.max_body_bytes} bytes "
                f"({JSON_BODY_FACTOR} x max_message_bytes={self.max_message_bytes})"
            ) from None
        if len(raw) <= INLINE_PARSE_BYTES:
            return parse_body(raw, message, self.max_message_bytes, limits)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, parse_body, raw, message, self.max_message_bytes, limits)


def parse_body(raw: bytes, message: M, max_message_bytes: int, limits: Limits | None = None) -> M:
    """A JSON body parsed into ``message``; every way it can be wrong is an InvalidArgument naming the field.

    A body whose protobuf form would be over ``max_message_bytes`` is refused as gRPC refuses that message,
    with RESOURCE_EXHAUSTED (a 413). ``json_format.ParseDict`` costs about a microsecond per value (a 16 MB
    body of coordinates took 8 s, on the event loop), so for a ClassifyRequest (given its ``limits``) the
    stroke arrays are counted first, at 4 bytes of protobuf per value; lists of more than ``EARLY_REFUSAL``
    times the drawings or strokes a request may hold are refused with the one violation validation reports
    for their count (a request nearer the limits gets every violation, as on gRPC); and stroke arrays of
    plain JSON numbers are set directly, as the same floats ParseDict would make, after ParseDict has parsed
    the rest.
    """
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        reason = f"is not valid JSON: {exc}"
        raise InvalidArgument([FieldViolation("", reason)], f"request body {reason}") from None
    except RecursionError:  # json's C scanner recurses per nested array or object
        reason = f"nests arrays or objects too deeply to be a {message.DESCRIPTOR.name}"
        raise InvalidArgument([FieldViolation("", reason)], f"request body {reason}") from None
    if not isinstance(data, dict):
        reason = f"must be a JSON object (a {message.DESCRIPTOR.name}), got {type(data).__name__}"
        raise InvalidArgument([FieldViolation("", reason)], f"request body {reason}")
    arrays = []
    if isinstance(message, pb.ClassifyRequest) and limits is not None:
        arrays = _take_stroke_arrays(data, limits, max_message_bytes)
    try:
        json_format.ParseDict(data, message)
    except json_format.ParseError as exc:
        raise InvalidArgument([parse_violation(exc)]) from None
    except OverflowError as exc:  # json_format lets float(<a 400-digit integer>) and int(1e400) escape
        raise InvalidArgument([_overflow_violation(data, exc)]) from None
    for i, j, name, values in arrays:
        getattr(message.drawings[i].strokes.strokes[j], "t_ms" if name == "tMs" else name).extend(values)  # type: ignore[attr-defined]
    size = message.ByteSize()
    if size > max_message_bytes:
        raise PayloadTooLarge(f"request is {size} bytes as a protobuf message, over the limit of "
                              f"max_message_bytes={max_message_bytes} (gRPC refuses such a message too)")
    return message


def _json_floats(values: list[Any]) -> list[float] | None:
    """A stroke array's JSON values as the floats json_format would set, or None to leave it to json_format.

    Numbers, booleans and numeric strings ("NaN", "Infinity", "1.5") are taken as ``float()`` takes them, as
    json_format takes them, but at C speed when they are all numbers. A JSON number must round to a finite
    float32: json_format refuses NaN, infinities and larger numbers (and also the largest float32 as its own
    printer writes it, 3.4028235e+38, which is taken here, so that what MessageToDict writes parses back).
    Anything else (null, lists, objects, "nan", words, numbers too large) goes to json_format, which says
    what is wrong with it.
    """
    kinds = set(map(type, values))
    if not kinds <= {int, float, bool, str}:
        return None
    try:
        if kinds <= {int, float}:
            array = np.asarray(values, dtype=np.float64)
            numbers = array
        else:
            array = np.array([_json_float(v) for v in values], dtype=np.float64)
            numbers = array[[type(v) is not str for v in values]]  # "NaN" and "Infinity" are allowed
    except (ValueError, OverflowError):
        return None
    with np.errstate(over="ignore", invalid="ignore"):
        if not np.isfinite(numbers.astype(np.float32)).all():
            return None
    return array.tolist()  # type: ignore[no-any-return]


def _json_float(value: float | bool | str) -> float:
    if value == "nan":  # json_format's one refusal of a string float() takes
        raise ValueError(value)
    return float(value)


def _take_stroke_arrays(
    data: dict[str, Any], limits: Limits, max_message_bytes: int
) -> list[tuple[int, int, str, list[float]]]:
    """Take the stroke arrays of plain numbers out of a ClassifyRequest's JSON, to be set after ParseDict.

    First refuses what no valid request holds, before anything walks it: far more drawings or strokes than
    the limits, or more stroke values than ``max_message_bytes`` can carry (a float is 4 bytes of protobuf).
    """
    out: list[tuple[int, int, str, list[float]]] = []
    drawings = data.get("drawings")
    if not isinstance(drawings, list):
        return out
    if len(drawings) > EARLY_REFUSAL * limits.max_drawings_per_request:
        raise InvalidArgument([FieldViolation("drawings", f"has {len(drawings)} drawings, over the limit of "
                                              f"max_drawings_per_request={limits.max_drawings_per_request}")])
    found: list[tuple[int, int, str, list[Any]]] = []
    for i, drawing in enumerate(drawings):
        strokes = drawing.get("strokes") if isinstance(drawing, dict) else None
        items = strokes.get("strokes") if isinstance(strokes, dict) else None
        if not isinstance(items, list):
            continue
        if len(items) > EARLY_REFUSAL * limits.max_strokes:
            raise InvalidArgument([FieldViolation(f"drawings[{i}].strokes.strokes", f"has {len(items)} strokes, "
                                                  f"over the limit of max_strokes={limits.max_strokes}")])
        for j, stroke in enumerate(items):
            if isinstance(stroke, dict) and not ("tMs" in stroke and "t_ms" in stroke):
                found += [(i, j, name, v) for name in _STROKE_ARRAYS if isinstance(v := stroke.get(name), list)]
    values = sum(len(v) for *_, v in found)
    if 4 * values > max_message_bytes:
        raise PayloadTooLarge(f"request holds {values} stroke values, over {max_message_bytes} bytes as a protobuf "
                              f"message (4 bytes each): over the limit of max_message_bytes={max_message_bytes} "
                              "(gRPC refuses such a message too)")
    for i, j, name, v in found:
        numbers = _json_floats(v)
        if numbers is not None:
            del drawings[i]["strokes"]["strokes"][j][name]
            out.append((i, j, name, numbers))
    return out


def _overflow_violation(data: Any, exc: OverflowError) -> FieldViolation:
    """Where ParseDict overflowed: the first number, in document order, that no field can hold."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            stack.extend((f"{path}.{k}" if path else str(k), v) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((f"{path}[{k}]", v) for k, v in reversed(list(enumerate(value))))
        elif (type(value) is int and abs(value) >= 2**1024) or (type(value) is float and math.isinf(value)):
            return FieldViolation(path, f"is out of range ({exc})")
    return FieldViolation("", f"a number is out of range ({exc})")


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
