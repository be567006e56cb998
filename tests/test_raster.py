"""The rasterizer against Google's own bitmaps, and raw-stroke normalisation against Google's simplified."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from doodle import EmptyDrawingError, drawing_to_bitmap, rasterize, simplify_strokes
from doodle.formats import open_bitmaps, read_ndjson
from doodle.normalize import EXACT_RDP_WORK, rdp, rdp_work, resample, resample_vertices

PAIRS_PER_CLASS = 25


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


def test_rasterizer_matches_google_bitmaps(sample: Path, paired_classes: list[str]) -> None:
    assert len(paired_classes) == 29
    per_class = {}
    for name in paired_classes:
        rows = open_bitmaps(sample / "numpy_bitmap" / f"{name}.npy")
        drawings = list(read_ndjson(sample / "simplified" / f"{name}.ndjson", limit=PAIRS_PER_CLASS))
        per_class[name] = [_corr(drawing_to_bitmap(d), rows[i]) for i, d in enumerate(drawings)]
    every = [c for cs in per_class.values() for c in cs]
    mean = float(np.mean(every))
    worst = min(per_class, key=lambda k: np.mean(per_class[k]))
    print(
        f"\nrasterizer vs numpy_bitmap: {len(every)} pairs over {len(per_class)} classes, "
        f"mean Pearson r = {mean:.4f}, min = {min(every):.4f}, "
        f"worst class {worst!r} {np.mean(per_class[worst]):.4f}"
    )
    assert len(every) == 725
    assert mean >= 0.98


def test_raster_output_convention(sample: Path) -> None:
    d = next(read_ndjson(sample / "simplified" / "cat.ndjson"))
    img = rasterize(d.strokes)
    assert img.dtype == np.uint8 and img.shape == (28, 28)
    assert img.max() == 255 and img[0].max() == 0 and img[:, 0].max() == 0  # bright on dark, margin
    big = rasterize(d.strokes, side=256)
    assert big.shape == (256, 256)


def test_empty_and_single_point() -> None:
    with pytest.raises(EmptyDrawingError):
        rasterize([])
    dot = rasterize([np.array([[100.0, 100.0]])])
    assert dot.max() > 0 and dot.sum() < 255 * 9


def test_raw_strokes_become_googles_simplified(sample: Path) -> None:
    """normalise(raw) reproduces Google's simplified drawing of the same key_id."""
    exact = total = 0
    correlations = []
    for raw_file in sorted((sample / "raw").glob("*.ndjson")):
        simp_file = sample / "simplified" / raw_file.name
        if not simp_file.exists():
            continue
        raws = {d.key_id: d for d in read_ndjson(raw_file)}
        for ref in read_ndjson(simp_file):
            raw = raws.get(ref.key_id)
            if raw is None:
                continue
            ours = simplify_strokes(raw.strokes)
            total += 1
            exact += len(ours) == len(ref.strokes) and all(
                a.shape == b.shape and np.array_equal(a, b) for a, b in zip(ours, ref.strokes, strict=True)
            )
            correlations.append(_corr(drawing_to_bitmap(raw), rasterize(ref.strokes)))
    print(f"\nraw -> simplified: {exact}/{total} identical point for point; "
          f"bitmap correlation mean {np.mean(correlations):.4f}, min {np.min(correlations):.4f}")
    assert total > 400
    assert exact / total > 0.8
    assert np.mean(correlations) > 0.99


def test_resample_and_rdp() -> None:
    line = np.array([[0.0, 0.0], [10.0, 0.0]])
    r = resample(line)
    assert len(r) == 11 and np.allclose(np.diff(r[:, 0]), 1.0)
    assert rdp(r).tolist() == [[0.0, 0.0], [10.0, 0.0]]
    bent = np.array([[0.0, 0.0], [5.0, 3.0], [10.0, 0.0]])
    assert len(rdp(bent, 2.0)) == 3 and len(rdp(bent, 3.5)) == 2
    still = np.array([[4.0, 4.0], [4.0, 4.0], [4.0, 4.0]])
    assert len(resample(still)) == 2


def test_resample_vertices_are_the_resampled_points_rdp_can_keep(sample: Path) -> None:
    """resample_vertices gives exactly resample's values at its picks, and RDP over them keeps the same points
    but where points tie to within rounding (a segment parallel to a chord), where the full scan picks by noise."""
    same = total = 0
    for path in sorted((sample / "raw").glob("*.ndjson")):
        for d in read_ndjson(path, limit=40):
            for stroke in d.strokes:
                pts = np.asarray(stroke, dtype=np.float64)[:, :2] * 0.37
                full = resample(pts)
                some, picks = resample_vertices(pts)
                assert np.array_equal(full[picks], some)
                total += 1
                same += np.array_equal(rdp(full), rdp(some))
    print(f"\nRDP over resample_vertices: {same}/{total} strokes keep the same points as over every resampled point")
    assert total > 1000 and same / total > 0.97


@pytest.mark.parametrize("shape", ["zigzag", "retrace", "spiral"])
def test_hostile_raw_strokes_simplify_in_time_bounded_by_their_points(shape: str) -> None:
    """8,192 raw points that travel millions of pixels once scaled: RDP over every resampled point took ~47 s."""
    n = 8192
    i = np.arange(n)
    if shape == "zigzag":  # every other point on the far edge: each RDP split peeled one point off 2M
        pts = np.stack([np.where(i % 2 == 0, 0.0, 1e6), np.linspace(0.0, 1e6, n)], axis=1)
    elif shape == "retrace":  # back and forth along one line, then away from it: every point ties
        pts = np.stack([np.where(i % 2 == 0, 0.0, 1e6), np.full(n, 1e6)], axis=1)
        pts[-1] = (0.0, 0.0)
    else:
        t = np.linspace(0.0, 400 * np.pi, n)
        pts = np.stack([np.cos(t) * t, np.sin(t) * t], axis=1)
    assert rdp_work(pts * 255 / np.ptp(pts, axis=0).max()) > 100 * EXACT_RDP_WORK
    t0 = time.perf_counter()
    out = simplify_strokes([pts])
    assert time.perf_counter() - t0 < 3.0  # ~0.3 s here; the bound is for a busy 2-core machine
    assert out[0].min() >= 0.0 and out[0].max() <= 255.0


def test_subnormal_extent_scales_like_any_other() -> None:
    """A drawing whose extent is a subnormal float: 255 / extent overflowed to inf and 0 * inf made NaN."""
    [out] = simplify_strokes([np.array([[0.0, 0.0], [5e-324, 0.0]])])
    assert out.tolist() == [[0.0, 0.0], [255.0, 0.0]]
