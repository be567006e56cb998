"""Google's ``binary`` ``.bin`` format: packed little-endian records of simplified drawings.

Each record is::

    key_id       uint64
    countrycode  2 bytes (ASCII)
    recognized   uint8
    timestamp    uint32 (seconds since the Unix epoch)
    n_strokes    uint16
    n_strokes x (n_points uint16, x uint8[n_points], y uint8[n_points])

The class is not stored: it comes from the file name. Only simplified drawings (integer coordinates
0..255, no time) fit this format.
"""

from __future__ import annotations

import datetime as dt
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from doodle.drawing import Drawing
from doodle.errors import DrawingFormatError
from doodle.formats.bitmap import class_from_path

_HEAD = struct.Struct("<Q2sBIH")
_U16 = struct.Struct("<H")


def read_binary(path: str | os.PathLike[str], limit: int | None = None) -> Iterator[Drawing]:
    """Yield the drawings of a ``.bin`` file in order, streaming it record by record.

    A truncated or inconsistent record raises DrawingFormatError with the record's byte offset.
    """
    path = Path(path)
    word = class_from_path(path)
    with path.open("rb") as fh:
        index = 0
        while limit is None or index < limit:
            offset = fh.tell()
            head = fh.read(_HEAD.size)
            if not head:
                return
            try:
                drawing = _read_record(fh, head, word, f"{path.name}@{offset}")
            except ValueError as exc:
                raise DrawingFormatError(path, f"byte offset {offset} (record {index})", str(exc)) from exc
            index += 1
            yield drawing


def _read_exact(fh: BinaryIO, n: int, what: str) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise ValueError(f"truncated {what}: wanted {n} bytes, got {len(data)}")
    return data


def _read_record(fh: BinaryIO, head: bytes, word: str, source: str) -> Drawing:
    if len(head) != _HEAD.size:
        raise ValueError(f"truncated header: wanted {_HEAD.size} bytes, got {len(head)}")
    key_id, country, recognized, timestamp, n_strokes = _HEAD.unpack(head)
    if recognized > 1:
        raise ValueError(f"recognized must be 0 or 1, got {recognized}")
    strokes = []
    for s in range(n_strokes):
        (n_points,) = _U16.unpack(_read_exact(fh, 2, f"point count of stroke {s}"))
        xy = np.frombuffer(_read_exact(fh, 2 * n_points, f"points of stroke {s}"), dtype=np.uint8)
        strokes.append(xy.reshape(2, n_points).T.astype(np.float64))
    try:
        cc = country.decode("ascii").rstrip("\x00")
    except UnicodeDecodeError as exc:
        raise ValueError(f"countrycode {country!r} is not ASCII") from exc
    return Drawing(
        word=word,
        strokes=tuple(strokes),
        key_id=key_id,
        countrycode=cc,
        recognized=bool(recognized),
        timestamp=dt.datetime.fromtimestamp(timestamp, tz=dt.UTC),
        source=source,
    )


def write_binary(path: str | os.PathLike[str], drawings: Iterable[Drawing]) -> int:
    """Write simplified drawings in Google's binary format; returns the number written.

    Raises ValueError for a drawing that cannot be represented (raw coordinates, >65535 points).
    """
    n = 0
    with open(path, "wb") as fh:
        for d in drawings:
            if d.raw:
                raise ValueError(f"{d.source or d.word}: raw drawings must be simplified before binary")
            ts = int(d.timestamp.timestamp()) if d.timestamp is not None else 0
            cc = (d.countrycode or "").encode("ascii")[:2].ljust(2, b"\x00")
            fh.write(_HEAD.pack(d.key_id or 0, cc, int(bool(d.recognized)), ts, len(d.strokes)))
            for s in d.strokes:
                pts = s[:, :2]
                if pts.min(initial=0) < 0 or pts.max(initial=0) > 255 or np.any(np.mod(pts, 1)):
                    raise ValueError(f"{d.source or d.word}: coordinates must be integers 0..255")
                fh.write(_U16.pack(len(pts)))
                fh.write(pts.T.astype(np.uint8).tobytes())
            n += 1
    return n
