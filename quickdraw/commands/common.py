"""Helpers shared by several subcommands: default paths and loading drawings from any file."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from doodle import Drawing, decode_image, drawing_to_bitmap
from doodle.errors import DoodleError
from doodle.formats import open_bitmaps, read_binary, read_ndjson, read_stroke3

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
