"""Google's ``simplified`` and ``raw`` ``.ndjson`` files, streamed a line at a time.

Each line is one JSON object: ``word``, ``countrycode``, ``timestamp``, ``recognized``, ``key_id`` and
``drawing``. Raw files carry a third list per stroke, the time in milliseconds.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from doodle.drawing import Drawing, strokes_from_google
from doodle.errors import DrawingFormatError
from doodle.formats.bitmap import class_from_path

_TS_FORMATS = ("%Y-%m-%d %H:%M:%S.%f %Z", "%Y-%m-%d %H:%M:%S %Z")


def parse_timestamp(text: str) -> dt.datetime:
    """Parse Google's ``2017-03-02 23:25:10.07453 UTC`` into an aware UTC datetime."""
    for fmt in _TS_FORMATS:
        try:
            return dt.datetime.strptime(text, fmt).replace(tzinfo=dt.UTC)
        except ValueError:
            continue
    raise ValueError(f"timestamp {text!r} is not 'YYYY-MM-DD HH:MM:SS[.ffffff] UTC'")


def format_timestamp(ts: dt.datetime) -> str:
    """Format a datetime as Google does, trimming trailing zeros of the fraction."""
    ts = ts.astimezone(dt.UTC)
    text = ts.strftime("%Y-%m-%d %H:%M:%S")
    if ts.microsecond:
        text += f".{ts.microsecond:06d}".rstrip("0")
    return text + " UTC"


def drawing_from_record(record: Any, default_word: str, source: str = "") -> Drawing:
    """Build a Drawing from one parsed ndjson object; ValueError says what is wrong."""
    if not isinstance(record, dict):
        raise ValueError("each line must be a JSON object")
    if "drawing" not in record:
        raise ValueError("missing field 'drawing'")
    strokes = strokes_from_google(record["drawing"])
    key = record.get("key_id")
    ts = record.get("timestamp")
    recognized = record.get("recognized")
    if recognized is not None and not isinstance(recognized, bool):
        raise ValueError("'recognized' must be true or false")
    return Drawing(
        word=str(record.get("word", default_word)),
        strokes=strokes,
        key_id=int(key) if key is not None else None,
        countrycode=record.get("countrycode"),
        recognized=recognized,
        timestamp=parse_timestamp(ts) if isinstance(ts, str) else None,
        raw=any(s.shape[1] == 3 for s in strokes),
        source=source,
    )


def read_ndjson(path: str | os.PathLike[str], limit: int | None = None) -> Iterator[Drawing]:
    """Yield the drawings of a simplified or raw ndjson file in file order, one line at a time.

    A malformed line raises DrawingFormatError with the file and the 1-based line number.
    """
    path = Path(path)
    default_word = class_from_path(path)
    with path.open("r", encoding="utf-8") as fh:
        yield from _read_lines(fh, path, default_word, limit)


def _read_lines(
    fh: IO[str], path: Path, default_word: str, limit: int | None
) -> Iterator[Drawing]:
    count = 0
    for lineno, line in enumerate(fh, start=1):
        if limit is not None and count >= limit:
            return
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            drawing = drawing_from_record(record, default_word, f"{path.name}:{lineno}")
        except (ValueError, TypeError) as exc:
            raise DrawingFormatError(path, f"line {lineno}", str(exc)) from exc
        count += 1
        yield drawing


def count_lines(path: str | os.PathLike[str]) -> int:
    """Count non-empty lines quickly, reading in binary chunks (for progress bars and sizing)."""
    n = 0
    last = b"\n"
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


def write_ndjson(path: str | os.PathLike[str], drawings: Iterable[Drawing]) -> int:
    """Write drawings as Google-style ndjson; returns the number written."""
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for d in drawings:
            record: dict[str, Any] = {"word": d.word}
            if d.countrycode is not None:
                record["countrycode"] = d.countrycode
            if d.timestamp is not None:
                record["timestamp"] = format_timestamp(d.timestamp)
            if d.recognized is not None:
                record["recognized"] = d.recognized
            if d.key_id is not None:
                record["key_id"] = str(d.key_id)
            record["drawing"] = d.google_strokes()
            fh.write(json.dumps(record, separators=(",", ":")) + "\n")
            n += 1
    return n
