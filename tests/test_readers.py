"""Every reader on the real sample files: counts, classes, metadata and shapes."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np

from doodle.formats import Format, detect_format, open_bitmaps, read_bitmaps, read_ndjson


def test_numpy_bitmap_is_memory_mapped_and_yields_rows(sample: Path) -> None:
    path = sample / "numpy_bitmap" / "cat.npy"
    rows = open_bitmaps(path)
    assert isinstance(rows, np.memmap)
    assert rows.dtype == np.uint8 and rows.shape[1] == 784
    assert rows.shape[0] == np.load(path, mmap_mode="r").shape[0]
    first = list(read_bitmaps(path, stop=3))
    assert [b.index for b in first] == [0, 1, 2]
    assert first[0].word == "cat" and first[0].pixels.shape == (28, 28)
    np.testing.assert_array_equal(first[2].pixels.ravel(), np.load(path)[2])


def test_class_names_with_spaces(sample: Path) -> None:
    bitmaps = list(read_bitmaps(sample / "numpy_bitmap" / "alarm clock.npy", stop=1))
    assert bitmaps[0].word == "alarm clock"
    drawings = list(read_ndjson(sample / "simplified" / "alarm clock.ndjson", limit=2))
    assert drawings[0].word == "alarm clock"


def test_simplified_ndjson_fields(sample: Path) -> None:
    drawings = list(read_ndjson(sample / "simplified" / "cat.ndjson"))
    assert len(drawings) == 25
    d = drawings[0]
    assert d.word == "cat" and d.countrycode == "VE" and d.recognized is True
    assert d.key_id == 5201136883597312
    assert d.timestamp == dt.datetime(2017, 3, 2, 23, 25, 10, 74530, tzinfo=dt.UTC)
    assert not d.raw
    assert d.strokes[0].shape == (25, 2)
    assert d.strokes[0][0].tolist() == [130.0, 72.0]
    every = np.concatenate([s for dd in drawings for s in dd.strokes])
    assert every.min() >= 0 and every.max() <= 255


def test_raw_ndjson_has_time(sample: Path) -> None:
    path = sample / "raw" / "ant.ndjson"
    assert detect_format(path) is Format.RAW
    drawings = list(read_ndjson(path))
    assert len(drawings) == 38
    assert all(d.raw for d in drawings)
    assert all(s.shape[1] == 3 for s in drawings[0].strokes)
    t = drawings[0].strokes[0][:, 2]
    assert t[0] == 0 and np.all(np.diff(t) >= 0)


def test_every_sample_file_reads(sample: Path) -> None:
    simplified = sorted((sample / "simplified").glob("*.ndjson"))
    assert len(simplified) == 344
    total = sum(1 for f in simplified for _ in read_ndjson(f))
    assert total == 343 * 25 + 1000  # monkey.ndjson has the first 1,000
    assert sum(1 for f in (sample / "raw").glob("*.ndjson") for _ in read_ndjson(f)) > 20 * 10
    counts = [open_bitmaps(f).shape[0] for f in (sample / "numpy_bitmap").glob("*.npy")]
    assert len(counts) == 29 and min(counts) >= 800
    assert sum(counts) == 56_000  # as the sample's README says


def test_detect_format(sample: Path) -> None:
    assert detect_format(sample / "numpy_bitmap" / "cat.npy") is Format.NUMPY_BITMAP
    assert detect_format(sample / "simplified" / "cat.ndjson") is Format.SIMPLIFIED
    assert detect_format(Path("x.bin")) is Format.BINARY
    assert detect_format(Path("x.npz")) is Format.SKETCHRNN
