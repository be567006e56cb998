"""The validation distribution of what a model answers, written into its model card (issue 26: model health).

What the gateway counts per served version (``service.core.modelhealth``), measured here on the validation split
with the exported signature itself, so that production traffic can be compared with it (Prometheus's recording
rules ``quickdraw:prediction_drift_js:1h`` and the rest; docs/monitoring.md):

- ``top1_class``: how many drawings each class was the top-1 prediction of (every class named, 0 included);
- ``top1_probability``, ``known_score`` (``doodle.contract.KNOWN_SCORE``, for a model that gives it) and
  ``ink_fraction`` (the share of the 784 pixels that are not 0): histograms, each ``{"bounds", "counts", "mean"}``
  with ``counts`` per bucket, not cumulative: ``counts[i]`` drawings had ``bounds[i-1] < x <= bounds[i]``, the
  last one ``x > bounds[-1]`` (Prometheus's ``le`` buckets, differenced);
- ``out_of_class_rate``: the share of drawings scored below the card's threshold (a model that makes the
  decision); 1 - the operating point's ``known_kept``, by construction, when measured on the same split.

The ``KNOWN_SCORE`` bounds are fitted to the model (its scale depends on the score: a probability, or an energy):
the threshold and quantiles of the validation scores. The other bounds are ``doodle.contract``'s defaults. The
gateway uses the card's bounds for its own histograms of that version, so the two compare bucket by bucket.

numpy only: the export runs it on the signature's outputs, ``python -m trainer.card`` on a shipped model's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from doodle import BITMAP_PIXELS
from doodle.contract import INK_FRACTION_BOUNDS, KNOWN_SCORE, TOP1_PROBABILITY_BOUNDS

#: Quantiles of the validation ``KNOWN_SCORE`` that bound its histogram's buckets (with the threshold).
KNOWN_SCORE_QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)


def ink_pixels(images: NDArray[np.uint8]) -> NDArray[np.int64]:
    """How many of each drawing's pixels are not 0 (images [n, 28, 28, 1] or [n, 784])."""
    return np.count_nonzero(np.asarray(images).reshape(len(images), -1), axis=1)


def histogram(values: NDArray[np.floating], bounds: Sequence[float]) -> dict[str, Any]:
    """``{"bounds", "counts", "mean"}``: ``counts`` per ``le`` bucket (not cumulative), the last one above
    ``bounds[-1]``."""
    idx = np.searchsorted(np.asarray(bounds, np.float64), np.asarray(values, np.float64), side="left")
    counts = np.bincount(idx, minlength=len(bounds) + 1)
    return {
        "bounds": [float(b) for b in bounds],
        "counts": [int(c) for c in counts],
        "mean": float(np.mean(values, dtype=np.float64)) if len(values) else 0.0,
    }


def known_score_bounds(scores: NDArray[np.floating], threshold: float | None) -> list[float]:
    """The ``KNOWN_SCORE`` histogram's bounds: quantiles of ``scores`` and the threshold, rounded to 3 digits."""
    qs = np.quantile(np.asarray(scores, np.float64), KNOWN_SCORE_QUANTILES) if len(scores) else np.zeros(0)
    points = {round(float(q), 3) for q in qs}
    if threshold is not None:
        points.add(round(float(threshold), 3))
    return sorted(points)


class DistributionCounter:
    """Collects a model's answers batch by batch, then gives the card's entry (``entry``)."""

    def __init__(self, labels: Sequence[str], threshold: float | None = None) -> None:
        self.labels = list(labels)
        self.threshold = threshold
        self._classes = np.zeros(len(self.labels), np.int64)
        self._top1: list[NDArray[np.float32]] = []
        self._known: list[NDArray[np.float32]] = []
        self._ink: list[NDArray[np.int64]] = []

    def add(
        self, probabilities: NDArray[np.floating], known: NDArray[np.floating] | None, images: NDArray[np.uint8]
    ) -> None:
        """One batch: the signature's probabilities [n, classes] and ``KNOWN_SCORE`` [n] (None: not given) for
        ``images`` [n, 28, 28, 1]."""
        probs = np.asarray(probabilities)
        top = probs.argmax(axis=1)
        self._classes += np.bincount(top, minlength=len(self.labels))[: len(self.labels)]
        self._top1.append(np.take_along_axis(probs, top[:, None], axis=1)[:, 0].astype(np.float32))
        if known is not None:
            self._known.append(np.asarray(known, np.float32))
        self._ink.append(ink_pixels(images))

    @property
    def drawings(self) -> int:
        """Drawings added so far."""
        return int(self._classes.sum())

    def entry(self, measured_on: str) -> dict[str, Any]:
        """The card's ``MODEL_CARD_DISTRIBUTION`` entry (see the module)."""
        top1 = np.concatenate(self._top1) if self._top1 else np.zeros(0, np.float32)
        ink = np.concatenate(self._ink) if self._ink else np.zeros(0, np.int64)
        out: dict[str, Any] = {
            "measured_on": measured_on,
            "drawings": self.drawings,
            "top1_class": {label: int(c) for label, c in zip(self.labels, self._classes, strict=True)},
            "top1_probability": histogram(top1, TOP1_PROBABILITY_BOUNDS),
        }
        if self._known:
            known = np.concatenate(self._known)
            out[KNOWN_SCORE] = histogram(known, known_score_bounds(known, self.threshold))
            if self.threshold is not None:
                out["out_of_class_rate"] = float(np.mean(known < self.threshold)) if len(known) else 0.0
        # ink as pixel counts against bounds in pixels (what the gateway compares: no division per drawing)
        ink_hist = histogram(ink, [b * BITMAP_PIXELS for b in INK_FRACTION_BOUNDS])
        ink_hist["bounds"] = list(INK_FRACTION_BOUNDS)
        ink_hist["mean"] = ink_hist["mean"] / BITMAP_PIXELS
        out["ink_fraction"] = ink_hist
        return out
