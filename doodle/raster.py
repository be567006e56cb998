"""Simplified strokes to the 28x28 uint8 bitmaps of Google's numpy_bitmap files.

Google rendered its bitmaps with cairo: a 256-unit drawing centred by its bounding box, round caps
and joins, a 16-unit line, 16 units of padding on each side plus half a line, antialiased, scaled
down to 28x28. We reproduce that with Pillow: the strokes are drawn ``supersample`` times larger
with round joins and a disc on every vertex, then box-averaged down, which is the coverage
antialiasing cairo computes. Against Google's own bitmaps in ``shared/quickdraw`` (725 pairs, 29
classes) the mean Pearson correlation is about 0.998 at the default supersampling.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw

from doodle.drawing import BITMAP_SIDE, Drawing, Stroke
from doodle.errors import EmptyDrawingError
from doodle.normalize import simplify_strokes

ORIGINAL_SIDE = 256.0
LINE_WIDTH = 16.0
PADDING = 16.0
SUPERSAMPLE = 16


def rasterize(
    strokes: Sequence[Stroke],
    side: int = BITMAP_SIDE,
    line_width: float = LINE_WIDTH,
    padding: float = PADDING,
    supersample: int | None = None,
) -> NDArray[np.uint8]:
    """Render simplified strokes (0..255 coordinates) to a ``side`` x ``side`` uint8 image.

    Strokes are 255 on a 0 background and the drawing is centred, as in numpy_bitmap. The strokes
    must be in the simplified frame (aligned to 0, larger side 255): simplify raw strokes first.
    """
    pts = [np.asarray(s, dtype=np.float64)[:, :2] for s in strokes if len(s)]
    if not pts:
        raise EmptyDrawingError("drawing has no points")
    ss = supersample or max(1, int(np.ceil(SUPERSAMPLE * BITMAP_SIDE / side)))
    total_padding = 2.0 * padding + line_width
    scale = side / (ORIGINAL_SIDE + total_padding) * ss
    big = side * ss
    # Google centres by the maximum alone, taking the minimum to be 0 as simplification makes it;
    # after rounding it is 1 in about a tenth of drawings, and using the true bounding box there
    # lowers the agreement with Google's bitmaps (0.9973 against 0.9984 mean correlation).
    high = np.concatenate(pts).max(axis=0)
    offset = (ORIGINAL_SIDE - high) / 2.0 + total_padding / 2.0
    radius = line_width * scale / 2.0
    width = max(1, round(2.0 * radius))
    img = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(img)
    for p in pts:
        xy = (p + offset) * scale
        coords = [(float(x), float(y)) for x, y in xy]
        if len(coords) > 1:
            draw.line(coords, fill=255, width=width, joint="curve")
        for x, y in coords:
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=255)
    if ss > 1:
        img = img.reduce(ss)
    return np.asarray(img, dtype=np.uint8)


def drawing_to_bitmap(drawing: Drawing) -> NDArray[np.uint8]:
    """The model's 28x28 input for any vector drawing: raw ones are simplified first."""
    strokes = simplify_strokes(drawing.strokes) if drawing.raw else drawing.strokes
    return rasterize(strokes)


def flat_strokes_to_bitmap(
    x: NDArray[np.float64], y: NDArray[np.float64], counts: NDArray[np.int64], raw: bool
) -> NDArray[np.uint8]:
    """:func:`drawing_to_bitmap` of one drawing given as flat coordinates and per-stroke point counts (as the
    gateway holds a request's strokes, and sends them to its render workers); empty strokes are skipped. Raises
    ``EmptyDrawingError`` when no stroke has a point."""
    cuts = np.cumsum(counts)[:-1]
    strokes = tuple(np.stack((sx, sy), axis=1) for sx, sy in zip(np.split(x, cuts), np.split(y, cuts), strict=True)
                    if len(sx))  # fmt: skip
    return drawing_to_bitmap(Drawing(word="", strokes=strokes, raw=raw))
