"""How a client reaches a protected gateway: TLS, mTLS (a client certificate) and a bearer token.

``ClientSecurity`` is what :class:`quickdraw_client.QuickDrawClient`, :class:`quickdraw_client.AsyncQuickDrawClient`,
``quickdraw classify`` and ``quickdraw loadtest`` take. The token comes from the argument, a token file or the
``QUICKDRAW_AUTH_TOKEN`` environment variable (``ClientSecurity.from_env``), never from a command line, and it is
never part of an error message or a ``repr``. The server package (``service.security``) uses these same functions
for its own channels (to TF Serving) and token files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # grpc is imported where a channel is made, so that a command's --help stays fast
    import grpc
    import grpc.aio

#: The environment variable a token may come from, for the gateway and for the client commands alike.
TOKEN_ENV = "QUICKDRAW_AUTH_TOKEN"
AUTH_METADATA_KEY = "authorization"


def read_pem(path: Path | str, what: str) -> bytes:
    """A PEM file's bytes; an unreadable or non-PEM file is a ValueError naming the setting (not the content)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{what}: {path} is not a PEM file (no -----BEGIN line)")
    return data


def channel_credentials(
    ca_file: Path | str | None = None, cert_file: Path | str | None = None, key_file: Path | str | None = None,
    what: str = "",
) -> grpc.ChannelCredentials:
    """TLS channel credentials: trust ``ca_file`` (default: the system's roots), present a client certificate
    when ``cert_file`` and ``key_file`` are given (mTLS)."""
    import grpc

    if (cert_file is None) != (key_file is None):
        raise ValueError(f"{what}a client certificate needs both its certificate file and its key file")
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(ca_file, f"{what}CA file") if ca_file else None,
        private_key=read_pem(key_file, f"{what}key file") if key_file else None,
        certificate_chain=read_pem(cert_file, f"{what}certificate file") if cert_file else None,
    )  # fmt: skip


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
        import grpc

        creds, opts = self.credentials(), [*options, *self.options()]
        return grpc.secure_channel(target, creds, opts) if creds else grpc.insecure_channel(target, opts)

    def aio_channel(self, target: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        """An asyncio channel to ``target``."""
        import grpc.aio

        creds, opts = self.credentials(), [*options, *self.options()]
        return grpc.aio.secure_channel(target, creds, opts) if creds else grpc.aio.insecure_channel(target, opts)
