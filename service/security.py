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
  reflection when ``auth_exempt_reflection`` is set. A refusal is UNAUTHENTICATED, and its message never
  contains what the caller sent.
- **Clients** (:class:`ClientSecurity`): the same options for ``QuickDrawClient``, ``quickdraw classify`` and
  ``quickdraw loadtest``.

Nothing here logs a token, a key or a request.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_status import rpc_status

from service.errors import Unauthenticated, to_rpc_status

if TYPE_CHECKING:
    from service.settings import Settings

#: The environment variable a token may come from, for the gateway and for the client commands alike.
TOKEN_ENV = "QUICKDRAW_AUTH_TOKEN"
AUTH_METADATA_KEY = "authorization"
HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIXES = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")


def read_pem(path: Path | str, what: str) -> bytes:
    """A PEM file's bytes; an unreadable or non-PEM file is a ValueError naming the setting (not the content)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{what}: {path} is not a PEM file (no -----BEGIN line)")
    return data


# --- TLS ----------------------------------------------------------------------------------------------------


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port (client certificates required with ``tls_client_ca_file``), or None."""
    s = settings
    if s.tls_cert_file is None or s.tls_key_file is None:
        return None
    pair = (read_pem(s.tls_key_file, "tls_key_file"), read_pem(s.tls_cert_file, "tls_cert_file"))
    client_ca = read_pem(s.tls_client_ca_file, "tls_client_ca_file") if s.tls_client_ca_file else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


def bind_grpc(server: grpc.aio.Server, settings: Settings) -> int:
    """Add the gRPC port, TLS when configured; returns the bound port."""
    address = f"{settings.host}:{settings.grpc_port}"
    creds = server_credentials(settings)
    return server.add_secure_port(address, creds) if creds is not None else server.add_insecure_port(address)


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


def channel_credentials(
    ca_file: Path | str | None = None, cert_file: Path | str | None = None, key_file: Path | str | None = None,
    what: str = "",
) -> grpc.ChannelCredentials:
    """TLS channel credentials: trust ``ca_file`` (default: the system's roots), present a client certificate
    when ``cert_file`` and ``key_file`` are given (mTLS)."""
    if (cert_file is None) != (key_file is None):
        raise ValueError(f"{what}a client certificate needs both its certificate file and its key file")
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(ca_file, f"{what}CA file") if ca_file else None,
        private_key=read_pem(key_file, f"{what}key file") if key_file else None,
        certificate_chain=read_pem(cert_file, f"{what}certificate file") if cert_file else None,
    )


def tfserving_channel(settings: Settings, options: Sequence[tuple[str, Any]]) -> grpc.aio.Channel:
    """The channel to TF Serving: TLS (mTLS with a client certificate) when configured, else plaintext."""
    s = settings
    if not s.tfserving_uses_tls:
        return grpc.aio.insecure_channel(s.tfserving_target, options=list(options))
    creds = channel_credentials(s.tfserving_tls_ca_file, s.tfserving_tls_cert_file, s.tfserving_tls_key_file,
                                what="tfserving_tls: ")  # fmt: skip
    opts = list(options)
    if s.tfserving_tls_server_name:
        opts.append(("grpc.ssl_target_name_override", s.tfserving_tls_server_name))
    return grpc.aio.secure_channel(s.tfserving_target, creds, options=opts)


# --- bearer tokens ------------------------------------------------------------------------------------------


def valid_token(token: str, what: str) -> str:
    """``token`` if it can travel in an HTTP/2 header (visible ASCII, no spaces); the error never shows it."""
    if not token:
        raise ValueError(f"{what} is empty")
    if not all(33 <= ord(c) <= 126 for c in token):
        raise ValueError(f"{what} must be visible ASCII characters without spaces ({len(token)} characters given)")
    return token


def read_token_file(path: Path | str, what: str = "token file") -> list[str]:
    """The tokens in a file, one per line (blank lines and surrounding whitespace ignored)."""
    try:
        text = Path(path).read_text(encoding="ascii", errors="strict")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not ASCII"
        raise ValueError(f"{what}: cannot read {path}: {reason}") from None
    tokens = [valid_token(line.strip(), f"{what} line {i}") for i, line in enumerate(text.splitlines(), 1)
              if line.strip()]  # fmt: skip
    if not tokens:
        raise ValueError(f"{what}: {path} holds no token")
    return tokens


def _digest(token: str | bytes) -> bytes:
    return hashlib.sha256(token.encode("latin-1") if isinstance(token, str) else token).digest()


class TokenAuth:
    """Accepts ``Bearer <token>`` for any of the configured tokens, compared in constant time."""

    def __init__(self, tokens: Sequence[str]) -> None:
        if not tokens:
            raise ValueError("TokenAuth needs at least one token")
        self._digests = tuple(_digest(valid_token(t, "auth token")) for t in tokens)

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenAuth | None:
        """The tokens of ``auth_token_file`` or ``QUICKDRAW_AUTH_TOKEN``; None when neither is set."""
        if settings.auth_token_file is not None:
            return cls(read_token_file(settings.auth_token_file, "auth_token_file"))
        if settings.auth_token is not None:
            return cls([valid_token(settings.auth_token.get_secret_value().strip(), TOKEN_ENV)])
        return None

    def matches(self, token: str | bytes) -> bool:
        """Whether ``token`` is one of ours: every configured token is compared, with digests of equal length."""
        given = _digest(token)
        ok = False
        for digest in self._digests:
            ok |= hmac.compare_digest(given, digest)
        return ok

    def check(self, authorization: str | bytes | None) -> None:
        """Raise Unauthenticated unless ``authorization`` is ``Bearer <one of our tokens>``."""
        if authorization is None:
            raise Unauthenticated(
                "missing bearer token: send the header 'authorization: Bearer <token>' "
                "(the token the gateway was given in auth_token_file or QUICKDRAW_AUTH_TOKEN)"
            )
        if isinstance(authorization, bytes):
            authorization = authorization.decode("latin-1")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("malformed authorization header: expected 'Bearer <token>'")
        if not self.matches(token.strip()):
            raise Unauthenticated("invalid bearer token")


def _metadata_value(metadata: Sequence[tuple[str, str | bytes]] | None, key: str) -> str | bytes | None:
    for k, v in metadata or ():
        if k == key:
            return v
    return None


def _refusal(handler: grpc.RpcMethodHandler | None, error: Unauthenticated) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that only answers ``error``."""
    status = rpc_status.to_status(to_rpc_status(error))

    async def refuse(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort_with_status(status)

    if handler is None:  # unknown method: do not tell an unauthenticated caller which methods exist
        return grpc.unary_unary_rpc_method_handler(refuse)
    make: Callable[..., grpc.RpcMethodHandler] = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)  # fmt: skip


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call without a valid bearer token with UNAUTHENTICATED, except the exempt methods."""

    def __init__(self, auth: TokenAuth, *, exempt_reflection: bool = False) -> None:
        self._auth = auth
        self._exempt = (HEALTH_PREFIX, *REFLECTION_PREFIXES) if exempt_reflection else (HEALTH_PREFIX,)

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
        except Unauthenticated as err:
            return _refusal(handler, err)
        return handler


def grpc_interceptors(settings: Settings, auth: TokenAuth | None) -> list[grpc.aio.ServerInterceptor]:
    """The server interceptors the settings ask for (none without a token)."""
    if auth is None:
        return []
    return [BearerTokenInterceptor(auth, exempt_reflection=settings.auth_exempt_reflection)]


# --- clients ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientSecurity:
    """How a client reaches a protected gateway: TLS (``tls``, implied by any file), mTLS (``cert_file`` and
    ``key_file``), a server name to check instead of the target's host, and a bearer token."""

    tls: bool = False
    ca_file: Path | str | None = None
    cert_file: Path | str | None = None
    key_file: Path | str | None = None
    server_name: str | None = None
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.token is not None:
            valid_token(self.token, "the token")

    @property
    def uses_tls(self) -> bool:
        """Whether the channel is TLS."""
        return bool(self.tls or self.ca_file or self.cert_file or self.key_file or self.server_name)

    @classmethod
    def from_env(cls, **kwargs: Any) -> ClientSecurity:
        """``kwargs``, with the token from ``QUICKDRAW_AUTH_TOKEN`` when none is given and it is set."""
        if kwargs.get("token") is None and os.environ.get(TOKEN_ENV):
            kwargs["token"] = os.environ[TOKEN_ENV].strip()
        return cls(**kwargs)

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS channel credentials, or None for plaintext."""
        return channel_credentials(self.ca_file, self.cert_file, self.key_file) if self.uses_tls else None

    def options(self) -> list[tuple[str, Any]]:
        """Channel options this adds (the server name override)."""
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        """Call metadata: the bearer token, if any (sent over plaintext too, e.g. inside a service mesh)."""
        return ((AUTH_METADATA_KEY, f"Bearer {self.token}"),) if self.token else None

    def channel(self, target: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        """A blocking channel to ``target``."""
        creds, opts = self.credentials(), [*options, *self.options()]
        return grpc.secure_channel(target, creds, opts) if creds else grpc.insecure_channel(target, opts)

    def aio_channel(self, target: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        """An asyncio channel to ``target``."""
        creds, opts = self.credentials(), [*options, *self.options()]
        return grpc.aio.secure_channel(target, creds, opts) if creds else grpc.aio.insecure_channel(target, opts)
