"""TLS and mTLS from PEM files: the gRPC port's credentials, the HTTP port's SSL context, the channel to TF
Serving; binding the ports with an error that names the option."""

from __future__ import annotations

import errno
import logging
import socket
import ssl
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc

from quickdraw_client.security import (  # the client's half, shared: one implementation
    channel_credentials,
    read_pem,
)

if TYPE_CHECKING:
    from service.settings import Settings


log = logging.getLogger(__name__)



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


