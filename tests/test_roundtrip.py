"""Round trips: ndjson -> binary -> ndjson, and ndjson -> sketch-rnn npz -> strokes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from doodle import simplify
from doodle.formats import read_binary, read_ndjson, read_stroke3, write_binary, write_ndjson, write_stroke3


def _same_strokes(a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_ndjson_binary_ndjson(sample: Path, tmp_path: Path) -> None:
    src = sample / "simplified" / "monkey.ndjson"
    original = list(read_ndjson(src))
    assert len(original) == 1000
    binfile = tmp_path / "monkey.bin"
    assert write_binary(binfile, original) == 1000
    back = list(read_binary(binfile))
    assert len(back) == len(original)
    for o, b in zip(original, back, strict=True):
        assert b.word == "monkey"
        assert (b.key_id, b.countrycode, b.recognized) == (o.key_id, o.countrycode, o.recognized)
        # The binary format keeps whole seconds only.
        assert b.timestamp == o.timestamp.replace(microsecond=0)
        assert _same_strokes(o.strokes, b.strokes)
    out = tmp_path / "monkey.ndjson"
    write_ndjson(out, back)
    src_lines = [json.loads(line) for line in src.read_text().splitlines()]
    out_lines = [json.loads(line) for line in out.read_text().splitlines()]
    for s, o in zip(src_lines, out_lines, strict=True):
        assert o["drawing"] == s["drawing"]
        assert {k: o[k] for k in ("word", "countrycode", "recognized", "key_id")} == {
            k: s[k] for k in ("word", "countrycode", "recognized", "key_id")
        }
        assert o["timestamp"] == s["timestamp"].split(".")[0] + " UTC"


def test_ndjson_ndjson_is_lossless(sample: Path, tmp_path: Path) -> None:
    src = sample / "raw" / "key.ndjson"
    out = tmp_path / "key.ndjson"
    write_ndjson(out, read_ndjson(src))
    assert [json.loads(x) for x in out.read_text().splitlines()] == [
        json.loads(x) for x in src.read_text().splitlines()
    ]


def test_ndjson_npz_strokes(sample: Path, tmp_path: Path) -> None:
    drawings = list(read_ndjson(sample / "simplified" / "monkey.ndjson"))
    npz = tmp_path / "monkey.npz"
    counts = write_stroke3(npz, {"train": drawings[:800], "valid": drawings[800:900], "test": drawings[900:]})
    assert counts == {"train": 800, "valid": 100, "test": 100}
    back = list(read_stroke3(npz))
    assert [d.extra["split"] for d in back] == ["train"] * 800 + ["valid"] * 100 + ["test"] * 100
    for o, b in zip(drawings, back, strict=True):
        assert b.word == "monkey"
        assert _same_strokes(o.strokes, b.strokes)
    raw = np.load(npz, allow_pickle=True, encoding="latin1")["train"][0]
    assert raw.dtype == np.int16 and raw.shape[1] == 3 and raw[:, 2].sum() == len(drawings[0].strokes)


def test_raw_drawings_simplify_before_binary(sample: Path, tmp_path: Path) -> None:
    raw = list(read_ndjson(sample / "raw" / "moon.ndjson"))
    write_binary(tmp_path / "moon.bin", (simplify(d) for d in raw))
    back = list(read_binary(tmp_path / "moon.bin"))
    assert len(back) == len(raw)
    assert all(s.min() >= 0 and s.max() <= 255 for d in back for s in d.strokes)
