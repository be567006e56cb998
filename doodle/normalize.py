"""Raw strokes to simplified strokes, the way Google describes its ``simplified`` files.

1. align the drawing to the top-left corner (minimum 0);
2. scale it uniformly so that its larger side spans 0..255;
3. resample every stroke at 1-pixel spacing;
4. simplify every stroke with Ramer-Douglas-Peucker, epsilon 2.0;
5. round to integers.

Checked against Google's own pairs in ``shared/quickdraw/raw`` and ``simplified`` (same key_id):
most drawings come out identical point for point, the rest differ by a point here and there.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from doodle.drawing import Drawing, Stroke
from doodle.errors import EmptyDrawingError

SIMPLIFIED_MAX = 255.0
RESAMPLE_SPACING = 1.0
RDP_EPSILON = 2.0
#: The most :func:`rdp_work` a drawing may need to be simplified over every resampled point (about 25 ms
#: here); the largest drawing in the sample needs 2.3 million.
EXACT_RDP_WORK = 4_000_000


def rdp(points: NDArray[np.float64], epsilon: float = RDP_EPSILON) -> NDArray[np.float64]:
    """Ramer-Douglas-Peucker simplification of an (n, 2) polyline, iterative (no recursion limit)."""
    n = len(points)
    if n < 3:
        return points
    keep = np.zeros(n, dtype=bool)
    keep[0] = keep[-1] = True
    stack = [(0, n - 1)]
    while stack:
        a, b = stack.pop()
        if b - a < 2:
            continue
        p, q = points[a], points[b]
        inner = points[a + 1 : b]
        d = q - p
        length = float(np.hypot(d[0], d[1]))
        if length == 0.0:
            dist = np.hypot(inner[:, 0] - p[0], inner[:, 1] - p[1])
        else:
            dist = np.abs(d[0] * (inner[:, 1] - p[1]) - d[1] * (inner[:, 0] - p[0])) / length
        i = int(np.argmax(dist))
        if dist[i] > epsilon:
            m = a + 1 + i
            keep[m] = True
            stack.append((a, m))
            stack.append((m, b))
    return points[keep]


def resample(points: NDArray[np.float64], spacing: float = RESAMPLE_SPACING) -> NDArray[np.float64]:
    """Points every ``spacing`` units of arc length along an (n, 2) polyline, both ends kept."""
    if len(points) < 2:
        return points
    seg = np.hypot(*np.diff(points, axis=0).T)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    total = cum[-1]
    if total == 0.0:
        return points[[0, -1]]
    s = np.arange(0.0, total, spacing)
    if s[-1] < total:
        s = np.append(s, total)
    return np.stack([np.interp(s, cum, points[:, 0]), np.interp(s, cum, points[:, 1])], axis=1)


def resample_vertices(
    points: NDArray[np.float64], spacing: float = RESAMPLE_SPACING
) -> tuple[NDArray[np.float64], NDArray[np.intp]]:
    """The points of :func:`resample` that RDP can keep, and their indices among all the resampled points.

    Resampled points between two input vertices lie on one straight segment, and a point's distance to a
    chord varies linearly along a segment, so the farthest point from any chord is the first or the last
    resampled point on some segment (the first of several equally far ones, as ``np.argmax`` picks, is one
    too). Only those are computed, with the same ``np.interp`` calls on the same arc lengths as
    :func:`resample`, so the values are identical, and ``rdp`` over them keeps the same points as over
    every resampled point (points between two adjacent ones are on their chord), except where points are
    equally far from a chord to within rounding, where the full scan picks one by its rounding error. The
    cost grows with the number of input vertices, not with the arc length: a zigzag of 8,192 raw points
    across the canvas resamples to about 2 million points, over which RDP took most of a minute.
    """
    if len(points) < 2:
        return points, np.arange(len(points))
    seg = np.hypot(*np.diff(points, axis=0).T)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    total = float(cum[-1])
    if total == 0.0:
        return points[[0, -1]], np.arange(2)
    # resample's arc lengths are np.arange(0, total, spacing), i.e. k * spacing for k < count, then total.
    count = int(np.ceil(total / spacing))
    # first[i]: the first k whose arc length is at or past vertex i (np.searchsorted over the virtual arange).
    first = np.clip(np.ceil(cum / spacing), 0, count).astype(np.intp)
    first -= (first > 0) & ((first - 1) * spacing >= cum)
    first += (first < count) & (first * spacing < cum)
    first[-1] = count  # every arange value is short of total; the appended total starts the last run
    # Resampled point k lies on segment i when first[i] <= k < first[i + 1]: keep each run's first and last.
    starts, ends = first[:-1], first[1:] - 1
    nonempty = ends >= starts
    picks = np.unique(np.concatenate([starts[nonempty], ends[nonempty], [count]]))
    s = picks.astype(np.float64) * spacing
    s[-1] = total
    out = np.stack([np.interp(s, cum, points[:, 0]), np.interp(s, cum, points[:, 1])], axis=1)
    return out, picks


def rdp_work(points: NDArray[np.float64], spacing: float = RESAMPLE_SPACING) -> int:
    """A bound on the work of ``rdp(resample(points))``: resampled points times the points RDP may keep.

    Every split scans the points between two kept ones, and the points kept are the polyline's vertices or
    the resampled points next to them (see :func:`resample_vertices`), so at most about three per vertex.
    """
    if len(points) < 2:
        return len(points)
    n = int(np.ceil(float(np.hypot(*np.diff(points, axis=0).T).sum()) / spacing)) + 1
    return n * min(n, 3 * len(points) + 3)


def simplify_strokes(strokes: Sequence[Stroke]) -> tuple[Stroke, ...]:
    """Align, scale, resample and simplify raw strokes; time, if any, is dropped.

    A drawing whose :func:`rdp_work` is at most ``EXACT_RDP_WORK`` is simplified over every resampled point
    (every drawing in the sample is, with room to spare). Beyond that, RDP looks only at the points it can
    keep (:func:`resample_vertices`): the same result but where several points are equally far from a chord
    to within rounding, so that a hostile drawing costs time in proportion to its points, not to how far
    they travel.
    """
    pts = [np.asarray(s, dtype=np.float64)[:, :2] for s in strokes if len(s)]
    if not pts:
        raise EmptyDrawingError("drawing has no points")
    every = np.concatenate(pts)
    low = every.min(axis=0)
    extent = float((every.max(axis=0) - low).max())
    scale = SIMPLIFIED_MAX / extent if extent > 0 else 1.0
    if np.isfinite(scale):
        aligned = [(p - low) * scale for p in pts]
    else:  # a subnormal extent: 255 / extent overflows, the ratio does not
        aligned = [(p - low) / extent * SIMPLIFIED_MAX for p in pts]
    exact = sum(rdp_work(p) for p in aligned) <= EXACT_RDP_WORK
    lines = [rdp(resample(p)) if exact else rdp(resample_vertices(p)[0]) for p in aligned]
    return tuple(np.clip(np.rint(line), 0.0, SIMPLIFIED_MAX) for line in lines)


def simplify(drawing: Drawing) -> Drawing:
    """A raw drawing as a simplified one; a drawing that is already simplified is returned as is."""
    if not drawing.raw:
        return drawing
    from dataclasses import replace

    return replace(drawing, strokes=simplify_strokes(drawing.strokes), raw=False)
