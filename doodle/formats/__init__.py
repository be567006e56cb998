"""Readers and writers for every Quick, Draw! file format, and detection of which one a file is."""

from __future__ import annotations

import json
import os
from enum import StrEnum
from pathlib import Path

from doodle.errors import DrawingFormatError
from doodle.formats.binary import read_binary, write_binary
from doodle.formats.bitmap import class_from_path, open_bitmaps, read_bitmaps
from doodle.formats.ndjson import count_lines, read_ndjson, write_ndjson
from doodle.formats.stroke3 import read_stroke3, stroke3_to_strokes, strokes_to_stroke3, write_stroke3


class Format(StrEnum):
    """The formats Google publishes, named as in its bucket (``sketchrnn`` for the ``.npz`` files)."""

    NUMPY_BITMAP = "numpy_bitmap"
    SIMPLIFIED = "simplified"
    RAW = "raw"
    BINARY = "binary"
    SKETCHRNN = "sketchrnn"


def detect_format(path: str | os.PathLike[str]) -> Format:
    """Tell a file's format from its extension and, for ndjson, from its first record."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return Format.NUMPY_BITMAP
    if suffix == ".bin":
        return Format.BINARY
    if suffix == ".npz":
        return Format.SKETCHRNN
    if suffix == ".ndjson":
        with path.open("r", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if line.strip():
                    try:
                        strokes = json.loads(line)["drawing"]
                        return Format.RAW if any(len(s) == 3 for s in strokes) else Format.SIMPLIFIED
                    except (ValueError, KeyError, TypeError) as exc:
                        raise DrawingFormatError(path, f"line {lineno}", f"not a drawing: {exc}") from exc
        return Format.SIMPLIFIED
    raise DrawingFormatError(path, "name", "unknown extension: expected .npy, .ndjson, .bin or .npz")


__all__ = [
    "Format",
    "class_from_path",
    "count_lines",
    "detect_format",
    "open_bitmaps",
    "read_binary",
    "read_bitmaps",
    "read_ndjson",
    "read_stroke3",
    "stroke3_to_strokes",
    "strokes_to_stroke3",
    "write_binary",
    "write_ndjson",
    "write_stroke3",
]
