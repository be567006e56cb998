"""Drawings from files, for ``quickdraw classify``: the forms backend teams have, read without the server package.

- PNG/JPEG: the file's bytes, sent as an image (the gateway decodes it);
- ``.npy`` (Google's numpy_bitmap: an (N, 784) uint8 array): each row, as a 28x28 bitmap;
- ``.ndjson`` (Google's simplified or raw drawings): each line's ``drawing``, as strokes; a drawing whose strokes
  carry times (``[x...], [y...], [t...]``) is raw and sent for the gateway to normalise.

Each drawing is named as the server package names it (``cat.ndjson:3``, ``cat.npy[0]``, ``doodle.png``), so the
output of ``quickdraw classify`` is the same from either install. The server package adds ``.bin`` and ``.npz``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from quickdraw_client.drawings import DrawingLike

BITMAP_SIDE = 28  # as quickdraw_client.drawings (not imported here: it loads the protobuf code)
BITMAP_PIXELS = BITMAP_SIDE * BITMAP_SIDE

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
#: (name, drawing, raw) for each drawing of a file.
Item = tuple[str, "DrawingLike", bool]
#: Reads a file's drawings: ``reader(path, limit)``.
Reader = Callable[[Path, int | None], Iterator[Item]]


class InputError(ValueError):
    """A file that cannot be read as drawings; the message names the file and what is wrong."""


def read_drawings(path: Path, limit: int | None = None) -> Iterator[Item]:
    """Every drawing of a PNG/JPEG, ``.npy`` or ``.ndjson`` file, at most ``limit`` (images count as one)."""
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        yield path.name, path.read_bytes(), False
    elif suffix == ".npy":
        yield from _read_npy(path, limit)
    elif suffix == ".ndjson":
        yield from _read_ndjson(path, limit)
    elif suffix in (".bin", ".npz"):
        raise InputError(f"{path}: {suffix} files need the server package (pip install quickdraw-service); "
                         "the client reads PNG/JPEG, .ndjson and .npy")  # fmt: skip
    else:
        raise InputError(f"{path}: unsupported file type; expected PNG/JPEG, .ndjson or .npy")


def _read_npy(path: Path, limit: int | None) -> Iterator[Item]:
    try:
        rows = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise InputError(f"{path}: not a .npy file: {exc}") from None
    if rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != BITMAP_PIXELS:
        raise InputError(f"{path}: expected a uint8 array of shape (N, {BITMAP_PIXELS}), got {rows.dtype} {rows.shape}")
    for i in range(len(rows) if limit is None else min(limit, len(rows))):
        yield f"{path.name}[{i}]", np.asarray(rows[i]).reshape(BITMAP_SIDE, BITMAP_SIDE), False


def _read_ndjson(path: Path, limit: int | None) -> Iterator[Item]:
    count = 0
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if limit is not None and count >= limit:
                return
            if not line.strip():
                continue
            try:
                record: Any = json.loads(line)
                strokes = record["drawing"]
                raw = any(len(s) == 3 for s in strokes)
            except (ValueError, TypeError, KeyError) as exc:
                raise InputError(f"{path}: line {lineno}: not a drawing ({exc})") from None
            count += 1
            yield f"{path.name}:{lineno}", strokes, raw
