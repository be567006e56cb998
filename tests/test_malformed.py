"""Malformed input of every format raises DrawingFormatError naming the file and the line or offset."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from doodle.errors import DrawingFormatError
from doodle.formats import open_bitmaps, read_binary, read_ndjson, read_stroke3


def _good_line() -> str:
    return json.dumps({"word": "cat", "key_id": "1", "drawing": [[[0, 10], [0, 10]]]})


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ("{not json", "line 3"),
        ('{"word": "cat"}', "missing field 'drawing'"),
        ('{"drawing": [[[1, 2], [3]]]}', "equal length"),
        ('{"drawing": [[["a"], ["b"]]]}', "numbers"),
        ('{"drawing": [[[1]]]}', "stroke 0"),
        ('{"drawing": "cat"}', "list of strokes"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_ndjson(tmp_path: Path, bad: str, needle: str) -> None:
    path = tmp_path / "cat.ndjson"
    path.write_text(f"{_good_line()}\n{_good_line()}\n{bad}\n{_good_line()}\n")
    it = read_ndjson(path)
    assert next(it).word == "cat" and next(it).word == "cat"
    with pytest.raises(DrawingFormatError) as err:
        next(it)
    assert err.value.path == str(path) and err.value.location == "line 3"
    assert needle in str(err.value) and "cat.ndjson" in str(err.value)


def test_binary_truncated(tmp_path: Path) -> None:
    rec = struct.pack("<Q2sBIH", 7, b"US", 1, 1490000000, 1) + struct.pack("<H", 3) + bytes([1, 2, 3, 4, 5, 6])
    path = tmp_path / "cat.bin"
    path.write_bytes(rec + rec[:-2])
    it = read_binary(path)
    first = next(it)
    assert first.key_id == 7 and first.strokes[0].tolist() == [[1, 4], [2, 5], [3, 6]]
    with pytest.raises(DrawingFormatError) as err:
        next(it)
    assert err.value.location.startswith(f"byte offset {len(rec)}")
    assert "truncated points of stroke 0" in str(err.value)


def test_binary_bad_flag(tmp_path: Path) -> None:
    path = tmp_path / "cat.bin"
    path.write_bytes(struct.pack("<Q2sBIH", 7, b"US", 9, 0, 0))
    with pytest.raises(DrawingFormatError, match=r"byte offset 0.*recognized must be 0 or 1"):
        list(read_binary(path))


def test_npy_truncated(sample: Path, tmp_path: Path) -> None:
    data = (sample / "numpy_bitmap" / "cat.npy").read_bytes()
    path = tmp_path / "cat.npy"
    path.write_bytes(data[:-100])
    with pytest.raises(DrawingFormatError, match="header promises") as err:
        open_bitmaps(path)
    assert err.value.location.startswith("byte offset")


@pytest.mark.parametrize(
    ("content", "needle"),
    [(b"garbage", "not a .npy file"), (None, "uint8 array of shape")],
)
def test_npy_bad_header_or_dtype(tmp_path: Path, content: bytes | None, needle: str) -> None:
    path = tmp_path / "cat.npy"
    if content is None:
        np.save(path, np.zeros((2, 784), dtype=np.float32))
    else:
        path.write_bytes(content)
    with pytest.raises(DrawingFormatError, match=needle):
        open_bitmaps(path)


def test_npz_not_an_archive(tmp_path: Path) -> None:
    path = tmp_path / "cat.npz"
    path.write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(DrawingFormatError, match=r"cat\.npz"):
        list(read_stroke3(path))


def test_npz_bad_sequence(tmp_path: Path) -> None:
    path = tmp_path / "cat.npz"
    arr = np.empty(2, dtype=object)
    arr[:] = [np.zeros((3, 3), dtype=np.int16), np.zeros((3, 2), dtype=np.int16)]
    np.savez(path, train=arr)
    with pytest.raises(DrawingFormatError) as err:
        list(read_stroke3(path))
    assert err.value.location == "'train'[1]"
