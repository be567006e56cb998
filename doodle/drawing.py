"""The in-memory shapes of a Quick, Draw! drawing, shared by every reader, writer and renderer.

A stroke is a float64 array of shape (n, 2) holding x, y, or (n, 3) holding x, y and t (milliseconds
since the first point), which is the transpose of Google's ``[[x...], [y...], [t...]]`` lists: rows of
points are what resampling and simplification work on.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

Stroke = NDArray[np.float64]
BITMAP_SIDE = 28
BITMAP_PIXELS = BITMAP_SIDE * BITMAP_SIDE


@dataclass(frozen=True, slots=True)
class Drawing:
    """One vector drawing: its class, its strokes and whatever metadata its file carried."""

    word: str
    strokes: tuple[Stroke, ...]
    key_id: int | None = None
    countrycode: str | None = None
    recognized: bool | None = None
    timestamp: dt.datetime | None = None
    #: True when the strokes are raw screen coordinates (not yet aligned, scaled and simplified).
    raw: bool = False
    #: Where the drawing came from, e.g. ``cat.ndjson:17``; for error messages and debugging.
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_points(self) -> int:
        """Total number of points over all strokes."""
        return sum(len(s) for s in self.strokes)

    def google_strokes(self) -> list[list[list[float | int]]]:
        """Strokes in Google's ndjson layout, ``[[x...], [y...]]`` (plus ``[t...]`` when timed)."""
        return [[_plain(col) for col in s.T] for s in self.strokes]


@dataclass(frozen=True, slots=True)
class Bitmap:
    """One 28x28 uint8 drawing as stored in Google's numpy_bitmap files (strokes 255 on 0)."""

    word: str
    index: int
    pixels: NDArray[np.uint8]
    source: str = ""


def strokes_from_google(drawing: Sequence[Sequence[Sequence[float]]]) -> tuple[Stroke, ...]:
    """Convert Google's ``[[x...], [y...](, [t...])]`` strokes to (n, 2|3) float arrays.

    Raises ValueError with a short reason when the nesting or lengths are wrong.
    """
    if not isinstance(drawing, list | tuple):
        raise ValueError("'drawing' must be a list of strokes")
    out: list[Stroke] = []
    for i, stroke in enumerate(drawing):
        if not isinstance(stroke, list | tuple) or len(stroke) not in (2, 3):
            raise ValueError(f"stroke {i} must be [[x...], [y...]] or [[x...], [y...], [t...]]")
        lengths = {len(c) if isinstance(c, list | tuple) else -1 for c in stroke}
        if len(lengths) != 1 or -1 in lengths:
            raise ValueError(f"stroke {i}: x, y (and t) must be lists of equal length")
        try:
            arr = np.asarray(stroke, dtype=np.float64).T
        except (TypeError, ValueError) as exc:
            raise ValueError(f"stroke {i}: coordinates must be numbers") from exc
        if arr.shape[0] == 0:
            raise ValueError(f"stroke {i} has no points")
        if not np.isfinite(arr).all():
            raise ValueError(f"stroke {i}: coordinates must be finite")
        out.append(np.ascontiguousarray(arr))
    return tuple(out)


def _plain(col: NDArray[np.float64]) -> list[float | int]:
    """A column as JSON-friendly numbers: ints when every value is integral."""
    if np.all(np.mod(col, 1) == 0):
        return [int(v) for v in col]
    return [float(v) for v in col]
