"""Transport security and caller authentication: TLS/mTLS credentials from PEM files, and bearer tokens.

- **Server TLS** (:func:`bind_grpc`): with ``tls_cert_file`` and ``tls_key_file`` the gRPC port speaks only
  TLS; with ``tls_client_ca_file`` too, a client must present a certificate signed by one of those CAs (mTLS),
  checked in the handshake. :func:`http_ssl_context` gives the HTTP port the same certificate when
  ``http_tls`` is set; it *asks* for a client certificate, and the JSON API (not /metrics) requires one when
  ``tls_client_ca_file`` is set, so mTLS cannot be bypassed through the JSON API.
- **TF Serving channel** (:func:`tfserving_channel`): TLS, optionally with a client certificate (mTLS) and a
  server name to check instead of the target's host.
- **Bearer tokens** (:class:`TokenAuth`, :class:`BearerTokenInterceptor`): the token comes from
  ``auth_token_file`` (one per line, so a new one can be added before the old one is removed) or from the
  ``QUICKDRAW_AUTH_TOKEN`` environment variable, never from the command line. Callers send
  ``authorization: Bearer <token>``; it is compared in constant time (SHA-256 digests through
  ``hmac.compare_digest``, so neither content nor length leaks). ``grpc.health.v1`` is always exempt, server
  reflection when ``auth_exempt_reflection`` is set. A refusal is UNAUTHENTICATED (whatever the caller sent:
  a non-ASCII or control character is an invalid token, never an INTERNAL error), its message never contains
  what the caller sent, and it deserializes nothing: a refused call's message is dropped unread, a refused
  stream is never read. A configured token has at least ``MIN_TOKEN_CHARS`` characters (``service.settings``).
- **Failed authentications** (:class:`AuthFailureLog`) are counted in ``quickdraw_auth_failures_total``
  {transport, reason} and logged at a bounded rate: at most one WARNING line per ``AUTH_LOG_INTERVAL_S`` with
  the count since the last line, never the token.
- **Logs** (:func:`install_log_redaction`): every log record, of every logger at every level, is rendered and
  stripped of ``authorization`` header values, ``Bearer <token>`` strings, the configured tokens and raw header
  lines (aiohttp quotes a malformed header line, token included, in its parse errors), tracebacks included.
- **Clients** (:class:`ClientSecurity`, from the client distribution's ``quickdraw_client.security``, with
  :func:`read_pem`, :func:`channel_credentials`, :func:`valid_token` and :func:`read_token_file`): the same options
  for ``QuickDrawClient``, ``quickdraw classify`` and ``quickdraw loadtest``.

Nothing here logs a token, a key or a request.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import hmac
import logging
import re
import socket
import ssl
import threading
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from grpc_status import rpc_status

from quickdraw_client.security import (  # the client's half, shared: one implementation
    AUTH_METADATA_KEY,
    ClientSecurity,  # noqa: F401  (re-exported: service.security.ClientSecurity)
    channel_credentials,
    read_pem,
)
from service.core.errors import Unauthenticated, to_rpc_status
from service.settings import strong_token

if TYPE_CHECKING:
    from service.core.metrics import Metrics
    from service.settings import Settings

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIXES = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")
#: At most one WARNING line about failed authentications per this many seconds.
AUTH_LOG_INTERVAL_S = 10.0


# --- TLS ----------------------------------------------------------------------------------------------------


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port (client certificates required with ``tls_client_ca_file``), or None."""
    s = settings
    if s.tls_cert_file is None or s.tls_key_file is None:
        return None
    pair = (read_pem(s.tls_key_file, "tls_key_file"), read_pem(s.tls_cert_file, "tls_cert_file"))
    client_ca = read_pem(s.tls_client_ca_file, "tls_client_ca_file") if s.tls_client_ca_file else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


class BindError(OSError):
    """A port the gateway cannot listen on; the message names the port and the option that changes it."""


def port_in_use(host: str, port: int) -> bool:
    """Whether something listens on ``host:port`` already (a bind with SO_REUSEADDR, as the servers do, fails with
    EADDRINUSE). Port 0 is never in use; an address that cannot be resolved is not "in use" either."""
    if port == 0:
        return False
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]  # fmt: skip
    except OSError:
        return False
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def bind_error(host: str, port: int, option: str, exc: BaseException) -> BindError:
    """The one-line error for a port that could not be bound: in use, or why not."""
    if port_in_use(host, port) or getattr(exc, "errno", None) == errno.EADDRINUSE:
        return BindError(f"port {port} is in use: stop the other server or pass {option}")
    reason = getattr(exc, "strerror", None) or str(exc).split(";")[0]
    return BindError(f"cannot listen on {host}:{port} ({reason}): pass another {option} or --host")


def bind_grpc(server: grpc.aio.Server, settings: Settings) -> int:
    """Add the gRPC port, TLS when configured; returns the bound port (BindError when it cannot be bound)."""
    address = f"{settings.host}:{settings.grpc_port}"
    creds = server_credentials(settings)
    try:
        return server.add_secure_port(address, creds) if creds is not None else server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc's "Failed to bind to address ...", whatever the reason
        raise bind_error(settings.host, settings.grpc_port, "--grpc-port", exc) from exc


def transport_summary(settings: Settings) -> str:
    """How the gRPC port is protected, for the start-up log line (no secrets)."""
    tls = "plaintext"
    if settings.tls_cert_file is not None:
        tls = "mTLS (client certificates required)" if settings.tls_client_ca_file else "TLS"
    auth = ", bearer token required" if settings.auth_token_file or settings.auth_token else ""
    return tls + auth


def http_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """TLS for the HTTP port when ``http_tls`` is set: the gRPC port's certificate; client certificates are asked
    for and verified against ``tls_client_ca_file`` but not required by the handshake (the JSON API requires one,
    /metrics does not)."""
    s = settings
    if not s.http_tls or s.tls_cert_file is None or s.tls_key_file is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    read_pem(s.tls_cert_file, "tls_cert_file")
    read_pem(s.tls_key_file, "tls_key_file")
    ctx.load_cert_chain(s.tls_cert_file, s.tls_key_file)
    if s.tls_client_ca_file is not None:
        ctx.load_verify_locations(cadata=read_pem(s.tls_client_ca_file, "tls_client_ca_file").decode("ascii"))
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def tfserving_channel(
    settings: Settings, options: Sequence[tuple[str, Any]], target: str | None = None
) -> grpc.aio.Channel:
    """A channel to TF Serving (``target``, default ``tfserving_target``): TLS (mTLS with a client certificate)
    when configured, else plaintext."""
    s = settings
    target = target or s.tfserving_target
    if not s.tfserving_uses_tls:
        return grpc.aio.insecure_channel(target, options=list(options))
    creds = channel_credentials(s.tfserving_tls_ca_file, s.tfserving_tls_cert_file, s.tfserving_tls_key_file,
                                what="tfserving_tls: ")  # fmt: skip
    opts = list(options)
    if s.tfserving_tls_server_name:
        opts.append(("grpc.ssl_target_name_override", s.tfserving_tls_server_name))
    return grpc.aio.secure_channel(target, creds, options=opts)


# --- bearer tokens ------------------------------------------------------------------------------------------


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


class TokenRefused(Unauthenticated):
    """A refused bearer token, with the reason counted in ``quickdraw_auth_failures_total``: missing, malformed
    or invalid."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


#: The blanks an HTTP parser drops around a header value (RFC 9110 OWS); anything else is part of the token.
_OWS = " \t"


class TokenAuth:
    """Accepts ``Bearer <token>`` for any of the configured tokens, compared in constant time."""

    def __init__(self, tokens: Sequence[str]) -> None:
        if not tokens:
            raise ValueError("TokenAuth needs at least one token")
        self._digests = tuple(_digest(strong_token(t, "auth token").encode("ascii")) for t in tokens)

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenAuth | None:
        """The tokens of ``auth_token_file`` or ``QUICKDRAW_AUTH_TOKEN``; None when neither is set."""
        tokens = settings.tokens()
        return cls(tokens) if tokens else None

    def matches(self, token: str | bytes) -> bool:
        """Whether ``token`` is one of ours: every configured token is compared, with digests of equal length.

        A token that is not visible ASCII (a non-ASCII or control character, a space) is never one of ours.
        """
        try:
            raw = token.encode("ascii") if isinstance(token, str) else bytes(token)
        except UnicodeEncodeError:
            return False
        if not raw or not all(33 <= b <= 126 for b in raw):
            return False
        given = _digest(raw)
        ok = False
        for digest in self._digests:
            ok |= hmac.compare_digest(given, digest)
        return ok

    def check(self, authorization: str | bytes | None) -> None:
        """Raise :class:`TokenRefused` (UNAUTHENTICATED) unless ``authorization`` is ``Bearer <one of our tokens>``.

        Whatever the header holds (any bytes, any characters), the outcome is this or success, never another error.
        """
        if authorization is None:
            raise TokenRefused(
                "missing bearer token: send the header 'authorization: Bearer <token>' "
                "(the token the gateway was given in auth_token_file or QUICKDRAW_AUTH_TOKEN)",
                "missing",
            )
        if isinstance(authorization, bytes):
            authorization = authorization.decode("latin-1")  # every byte maps to one character: never fails
        scheme, _, token = authorization.strip(_OWS).partition(" ")
        token = token.strip(_OWS)
        if scheme.lower() != "bearer" or not token:
            raise TokenRefused("malformed authorization header: expected 'Bearer <token>'", "malformed")
        if not self.matches(token):
            raise TokenRefused("invalid bearer token", "invalid")


class AuthFailureLog:
    """Counts failed authentications in ``quickdraw_auth_failures_total`` {transport, reason} and logs them at a
    bounded rate: the first failure after a quiet spell at once, then at most one WARNING line per ``interval_s``
    with the count since the last line (a line is due at the end of a window that saw failures). Never the token.
    """

    def __init__(self, metrics: Metrics | None, transport: str, interval_s: float = AUTH_LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic, logger: logging.Logger = log) -> None:  # fmt: skip
        self.metrics, self.transport, self.interval_s = metrics, transport, interval_s
        self._clock, self._log = clock, logger
        self._lock = threading.Lock()
        self._pending: Counter[str] = Counter()
        self._next_line_at = float("-inf")
        self._since = clock()
        self._timer: asyncio.TimerHandle | None = None
        self._last_method: str | None = None

    def failed(self, reason: str, method: str | None = None) -> None:
        """Count one failure, and log it now or later within the rate."""
        if self.metrics is not None:
            self.metrics.auth_failures.labels(self.transport, reason).inc()
        with self._lock:
            self._pending[reason] += 1
            self._last_method = method
            now = self._clock()
            if now >= self._next_line_at:
                self._flush_locked(now)
            elif self._timer is None:
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:
                    return  # no loop: the next failure after the window logs the count
                self._timer = loop.call_later(self._next_line_at - now, self.flush)

    def flush(self) -> None:
        """Log what was counted since the last line, if anything."""
        with self._lock:
            self._timer = None
            if self._pending:
                self._flush_locked(self._clock())

    def _flush_locked(self, now: float) -> None:
        n = sum(self._pending.values())
        reasons = ", ".join(f"{r} {c}" for r, c in sorted(self._pending.items()))
        where = f"; last on {self._last_method}" if self._last_method else ""
        self._log.warning("%d failed %s authentication(s) in the last %.0f s (%s)%s; further failures are "
                          "logged at most once per %.0f s", n, self.transport, min(now - self._since, 1e9),
                          reasons, where, self.interval_s)  # fmt: skip
        self._pending.clear()
        self._since, self._next_line_at = now, now + self.interval_s


def _metadata_value(metadata: Sequence[tuple[str, str | bytes]] | None, key: str) -> str | bytes | None:
    for k, v in metadata or ():
        if k == key:
            return v
    return None


def _refusal(handler: grpc.RpcMethodHandler | None, error: Unauthenticated) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that only answers ``error`` and deserializes nothing.

    With no request deserializer gRPC hands over the message's raw bytes, which are dropped; a request stream is
    never read. So an unauthenticated caller's message is never parsed into objects (a 4 MiB message of 2 million
    empty drawings would otherwise cost hundreds of MB), whatever it holds.
    """
    status = rpc_status.to_status(to_rpc_status(error))

    async def refuse(request: object, context: grpc.aio.ServicerContext) -> None:
        del request  # raw bytes, or a stream left unread
        await context.abort_with_status(status)

    if handler is None:  # unknown method: do not tell an unauthenticated caller which methods exist
        return grpc.unary_unary_rpc_method_handler(refuse)
    make: Callable[..., grpc.RpcMethodHandler] = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(refuse, request_deserializer=None, response_serializer=handler.response_serializer)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call without a valid bearer token with UNAUTHENTICATED, except the exempt methods; counts and
    logs (at a bounded rate) each refusal through ``failures``."""

    def __init__(self, auth: TokenAuth, *, exempt_reflection: bool = False,
                 failures: AuthFailureLog | None = None) -> None:  # fmt: skip
        self._auth = auth
        self._exempt = (HEALTH_PREFIX, *REFLECTION_PREFIXES) if exempt_reflection else (HEALTH_PREFIX,)
        self.failures = failures or AuthFailureLog(None, "grpc")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Pass exempt methods and authenticated calls on; answer the rest UNAUTHENTICATED."""
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        if method.startswith(self._exempt):
            return handler
        metadata = handler_call_details.invocation_metadata  # type: ignore[attr-defined]
        try:
            self._auth.check(_metadata_value(metadata, AUTH_METADATA_KEY))
        except TokenRefused as err:
            # the method is named only when it is one of ours (an unknown one is the caller's text)
            self.failures.failed(err.reason, method if handler is not None else None)
            return _refusal(handler, err)
        return handler


def grpc_interceptors(
    settings: Settings, auth: TokenAuth | None, metrics: Metrics | None = None
) -> list[grpc.aio.ServerInterceptor]:
    """The server interceptors the settings ask for (none without a token); failed authentications are counted in
    ``metrics`` when given."""
    if auth is None:
        return []
    return [BearerTokenInterceptor(auth, exempt_reflection=settings.auth_exempt_reflection,
                                   failures=AuthFailureLog(metrics, "grpc"))]  # fmt: skip


# --- logs: no token, no raw header line ----------------------------------------------------------------------

REDACTED = "[REDACTED]"
#: An authorization header's value, in any rendering (header line, dict or tuple repr): to the end of the line.
_AUTHORIZATION = re.compile(r"(?i)(\b(?:proxy-)?authorization\b['\"]?\s*[:=,]\s*)[^\r\n]*")
#: ``Bearer <token>``, but not the phrase "bearer token" of our own messages.
_BEARER = re.compile(r"(?i)(\bbearer\s+)(?!token\b)\S+")
#: Raw bytes as Python shows them (aiohttp quotes a malformed header line, or its value, so in parse errors).
_BYTES_REPR = re.compile(r"""\bb(?:'(?:[^'\\\r\n]|\\.)*'|"(?:[^"\\\r\n]|\\.)*")""")
#: aiohttp's parse errors that quote a header or status line as text.
_QUOTED_LINE = re.compile(r"(?i)((?:invalid http header|bad status line|bad http method in status line|"
                          r"when reading)[:]?\s*)[^\r\n]*")  # fmt: skip


class LogRedactor:
    """Strips secrets from text: configured tokens, ``authorization`` values, ``Bearer`` tokens, raw header lines."""

    def __init__(self) -> None:
        self._tokens: tuple[str, ...] = ()
        self._lock = threading.Lock()

    def add_tokens(self, tokens: Iterable[str]) -> None:
        """Also redact these literal strings (the server's configured tokens), wherever they appear."""
        with self._lock:
            self._tokens = tuple(sorted({*self._tokens, *(t for t in tokens if t)}, key=len, reverse=True))

    def __call__(self, text: str) -> str:
        """``text`` without secrets."""
        for token in self._tokens:
            if token in text:
                text = text.replace(token, REDACTED)
        text = _AUTHORIZATION.sub(lambda m: m.group(1) + REDACTED, text)
        text = _BEARER.sub(lambda m: m.group(1) + REDACTED, text)
        text = _QUOTED_LINE.sub(lambda m: m.group(1) + "[raw line redacted]", text)
        return _BYTES_REPR.sub("b'[raw bytes redacted]'", text)


#: The one redactor of this process, used by the log record factory that :func:`install_log_redaction` installs.
redact = LogRedactor()
_installed = False
_install_lock = threading.Lock()


def _redact_record(record: logging.LogRecord) -> None:
    """Render the record's message and traceback, redacted, in place of the originals."""
    try:
        message = record.getMessage()
    except Exception:  # a bad format string: logging would print the raw arguments to stderr
        message, record.args = f"{record.msg!s} (unformattable log arguments dropped)", ()
        record.msg = redact(message)
    else:
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
    if record.exc_info and record.exc_info[0] is not None:
        # logging.Formatter shows exc_text when it is set, instead of formatting exc_info again
        record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
    elif record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


def install_log_redaction(tokens: Iterable[str] = ()) -> None:
    """Redact every log record of this process from now on, and these tokens too (idempotent; tokens add up).

    A ``logging.setLogRecordFactory`` wrapper, so it covers every logger and every handler, at every level:
    aiohttp's parse errors, gRPC's, asyncio's and ours alike.
    """
    global _installed
    redact.add_tokens(tokens)
    with _install_lock:
        if _installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            try:
                _redact_record(record)
            except Exception:  # never lose a log line to the redactor; never show it unredacted either
                record.msg, record.args, record.exc_info, record.exc_text = "[log record redacted]", (), None, None
            return record

        logging.setLogRecordFactory(factory)
        _installed = True
