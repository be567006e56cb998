"""Request payloads from real Quick, Draw! files: 28x28 bitmaps, PNGs of them, and stroke drawings.

Files come from a sample or downloaded directory (``numpy_bitmap/*.npy`` and ``simplified/*.ndjson``), or from
explicit ``.npy`` / ``.ndjson`` paths. Payloads are built once, before the load starts, and cycled.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from doodle import Drawing
from doodle.formats import open_bitmaps, read_ndjson
from quickdraw_client.v1 import classifier_pb2 as pb

KINDS = ("bitmap", "png", "strokes")


@dataclass(frozen=True)
class Pool:
    """Drawings ready to send: bitmaps (for TF Serving's API too) and proto drawings of the chosen kinds."""

    bitmaps: np.ndarray  # uint8 [n, 28, 28]
    drawings: tuple[pb.Drawing, ...]

    def cycle(self) -> Iterator[pb.Drawing]:
        """Drawings forever, in a fixed order."""
        return itertools.cycle(self.drawings)


def _png(bitmap: np.ndarray) -> bytes:
    """A bitmap as a user's PNG would look: 4x larger, dark strokes on white."""
    img = Image.fromarray(255 - bitmap.astype(np.uint8)).resize((112, 112), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _files(paths: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    npy: list[Path] = []
    ndjson: list[Path] = []
    for p in paths:
        if p.is_dir():
            npy += sorted((p / "numpy_bitmap").glob("*.npy")) + sorted(p.glob("*.npy"))
            ndjson += sorted((p / "simplified").glob("*.ndjson")) + sorted(p.glob("*.ndjson"))
        elif p.suffix == ".npy":
            npy.append(p)
        elif p.suffix == ".ndjson":
            ndjson.append(p)
        else:
            raise ValueError(f"{p}: expected a data directory, a .npy or a .ndjson file")
    return npy, ndjson


def load_pool(paths: Sequence[Path], kinds: Sequence[str] = ("bitmap",), size: int = 512) -> Pool:
    """``size`` drawings spread over the files and over ``kinds`` (bitmap, png, strokes)."""
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"unknown input kinds {bad}; choose from {KINDS}")
    npy, ndjson = _files(paths)
    if not npy and not ndjson:
        raise ValueError(f"no .npy or .ndjson files in {[str(p) for p in paths]}")
    bitmaps: list[np.ndarray] = []
    per = max(1, size // max(1, len(npy)))
    for f in npy:
        rows = open_bitmaps(f)
        bitmaps += [np.asarray(rows[i]).reshape(28, 28) for i in range(min(per, len(rows)))]
    strokes: list[Drawing] = []
    if "strokes" in kinds:
        per_s = max(1, size // max(1, len(ndjson)))
        for f in ndjson:
            strokes += list(read_ndjson(f, limit=per_s))
        if not strokes:
            raise ValueError("input kind 'strokes' needs .ndjson files")
    if not bitmaps and ("bitmap" in kinds or "png" in kinds):
        raise ValueError("input kinds 'bitmap' and 'png' need .npy files")
    drawings: list[pb.Drawing] = []
    for i in range(size):
        kind = kinds[i % len(kinds)]
        if kind == "bitmap":
            drawings.append(pb.Drawing(bitmap=pb.Bitmap(pixels=bitmaps[i % len(bitmaps)].tobytes())))
        elif kind == "png":
            drawings.append(pb.Drawing(image=pb.EncodedImage(data=_png(bitmaps[i % len(bitmaps)]))))
        else:
            d = strokes[i % len(strokes)]
            drawings.append(pb.Drawing(strokes=pb.Strokes(strokes=[
                pb.Stroke(x=s[:, 0].tolist(), y=s[:, 1].tolist()) for s in d.strokes
            ], coordinates=pb.Strokes.RAW if d.raw else pb.Strokes.SIMPLIFIED)))  # fmt: skip
    arr = np.stack(bitmaps) if bitmaps else np.zeros((0, 28, 28), np.uint8)
    return Pool(arr.astype(np.uint8), tuple(drawings))
