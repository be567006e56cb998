"""numpy_bitmap ``.npy`` files: memory-mapped (N, 784) uint8 arrays, one drawing a row.

Google's files are 100 to 200 MB each, so a file is never read whole: the header is parsed by hand
and the rows are mapped with ``np.memmap``, which lets the kernel page them in and drop them again.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from doodle.drawing import BITMAP_PIXELS, BITMAP_SIDE, Bitmap
from doodle.errors import DrawingFormatError


def class_from_path(path: str | os.PathLike[str]) -> str:
    """Google names every file after its class: ``alarm clock.npy`` holds class ``alarm clock``."""
    name = Path(path).name
    for suffix in (".ndjson", ".npy", ".npz", ".bin", ".full"):
        name = name.removesuffix(suffix)
    return name


def open_bitmaps(path: str | os.PathLike[str]) -> NDArray[np.uint8]:
    """Map a numpy_bitmap file read-only and return its (N, 784) uint8 rows without reading them.

    Raises DrawingFormatError naming the file and byte offset when the header, dtype, shape or size
    is wrong (a truncated download, say).
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            offset = fh.tell()
    except (ValueError, OSError, SyntaxError) as exc:
        raise DrawingFormatError(path, "byte offset 0", f"not a .npy file: {exc}") from exc
    if dtype != np.uint8 or fortran or len(shape) != 2 or shape[1] != BITMAP_PIXELS:
        raise DrawingFormatError(
            path,
            "byte offset 0",
            f"expected a C-order uint8 array of shape (N, {BITMAP_PIXELS}), "
            f"header says {dtype} {shape}{' fortran-order' if fortran else ''}",
        )
    expected = offset + shape[0] * shape[1]
    size = path.stat().st_size
    if size != expected:
        raise DrawingFormatError(
            path, f"byte offset {min(size, expected)}",
            f"file is {size} bytes but its header promises {expected} ({shape[0]} rows)",
        )
    if shape[0] == 0:
        return np.zeros((0, BITMAP_PIXELS), dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=tuple(shape))


def read_bitmaps(
    path: str | os.PathLike[str], start: int = 0, stop: int | None = None
) -> Iterator[Bitmap]:
    """Yield rows ``start:stop`` of a numpy_bitmap file as 28x28 views into the mapping."""
    rows = open_bitmaps(path)
    word = class_from_path(path)
    stop = len(rows) if stop is None else min(stop, len(rows))
    name = Path(path).name
    for i in range(start, stop):
        yield Bitmap(word, i, rows[i].reshape(BITMAP_SIDE, BITMAP_SIDE), f"{name}[{i}]")
