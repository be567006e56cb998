"""sketch-rnn ``.npz`` files: stroke-3 sequences split into ``train``, ``valid`` and ``test``.

Each drawing is an int16 array of shape (n, 3): ``dx, dy, pen_lifted``, where the offsets are from
the previous point (the first from the origin) and ``pen_lifted`` is 1 on the last point of a stroke.
The arrays are stored as object arrays, so reading needs ``allow_pickle``: open only files you trust,
such as Google's own.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from doodle.drawing import Drawing, Stroke
from doodle.errors import DrawingFormatError
from doodle.formats.bitmap import class_from_path

SPLITS = ("train", "valid", "test")


def strokes_to_stroke3(strokes: Iterable[Stroke]) -> NDArray[np.int16]:
    """Absolute strokes to a stroke-3 array (offsets from the previous point, pen lifted at ends)."""
    rows = []
    for s in strokes:
        pts = np.rint(s[:, :2]).astype(np.int64)
        pen = np.zeros((len(pts), 1), dtype=np.int64)
        pen[-1] = 1
        rows.append(np.hstack([pts, pen]))
    if not rows:
        return np.zeros((0, 3), dtype=np.int16)
    seq = np.vstack(rows)
    seq[1:, :2] = seq[1:, :2] - seq[:-1, :2]
    return seq.astype(np.int16)


def stroke3_to_strokes(seq: NDArray[np.integer]) -> tuple[Stroke, ...]:
    """A stroke-3 array back to absolute (n, 2) strokes."""
    seq = np.asarray(seq)
    if seq.ndim != 2 or seq.shape[1] != 3:
        raise ValueError(f"expected shape (n, 3), got {seq.shape}")
    absolute = np.cumsum(seq[:, :2].astype(np.float64), axis=0)
    ends = np.flatnonzero(seq[:, 2] != 0)
    strokes = []
    start = 0
    for end in ends:
        strokes.append(absolute[start : end + 1])
        start = end + 1
    if start < len(seq):
        strokes.append(absolute[start:])
    return tuple(strokes)


def read_stroke3(
    path: str | os.PathLike[str], splits: Iterable[str] = SPLITS
) -> Iterator[Drawing]:
    """Yield the drawings of a sketch-rnn file, split by split; ``extra`` holds split and index."""
    path = Path(path)
    word = class_from_path(path)
    try:
        archive = np.load(path, allow_pickle=True, encoding="latin1")
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DrawingFormatError(path, "byte offset 0", f"not a sketch-rnn .npz file: {exc}") from exc
    with archive:
        for split in splits:
            if split not in archive.files:
                continue
            try:
                items = archive[split]
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
                raise DrawingFormatError(path, f"{split!r}", f"unreadable array: {exc}") from exc
            for i, seq in enumerate(items):
                try:
                    strokes = stroke3_to_strokes(seq)
                except (ValueError, TypeError) as exc:
                    raise DrawingFormatError(path, f"{split!r}[{i}]", str(exc)) from exc
                yield Drawing(
                    word=word, strokes=strokes, source=f"{path.name}:{split}[{i}]",
                    extra={"split": split, "index": i},
                )


def write_stroke3(
    path: str | os.PathLike[str], splits: Mapping[str, Iterable[Drawing]]
) -> dict[str, int]:
    """Write drawings per split as a sketch-rnn ``.npz``; returns the count per split."""
    arrays: dict[str, NDArray[np.object_]] = {}
    for split, drawings in splits.items():
        seqs = [strokes_to_stroke3(d.strokes) for d in drawings]
        arr = np.empty(len(seqs), dtype=object)
        arr[:] = seqs
        arrays[split] = arr
    np.savez_compressed(path, **arrays)  # type: ignore[arg-type]
    return {k: len(v) for k, v in arrays.items()}
