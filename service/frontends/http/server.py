"""The gateway's HTTP port, on the gRPC server's asyncio loop: the transport every HTTP door shares, and /metrics.

``GET /metrics`` is the app's Prometheus registry (OpenMetrics when the scraper asks for it). The doors add their
routes (``more_routes``, from the composition root): the /v1 JSON API and the playground (``v1``) and the Open
Inference Protocol's /v2 (``service.frontends.oip.http_api``); ``http_api=False`` leaves /metrics alone.

Hardening (the settings in ``HttpLimits``, from ``service.settings``): the API takes only
``Content-Type: application/json`` (415 otherwise: a browser sends text/plain and form posts cross-site
without a preflight); compressed request bodies are refused before they are read unless
``http_request_compression`` is on; a body's ``{`` and ``[`` are counted before ``json.loads`` builds anything,
so a small body of a million empty objects is refused in milliseconds; a body over 1 MiB is parsed in a worker
process (``service.frontends.http.jsonparse``: ``json.loads`` holds the GIL, ~194 ms for a 16 MiB body here), at most
``max_preprocessing_calls`` off the loop at once; without a bearer token, the Host and
Origin headers must name an allowed host (DNS rebinding, cross-site requests), except on /metrics. Each
connection has a header-read timeout (slowloris), an idle keep-alive timeout and, while a body is read, a
body timeout (408); at most ``max_http_connections`` are open at once (the longest-idle one is closed to make
room). The ``Server`` header names no software version. With a bearer token configured, the API
routes need ``Authorization: Bearer <token>`` (the same tokens as gRPC; 401 otherwise); /metrics and the page's
files do not. With ``http_tls`` the port speaks TLS, and with mTLS configured the API routes also need a
verified client certificate. An error is the gRPC call's status as JSON,
``{"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": ..., "details": [google.rpc.BadRequest]}}``,
sent with the HTTP status that ``service.core.errors.http_status`` maps its code to. Its field violations name the
fields as the body spelled them (``topK`` or ``top_k``: ``jsonbody.respelled``), where the gRPC call's use proto names,
and a value of the wrong JSON type is described in JSON terms (``service.frontends.http.jsonwalk``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from google.protobuf import json_format
from google.protobuf.message import Message
from prometheus_client.exposition import choose_encoder
from yarl import URL

from service.core.errors import (
    Cancelled,
    FieldViolation,
    InvalidArgument,
    MisdirectedRequest,
    PayloadTooLarge,
    PermissionDenied,
    RequestTimeout,
    ServiceError,
    Unauthenticated,
    UnsupportedMediaType,
    http_status,
    to_rpc_status,
)
from service.core.metrics import Metrics
from service.dataplane.pipeline import DataPlaneSlot
from service.frontends.http.jsonparse import JsonParsePool
from service.security.tokens import TokenAuth

log = logging.getLogger(__name__)

#: The ``Server`` header of every response: no software or version for a scanner to match.
SERVER_HEADER = "quickdraw"
#: How long a connection may keep sending a body nobody reads (after a refusal) before it is closed.
LINGER_S = 1.0
#: The Content-Encodings aiohttp decompresses, taken when ``http_request_compression`` is on.
COMPRESSIONS = ("gzip", "deflate")
#: A JSON body may be this many times max_message_bytes: base64 and numbers as text are wordier than protobuf.
JSON_BODY_FACTOR = 4
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


def _host_name(value: str) -> str:
    """The host of a Host header or an allow-list entry, lower case, without port, brackets or final dot."""
    value = value.strip().lower()
    if value.startswith("["):
        value = value[1 : value.find("]")] if "]" in value else value[1:]
    elif value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def _origin_host(origin: str) -> str | None:
    """The host an Origin header names (None for ``null`` or anything that is not a URL)."""
    try:
        host = URL(origin).host
    except ValueError:
        return None
    return _host_name(host) if host else None


@dataclass(frozen=True)
class HttpLimits:
    """How the HTTP port treats connections and requests (the ``http_*`` settings)."""

    keepalive_timeout_s: float = 15.0
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 1000
    request_compression: bool = False
    allowed_hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "[::1]")


class _Refused(asyncio.Protocol):
    """A connection over the cap: closed as soon as it is made."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class _GuardedHandler(RequestHandler):
    """aiohttp's connection handler with a header-read timer, registered with its :class:`ConnectionGuard`.

    The timer runs from the connection's start, and again from the first byte of each later request, until the
    request's headers are complete (aiohttp counts them in ``_request_count``); when it fires first, the
    connection is closed. Between requests aiohttp's own keep-alive timeout applies.
    """

    def __init__(self, manager: web.Server, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_count = 0
        #: When bytes last arrived (the loop's clock): the longest-idle connection is closed first.
        self.last_active = 0.0

    @property
    def idle(self) -> bool:
        """No request is being handled (the connection waits for, or is receiving, a request's headers)."""
        return not self._request_in_progress and not self._messages and self.transport is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start aiohttp's handling, count the connection and start the header timer."""
        super().connection_made(transport)
        self.last_active = self._loop.time()
        self._guard.opened(self)
        self._arm()

    def _arm(self) -> None:
        self._header_count = self._request_count
        self._header_timer = self._loop.call_later(self._guard.header_timeout_s, self._header_timeout)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self._request_count == self._header_count and self.transport is not None:
            self._guard.closing(self, "header_timeout")
            self.force_close()

    def data_received(self, data: bytes) -> None:
        """Parse as aiohttp does; stop the header timer once headers are complete, start it on a new request."""
        super().data_received(data)
        if not data:
            return
        self.last_active = self._loop.time()
        if self._header_timer is not None:
            if self._request_count != self._header_count:
                self._disarm()
        elif self._waiter is not None and not self._messages and not self._request_in_progress:
            self._arm()  # the first bytes of the next request on a kept-alive connection

    def connection_lost(self, exc: BaseException | None) -> None:
        """Stop the timer and uncount the connection, then aiohttp's own clean-up."""
        self._disarm()
        self._guard.lost(self)
        super().connection_lost(exc)

    def handle_error(
        self, request: Any, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        """aiohttp's error page (a malformed request, say), without its version-revealing Server header."""
        response = super().handle_error(request, status, exc, message)
        response.headers["Server"] = SERVER_HEADER
        return response


class ConnectionGuard:
    """The protocol factory of the HTTP port: aiohttp's handler per connection, at most ``max_connections``.

    At the cap, the longest-idle connection (no request in progress) is closed to make room, so idle
    connections cannot lock new clients out; when every connection is busy, the new one is closed at once.
    Both are counted in ``http_connections_closed_total``.
    """

    def __init__(self, server: web.Server, handler_kwargs: dict[str, Any], metrics: Metrics, max_connections: int,
                 header_timeout_s: float) -> None:  # fmt: skip
        self.server = server
        self.handler_kwargs = handler_kwargs
        self.metrics = metrics
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.live: set[_GuardedHandler] = set()
        #: Handlers made but not yet connected (asyncio accepts a backlog's worth before any connection_made;
        #: weak, so one whose TLS handshake fails is forgotten with it).
        self.pending: weakref.WeakSet[_GuardedHandler] = weakref.WeakSet()

    def __call__(self) -> asyncio.Protocol:
        """A protocol for a new connection: a handler, or a refusal when over the cap and nothing is idle."""
        if len(self.live) + len(self.pending) >= self.max_connections:
            idle = [h for h in self.live if h.idle]
            if not idle:
                self.metrics.http_connections_closed.labels("limit").inc()
                return _Refused()
            victim = min(idle, key=lambda h: h.last_active)
            self.closing(victim, "evicted")
            victim.force_close()
        handler = _GuardedHandler(self.server, guard=self, loop=asyncio.get_running_loop(), **self.handler_kwargs)
        self.pending.add(handler)
        return handler

    def opened(self, handler: _GuardedHandler) -> None:
        """A connection was made."""
        self.pending.discard(handler)
        self.live.add(handler)
        self.metrics.http_connections.set(len(self.live))

    def closing(self, handler: _GuardedHandler, reason: str) -> None:
        """The gateway closes a connection (``reason`` as counted)."""
        self.metrics.http_connections_closed.labels(reason).inc()
        self.lost(handler)

    def lost(self, handler: _GuardedHandler) -> None:
        """A connection is gone."""
        self.pending.discard(handler)
        self.live.discard(handler)
        self.metrics.http_connections.set(len(self.live))


class _GuardedSite(web.TCPSite):
    """A TCP site that serves through a :class:`ConnectionGuard` instead of aiohttp's bare server."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, guard: ConnectionGuard,
                 ssl_context: ssl.SSLContext | None = None) -> None:  # fmt: skip
        super().__init__(runner, host, port, ssl_context=ssl_context)
        self._guard = guard

    async def start(self) -> None:
        """Register with the runner and listen (a TLS handshake gets the header timeout too)."""
        await web.BaseSite.start(self)
        self._server = await asyncio.get_running_loop().create_server(
            self._guard, self._host, self._port, ssl=self._ssl_context, backlog=self._backlog,
            ssl_handshake_timeout=self._guard.header_timeout_s if self._ssl_context else None,
        )  # fmt: skip
        self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = SERVER_HEADER


def clip_header(value: str, limit: int = 100) -> str:
    """A header value as echoed in an error message: at most ``limit`` characters."""
    return value if len(value) <= limit else value[:limit] + "..."


def _auth_reason(header: str | None) -> str:
    """Why a bearer token was refused, for ``auth_failures_total``: missing, malformed or invalid."""
    if header is None:
        return "missing"
    scheme, _, token = header.strip().partition(" ")
    return "invalid" if scheme.lower() == "bearer" and token.strip() else "malformed"


class HttpServer(DataPlaneSlot):
    """The HTTP server; the API answers UNAVAILABLE until :meth:`attach` hands it the ready gateway."""

    def __init__(
        self,
        metrics: Metrics,
        max_message_bytes: int,
        *,
        auth: TokenAuth | None = None,
        require_client_cert: bool = False,
        limits: HttpLimits | None = None,
    ) -> None:
        self.metrics = metrics
        self.auth = auth
        self.require_client_cert = require_client_cert
        self.limits = limits or HttpLimits()
        self.max_message_bytes = max_message_bytes
        self.max_body_bytes = JSON_BODY_FACTOR * max_message_bytes
        self.port = 0
        self._runner: web.AppRunner | None = None
        #: Parses large JSON bodies in worker processes (None: on a thread); set by the composition root.
        self.json_parser: JsonParsePool | None = None
        #: The Open Inference Protocol's surface (``service.frontends.oip.core.Surface``), set by the composition root.
        self.oip: Any = None
        #: The doors' routes on this port, each added with ``add_routes(app, self)`` when the app is built (the
        #: composition root passes /v1's and the OIP's: this module is the transport and imports no door).
        self.more_routes: list[Callable[[web.Application, HttpServer], None]] = []
        hosts = self.limits.allowed_hosts
        #: None: any host (``*``, or a bearer token is required, which a browser cannot send cross-site).
        self._hosts = None if auth is not None or "*" in hosts else frozenset(_host_name(h) for h in hosts)

    def application(self) -> web.Application:
        """The aiohttp application with every route."""
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[_json_errors])
        app.on_response_prepare.append(_server_header)
        app.router.add_get("/metrics", self._metrics)
        for add_routes in self.more_routes:  # the doors on this port: /v1 and the page, the OIP's /v2
            add_routes(app, self)
        return app

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        """Bind and serve (over TLS with ``ssl_context``); returns the bound port (useful with port 0)."""
        lim = self.limits
        handler_kwargs: dict[str, Any] = {
            "keepalive_timeout": lim.keepalive_timeout_s, "lingering_time": LINGER_S,
            "auto_decompress": lim.request_compression, "access_log": None,
        }  # fmt: skip
        runner = web.AppRunner(self.application(), handle_signals=False, **handler_kwargs)
        await runner.setup()
        self._runner = runner
        assert runner.server is not None  # lim.max_connections fits the fd budget (service.app.connection_caps)
        guard = ConnectionGuard(runner.server, handler_kwargs, self.metrics, lim.max_connections,
                                lim.header_timeout_s)  # fmt: skip
        await _GuardedSite(runner, host, port, guard, ssl_context=ssl_context).start()
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

    def check_host(self, request: web.Request) -> None:
        """Without a bearer token: the Host (and any Origin) must be an allowed host, or the call is refused.

        A page on another site can make a browser send requests here (text/plain POSTs need no preflight), and
        a DNS-rebinding page can even read the answers: its requests carry its own Host and Origin.
        """
        if self._hosts is None:
            return
        host = _host_name(request.headers.get("Host", ""))
        if host not in self._hosts:
            raise MisdirectedRequest(
                f"Host {clip_header(request.headers.get('Host', ''))!r} is not one this gateway answers to; allowed: "
                f"{', '.join(sorted(self._hosts))} (setting http_allowed_hosts, or QUICKDRAW_HTTP_ALLOWED_HOSTS; "
                "* allows any; not checked when a bearer token is required)"
            )
        origin = request.headers.get("Origin")
        if origin is not None and _origin_host(origin) not in self._hosts:
            raise PermissionDenied(
                f"requests from the page at Origin {clip_header(origin)!r} are not allowed; allowed hosts: "
                f"{', '.join(sorted(self._hosts))} (setting http_allowed_hosts)"
            )

    def authorize(self, request: web.Request) -> None:
        """The API's credentials: a verified client certificate under mTLS, and the bearer token when one is set.

        A refusal is Unauthenticated (401) and counted in ``auth_failures_total{transport="http"}``, whatever
        went wrong while checking (a header that is not Latin-1, say): an authorization failure is never a 500.
        """
        if self.require_client_cert:
            transport = request.transport
            if transport is None or not transport.get_extra_info("peercert"):
                self.metrics.auth_failures.labels("http", "client_certificate").inc()
                raise Unauthenticated("a client certificate signed by the gateway's client CA is required")
        if self.auth is not None:
            header = request.headers.get("Authorization")
            try:
                self.auth.check(header)
            except Unauthenticated as err:
                self.metrics.auth_failures.labels("http", getattr(err, "reason", None) or _auth_reason(header)).inc()
                raise
            except Exception:
                self.metrics.auth_failures.labels("http", "malformed").inc()
                raise Unauthenticated("malformed authorization header: expected 'Bearer <token>', the token in "
                                      "visible ASCII characters") from None

    def check_body_headers(self, request: web.Request) -> None:
        """Refuse, before reading, a body that is not JSON, is compressed when that is off, or is too long."""
        self.check_body_encoding(request)
        self.check_content_type(request, ("application/json",), "the JSON API")
        self.check_body_length(request)

    @staticmethod
    def check_content_type(request: web.Request, accepted: tuple[str, ...], door: str, absent_ok: bool = False
                           ) -> None:  # fmt: skip
        """Every HTTP door's Content-Type rule: 415 for a type the door does not take. None of them takes the types
        a browser sends cross-site without a preflight (text/plain, forms); a door may take a request without
        the header (``absent_ok``: tritonclient sends none)."""
        sent = request.headers.get("Content-Type")
        if sent is None and absent_ok:
            return
        if request.content_type not in accepted or sent is None:
            takes = " or ".join(f"'Content-Type: {a}'" for a in accepted) + (" or none" if absent_ok else "")
            raise UnsupportedMediaType("Content-Type", f"{door} takes {takes}; the request sent "
                                       + (f"{clip_header(sent)!r}" if sent else "none"))  # fmt: skip

    def check_body_encoding(self, request: web.Request) -> None:
        """Every HTTP door's rule for Content-Encoding: 415 for a compressed body while request compression is off,
        and for an encoding the gateway does not decode."""
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            if not self.limits.request_compression:
                raise UnsupportedMediaType("Content-Encoding", f"request bodies with Content-Encoding "
                                           f"{clip_header(encoding)!r} are refused: request compression is off "
                                           "(setting http_request_compression, or QUICKDRAW_HTTP_REQUEST_COMPRESSION)")
            if encoding not in COMPRESSIONS:
                raise UnsupportedMediaType("Content-Encoding", f"Content-Encoding {clip_header(encoding)!r} is not "
                                           f"supported; use one of: {', '.join(COMPRESSIONS)}, or none")

    def check_body_length(self, request: web.Request) -> None:
        """413, before reading, for a Content-Length over the body limit."""
        length = request.content_length
        if length is not None and length > self.max_body_bytes:
            raise self.too_large()

    async def read_body(self, request: web.Request) -> bytes:
        """The body, under the guards every HTTP door's body goes through: ``http_body_timeout_s`` from the
        headers (408, and the connection closed), CANCELLED when the client leaves mid-body (its doing, not the
        server's), INVALID_ARGUMENT for a malformed chunked or compressed stream, 413 past the limit."""
        timeout = self.limits.body_timeout_s
        try:
            async with asyncio.timeout(timeout) as scope:
                return await self._read_body(request)
        except TimeoutError:
            if not scope.expired():
                raise Cancelled("the connection timed out while the request body was sent") from None
            request.protocol.close()  # no keep-alive: the rest of this body will not be read
            raise RequestTimeout(f"the request body did not arrive within {timeout:g} s of its headers "
                                 "(setting http_body_timeout_s)") from None
        except ConnectionError:  # the client went away mid-body: its doing, not ours
            raise Cancelled("the client closed the connection before its request body was complete") from None
        except web.RequestPayloadError as exc:  # malformed chunked encoding, a corrupt gzip stream
            reason = f"could not be read: {exc}"
            raise InvalidArgument([FieldViolation("", f"request body {reason}")], f"request body {reason}") from None

    async def _read_body(self, request: web.Request) -> bytes:
        """The body, chunk by chunk as it arrives (decompressed in aiohttp's small steps when compression is on,
        where ``request.read()`` would inflate up to the whole limit at once on the event loop); 413 past the
        limit."""
        body = bytearray()
        while chunk := await request.content.readany():
            body += chunk
            if len(body) > self.max_body_bytes:
                raise self.too_large()
        return bytes(body)

    def too_large(self) -> PayloadTooLarge:
        """The 413 for a body over the limit."""
        return PayloadTooLarge(f"request body is over the limit of {self.max_body_bytes} bytes "
                               f"({JSON_BODY_FACTOR} x max_message_bytes={self.max_message_bytes})")


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's own refusals (no such route, wrong method, a body too large) as JSON errors like every other, on
    every path: under /v2 in the Open Inference Protocol's error object
    (``service.frontends.oip.http_api.error_response``'s
    shape: ``{"error": message, "code": NAME, "details": []}``), elsewhere in /v1's."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_TO_GRPC.get(exc.status, grpc.StatusCode.UNKNOWN)
        message = f"{exc.reason}: {request.method} {request.path}"
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        if request.path == "/v2" or request.path.startswith("/v2/"):
            return web.json_response({"error": message, "code": code.name, "details": []}, status=exc.status,
                                     headers=headers)  # fmt: skip
        body = {"error": {"code": exc.status, "status": code.name, "message": message, "details": []}}
        return web.json_response(body, status=exc.status, headers=headers)
