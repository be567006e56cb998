"""Bearer tokens: compared in constant time, refused before anything is read, failures counted and logged at a
bounded rate."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import grpc
from grpc_status import rpc_status

from quickdraw_client.security import (  # the client's half, shared: one implementation
    AUTH_METADATA_KEY,
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


