"""Helpers shared by several subcommands: default paths (the model directory, resolved from the project when
the working directory has none), loading drawings from any file, and (from the client distribution) the options
that reach a gateway protected by TLS, mTLS or a bearer token."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from doodle import Drawing, decode_image, drawing_to_bitmap
from doodle.errors import DoodleError
from doodle.formats import open_bitmaps, read_binary, read_ndjson, read_stroke3
from quickdraw_client.cli import add_security_options, check_files, client_security  # one implementation, the client's
from quickdraw_client.cmdline import UsageError
from quickdraw_client.files import Item

__all__ = ["UsageError", "add_security_options", "check_files", "client_security"]

ROOT = Path(__file__).resolve().parents[2]
#: The model directory every command defaults to, relative to the working directory or else to the project.
DEFAULT_MODEL_DIR = Path("models") / "quickdraw"
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


def read_for_classify(path: Path, limit: int | None = None) -> Iterator[Item]:
    """``quickdraw classify``'s reader with the server package: every format :func:`iter_file_items` reads (the
    client's own reader has no ``.bin`` or ``.npz``), as (name, drawing, raw)."""
    for name, item in iter_file_items(path, limit):
        if isinstance(item, Drawing):
            yield name, item.google_strokes(), item.raw
        else:
            yield name, item, False


def resolve_model_dir(given: Path | None, option: str, env: str | None = None) -> Path:
    """The model base directory a command should use, absolute.

    ``given`` (an option or ``env``) is used as it is, relative to the working directory, and must exist. The
    default, ``models/quickdraw``, is looked for in the working directory and then in the project the package
    runs from (a checkout, as after ``make run``), so the command works from any directory. A UsageError says
    exactly what to pass when neither has it.
    """
    how = f"pass {option} PATH" + (f" or set {env}" if env else "")
    if given is not None:
        path = given.expanduser()
        if not path.is_dir():
            where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
            raise UsageError(f"{option} {given}: no such directory{where}: {how}, the directory holding the model's "
                             "version folders (1/, 2/, ...)")  # fmt: skip
        return path.resolve()
    for base in (Path.cwd(), ROOT):
        if (base / DEFAULT_MODEL_DIR).is_dir():
            return (base / DEFAULT_MODEL_DIR).resolve()
    raise UsageError(f"no model at {DEFAULT_MODEL_DIR} (relative to {Path.cwd()}, nor in {ROOT}): {how}, the "
                     "directory holding the model's version folders (1/, 2/, ...)")  # fmt: skip
