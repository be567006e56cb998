"""Model health in production (issue 26): what each served version answers, counted at almost no cost per call.

Per served version: the top-1 class of every drawing (labels bounded by the model's classes: an index outside
them counts in no class), histograms of the top-1 probability, of ``KNOWN_SCORE`` and of the ink fraction (the
share of the 784 pixels that are not 0), the drawings decided out-of-class (known_score below the version's
threshold) and the input kinds. ``ModelHealth.record`` keeps plain Python ints and floats (``bisect`` on fixed
bucket bounds; numpy's bincount and searchsorted for batches over ``VECTOR_FROM`` drawings): no prometheus_client
call per drawing. ``service.core.metrics.ModelHealthCollector`` turns them into metric families at scrape time.

Each version's validation distribution (its model card's ``MODEL_CARD_DISTRIBUTION`` entry, written at export:
``trainer.distribution``) is its ``Reference``: exported beside the counts, so that Prometheus compares the two
(``deploy/prometheus/rules/quickdraw-recording.yml``), and its bucket bounds are the histograms' for that version.

Everything here runs on the event loop (the data plane records, /metrics collects): no lock.
"""

from __future__ import annotations

import itertools
import math
from bisect import bisect_left
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from doodle import BITMAP_PIXELS
from doodle.contract import INK_FRACTION_BOUNDS, KNOWN_SCORE, KNOWN_SCORE_BOUNDS, TOP1_PROBABILITY_BOUNDS

#: From this many drawings a call is counted with numpy (bincount, searchsorted: ~30 us for 16 drawings, ~66 us for
#: 128); fewer, one by one (~1.3 us each). Measured with numpy 2 on the 2-core dev machine.
VECTOR_FROM = 24


def _bounds(entry: Any, default: Sequence[float]) -> tuple[float, ...]:
    """A histogram entry's ``bounds`` (finite, strictly increasing), or ``default`` when it has none."""
    bounds = entry.get("bounds") if isinstance(entry, dict) else None
    if bounds is None:
        return tuple(float(b) for b in default)
    if not isinstance(bounds, list) or not bounds or not all(
        isinstance(b, int | float) and not isinstance(b, bool) and math.isfinite(b) for b in bounds
    ):
        raise ValueError(f"histogram bounds must be a non-empty list of finite numbers, not {bounds!r}")
    if any(b >= c for b, c in itertools.pairwise(bounds)):
        raise ValueError(f"histogram bounds must increase: {bounds!r}")
    return tuple(float(b) for b in bounds)


def _number(entry: Any, key: str) -> float | None:
    value = entry.get(key) if isinstance(entry, dict) else None
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


@dataclass(frozen=True)
class Reference:
    """A version's validation distribution, from its model card's ``MODEL_CARD_DISTRIBUTION`` entry."""

    #: The share of drawings each class was the top-1 prediction of, in label order.
    class_share: tuple[float, ...]
    top1_bounds: tuple[float, ...]
    top1_mean: float | None
    known_bounds: tuple[float, ...]
    known_mean: float | None
    ink_bounds: tuple[float, ...]
    ink_mean: float | None
    out_of_class_rate: float | None

    @staticmethod
    def from_card(entry: Any, labels: Sequence[str]) -> Reference:
        """The card's entry for a model of ``labels``; ValueError when it is unusable (classes other than the
        labels, no drawings, bad bounds)."""
        if not isinstance(entry, dict):
            raise ValueError(f"the validation distribution must be an object, not {type(entry).__name__}")
        counts = entry.get("top1_class")
        if not isinstance(counts, dict) or set(counts) != set(labels):
            raise ValueError("the validation distribution's top1_class must name exactly the model's classes")
        values = [counts[label] for label in labels]
        if not all(isinstance(c, int | float) and not isinstance(c, bool) and c >= 0 for c in values):
            raise ValueError("the validation distribution's top1_class counts must be numbers >= 0")
        total = float(sum(values))
        if total <= 0:
            raise ValueError("the validation distribution counts no drawing")
        top1, known, ink = entry.get("top1_probability"), entry.get(KNOWN_SCORE), entry.get("ink_fraction")
        return Reference(
            class_share=tuple(c / total for c in values),
            top1_bounds=_bounds(top1, TOP1_PROBABILITY_BOUNDS),
            top1_mean=_number(top1, "mean"),
            known_bounds=_bounds(known, KNOWN_SCORE_BOUNDS),
            known_mean=_number(known, "mean"),
            ink_bounds=_bounds(ink, INK_FRACTION_BOUNDS),
            ink_mean=_number(ink, "mean"),
            out_of_class_rate=_number(entry, "out_of_class_rate"),
        )


class VersionCounts:
    """One version's counts (plain ints and floats: see the module). Histogram counts are per bucket, not
    cumulative; the last bucket is above the last bound."""

    __slots__ = ("arrays", "classes", "ink", "ink_bounds", "ink_edges", "ink_pixels", "kinds", "known",
                 "known_bounds", "known_sum", "n_classes", "out_of_class", "reference", "threshold", "top1",
                 "top1_bounds", "top1_sum")  # fmt: skip

    def __init__(self, n_classes: int, threshold: float | None, reference: Reference | None) -> None:
        self.n_classes = n_classes
        #: The out-of-class threshold (None: the version makes no decision, and known_score is not counted).
        self.threshold = threshold
        self.reference = reference
        r = reference
        self.top1_bounds = r.top1_bounds if r else tuple(TOP1_PROBABILITY_BOUNDS)
        self.known_bounds = r.known_bounds if r else tuple(KNOWN_SCORE_BOUNDS)
        self.ink_bounds = r.ink_bounds if r else tuple(INK_FRACTION_BOUNDS)
        #: The ink bounds in pixels: a drawing's count of pixels that are not 0 is bucketed with no division.
        self.ink_edges = tuple(b * BITMAP_PIXELS for b in self.ink_bounds)
        #: The same bounds as numpy arrays, for batches: top-1, known score, ink edges.
        self.arrays = tuple(np.asarray(b, np.float64) for b in (self.top1_bounds, self.known_bounds, self.ink_edges))
        self.classes = [0] * n_classes
        self.top1 = [0] * (len(self.top1_bounds) + 1)
        self.top1_sum = 0.0
        self.known = [0] * (len(self.known_bounds) + 1)
        self.known_sum = 0.0
        self.out_of_class = 0
        self.ink = [0] * (len(self.ink_bounds) + 1)
        self.ink_pixels = 0
        #: Drawings by input kind (the data plane's ``Kind``s: a str enum, three members).
        self.kinds: dict[str, int] = {}

    def one(self, c: int, p: float, k: float | None, ink: int, kind: str) -> None:
        """One drawing: top-1 class ``c`` with probability ``p``, known score ``k``, ``ink`` pixels."""
        if 0 <= c < self.n_classes:
            self.classes[c] += 1
        if p == p:  # not NaN
            self.top1[bisect_left(self.top1_bounds, p)] += 1
            self.top1_sum += p
        if k is not None and self.threshold is not None and -math.inf < k < math.inf:
            self.known[bisect_left(self.known_bounds, k)] += 1
            self.known_sum += k
            if k < self.threshold:
                self.out_of_class += 1
        self.ink[bisect_left(self.ink_edges, ink)] += 1
        self.ink_pixels += ink
        self.kinds[kind] = self.kinds.get(kind, 0) + 1

    def many(self, top: np.ndarray, p: np.ndarray, known: np.ndarray | None, ink: np.ndarray,
             kinds: Sequence[str]) -> None:  # fmt: skip
        """A batch, with numpy: ``top`` int [n], ``p`` float [n], ``known`` float [n] or None, ``ink`` int [n]."""
        top1_bounds, known_bounds, ink_edges = self.arrays
        top = top[(top >= 0) & (top < self.n_classes)]
        add(self.classes, np.bincount(top, minlength=self.n_classes))
        p = p[np.isfinite(p)]
        add(self.top1, np.bincount(np.searchsorted(top1_bounds, p), minlength=len(self.top1)))
        self.top1_sum += float(p.sum(dtype=np.float64))
        if known is not None and self.threshold is not None:
            k = known[np.isfinite(known)]
            add(self.known, np.bincount(np.searchsorted(known_bounds, k), minlength=len(self.known)))
            self.known_sum += float(k.sum(dtype=np.float64))
            self.out_of_class += int(np.count_nonzero(k < self.threshold))
        add(self.ink, np.bincount(np.searchsorted(ink_edges, ink), minlength=len(self.ink)))
        self.ink_pixels += int(ink.sum())
        for kind, n in Counter(kinds).items():
            self.kinds[kind] = self.kinds.get(kind, 0) + n


def add(counts: list[int], more: np.ndarray) -> None:
    """``counts`` += ``more`` (as long), in place."""
    for i, n in enumerate(more.tolist()):
        counts[i] += n


class ModelHealth:
    """The counts of every served version (see the module); ``serve`` says which, ``record`` counts a call."""

    def __init__(self) -> None:
        #: The served model's class names, in output order.
        self.labels: tuple[str, ...] = ()
        self.versions: dict[int, VersionCounts] = {}

    def serve(
        self,
        labels: Sequence[str],
        thresholds: Mapping[int, float | None],
        references: Mapping[int, Reference | None] | None = None,
    ) -> None:
        """Count the versions of ``thresholds`` (each its out-of-class threshold, None: it makes none), with their
        ``references``. A version no longer served is forgotten (its series end); one still served keeps its
        counts unless its threshold, reference or the labels changed."""
        labels = tuple(labels)
        references = references or {}
        kept = self.versions if labels == self.labels else {}
        self.labels = labels
        versions: dict[int, VersionCounts] = {}
        for v, threshold in thresholds.items():
            ref = references.get(v)
            old = kept.get(v)
            if old is not None and old.threshold == threshold and old.reference == ref:
                versions[v] = old
            else:
                versions[v] = VersionCounts(len(labels), threshold, ref)
        self.versions = versions

    def record(self, answered: Any, images: np.ndarray, kinds: Sequence[str]) -> None:
        """Count one call's answer (``service.backends.Answered``: probabilities [n, classes] or a ``TopK``, and
        the known scores) for ``images`` [n, 28, 28, 1] of ``kinds``. Costs ~1 us for one drawing."""
        v = self.versions.get(answered.version)
        if v is None:
            return
        scores = answered.scores
        n = len(scores)
        if n == 0:
            return
        known = answered.known
        probabilities = isinstance(scores, np.ndarray)
        if n == 1:
            if probabilities:
                c = int(scores.argmax())
                p = scores.item(c)
            else:
                c = scores.indices.item(0)
                p = scores.scores.item(0)
            v.one(c, p, None if known is None else known.item(0), int(np.count_nonzero(images)), kinds[0])
            return
        if probabilities:
            top = scores.argmax(axis=1)
            p = np.take_along_axis(scores, top[:, None], axis=1)[:, 0]
        else:
            top, p = scores.indices[:, 0], scores.scores[:, 0]
        if n < VECTOR_FROM:
            tops, ps = top.tolist(), p.tolist()
            ks = known.tolist() if known is not None else [None] * n
            for i in range(n):
                v.one(tops[i], ps[i], ks[i], int(np.count_nonzero(images[i])), kinds[i])
            return
        v.many(top, p, known, np.count_nonzero(images.reshape(n, -1), axis=1), kinds)
