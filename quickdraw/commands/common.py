"""Helpers shared by several subcommands: default paths, loading drawings from any file, and the options that
reach a gateway protected by TLS, mTLS or a bearer token."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from doodle import Drawing, decode_image, drawing_to_bitmap
from doodle.errors import DoodleError
from doodle.formats import open_bitmaps, read_binary, read_ndjson, read_stroke3

if TYPE_CHECKING:
    from service.security import ClientSecurity

ROOT = Path(__file__).resolve().parents[2]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def sample_dir() -> Path:
    """``QUICKDRAW_SAMPLE_DIR``, or ``../shared/quickdraw`` beside the repository."""
    return Path(os.environ.get("QUICKDRAW_SAMPLE_DIR", ROOT.parent / "shared" / "quickdraw"))


def iter_file_items(path: Path, limit: int | None = None) -> Iterator[tuple[str, bytes | np.ndarray | Drawing]]:
    """Each drawing of a file in its own form: PNG/JPEG bytes, a 28x28 uint8 bitmap (.npy rows) or a Drawing."""
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        yield path.name, path.read_bytes()
        return
    if suffix == ".npy":
        rows = open_bitmaps(path)
        for i in range(len(rows) if limit is None else min(limit, len(rows))):
            yield f"{path.name}[{i}]", np.asarray(rows[i]).reshape(28, 28)
        return
    readers = {".ndjson": read_ndjson, ".bin": read_binary}
    if suffix in readers:
        for i, d in enumerate(readers[suffix](path, limit=limit)):
            yield d.source or f"{path.name}:{i + 1}", d
        return
    if suffix == ".npz":
        for i, d in enumerate(read_stroke3(path)):
            if limit is not None and i >= limit:
                return
            yield d.source, d
        return
    raise DoodleError(f"{path}: unsupported file type; expected PNG/JPEG, .ndjson, .bin, .npz or .npy")


def iter_file_bitmaps(path: Path, limit: int | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(name, 28x28 uint8) for every drawing in a PNG/JPEG, .ndjson, .bin, .npz or .npy file."""
    for name, item in iter_file_items(path, limit):
        if isinstance(item, bytes):
            yield name, decode_image(item)
        elif isinstance(item, Drawing):
            yield name, drawing_to_bitmap(item)
        else:
            yield name, item


def add_security_options(p: argparse.ArgumentParser) -> None:
    """TLS, mTLS and bearer-token options for commands that call the gateway."""
    g = p.add_argument_group(
        "security", "a gateway with TLS, mTLS or a bearer token (any --tls-* option turns TLS on); the token comes "
        "from --token-file or the QUICKDRAW_AUTH_TOKEN environment variable, never from the command line",
    )
    g.add_argument("--tls", action="store_true", help="use TLS, trusting the system's root CAs")
    g.add_argument("--tls-ca-file", type=Path, metavar="PEM", help="CA certificates to verify the gateway with")
    g.add_argument("--tls-cert-file", type=Path, metavar="PEM", help="client certificate (mTLS), with --tls-key-file")
    g.add_argument("--tls-key-file", type=Path, metavar="PEM", help="private key of --tls-cert-file")
    g.add_argument("--tls-server-name", metavar="NAME", help="name to verify in the gateway's certificate instead "
                   "of the target's host")  # fmt: skip
    g.add_argument("--token-file", type=Path, metavar="FILE", help="file whose first line is the bearer token")


def client_security(args: argparse.Namespace) -> ClientSecurity:
    """The ClientSecurity the options of :func:`add_security_options` ask for (ValueError when they are wrong)."""
    from service.security import ClientSecurity, read_token_file

    token = read_token_file(args.token_file, "--token-file")[0] if args.token_file else None
    security = ClientSecurity.from_env(tls=args.tls, ca_file=args.tls_ca_file, cert_file=args.tls_cert_file,
                                       key_file=args.tls_key_file, server_name=args.tls_server_name, token=token)
    security.credentials()  # reads the PEM files now, so a wrong path is reported before any call
    return security
