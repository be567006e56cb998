"""Out-of-class data and the measures of "I don't know this one": class split, rendering, AUROC, ECE.

Unknown drawings are the classes of ``simplified/`` and ``raw/`` that the model is not trained on. They are
rendered by ``doodle`` exactly as the gateway renders strokes (``drawing_to_bitmap``), so the detector sees
what serving sees. Whole classes are split three ways by a hash of the class name: ``train`` classes are
shown to the model as outliers (outlier exposure), ``val`` classes choose the score and its threshold, and
``test`` classes are only ever used for the reported figures. The split depends on nothing but the names.

The measures (``auroc``, ``fpr_at_tpr``, ``expected_calibration_error``, ``fit_temperature``) are numpy-only.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from doodle.contract import KNOWN_SCORE
from doodle.formats.bitmap import class_from_path
from doodle.formats.ndjson import read_ndjson
from doodle.raster import drawing_to_bitmap

#: Fractions of the unknown classes used for outlier exposure, validation and test (by class-name hash).
CLASS_SPLIT_FRACTIONS: tuple[float, float, float] = (0.6, 0.2, 0.2)
SPLIT_NAMES = ("train", "val", "test")
#: Bins of the expected calibration error (the usual 15, as in Guo et al. 2017).
ECE_BINS = 15
#: Share of known drawings the threshold keeps (the operating point written to the model card).
KNOWN_KEPT = 0.95
#: The vector-drawing folders of the data directory that unknown classes come from.
VECTOR_FOLDERS = ("simplified", "raw")
#: The candidate scores; "msp": calibrated max softmax, "energy": T * logsumexp(logits / T),
#: "max_logit": the largest logit. Each is higher for drawings that look more like a known class.
SCORES = ("msp", "energy", "max_logit")


def cache_dir() -> Path:
    """Where rendered unknown drawings are kept between runs (keyed by the files' names, sizes and times).

    ``QUICKDRAW_CACHE_DIR``, else ``$XDG_CACHE_HOME/quickdraw`` or ``~/.cache/quickdraw``.
    """
    if os.environ.get("QUICKDRAW_CACHE_DIR"):
        return Path(os.environ["QUICKDRAW_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "quickdraw" / "rendered"


def class_hash(name: str) -> float:
    """A number in [0, 1) fixed by the class name alone (SHA-256, so stable across runs and machines)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_classes(classes: Iterable[str], fractions: Sequence[float] = CLASS_SPLIT_FRACTIONS) -> dict[str, list[str]]:
    """Whole classes into ``train``/``val``/``test`` by their hash; each list sorted, the three disjoint."""
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) < 0:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, not {fractions}")
    edges = (fractions[0], fractions[0] + fractions[1])
    out: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
    for name in sorted(set(classes)):
        u = class_hash(name)
        out["train" if u < edges[0] else "val" if u < edges[1] else "test"].append(name)
    return out


def vector_files(data_dir: str | os.PathLike[str]) -> dict[str, list[Path]]:
    """Every ndjson file under ``simplified/`` and ``raw/`` of ``data_dir``, by class name."""
    root = Path(data_dir)
    files: dict[str, list[Path]] = {}
    for folder in VECTOR_FOLDERS:
        for path in sorted((root / folder).glob("*.ndjson")):
            files.setdefault(class_from_path(path), []).append(path)
    return files


def unknown_classes(data_dir: str | os.PathLike[str], known: Iterable[str]) -> list[str]:
    """Classes with vector drawings in ``data_dir`` that are not among ``known``, sorted."""
    known_set = set(known)
    return sorted(c for c in vector_files(data_dir) if c not in known_set)


def render_file(path: Path, limit: int | None = None) -> NDArray[np.uint8]:
    """The drawings of one ndjson file as uint8 [n, 28, 28, 1], rendered as the gateway renders strokes."""
    bitmaps = [drawing_to_bitmap(d) for d in read_ndjson(path, limit)]
    if not bitmaps:
        return np.zeros((0, 28, 28, 1), np.uint8)
    return np.stack(bitmaps)[..., None]


def _cache_key(paths: Sequence[Path], limit: int | None) -> str:
    h = hashlib.sha256(f"doodle-render-v1 limit={limit}".encode())
    for p in paths:
        st = p.stat()
        h.update(f"{p.name}\0{st.st_size}\0{int(st.st_mtime)}\0".encode())
    return h.hexdigest()[:16]


@dataclass(slots=True)
class UnknownSet:
    """Rendered drawings of unknown classes: images uint8 [n, 28, 28, 1] and each one's class name."""

    images: NDArray[np.uint8]
    classes: NDArray[np.str_]
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)


def load_unknown(
    data_dir: str | os.PathLike[str],
    classes: Sequence[str],
    cache_dir: Path | None = None,
    limit_per_file: int | None = None,
) -> UnknownSet:
    """Render every drawing of ``classes`` (simplified and raw files alike), cached as .npz in ``cache_dir``."""
    files = vector_files(data_dir)
    paths = [p for c in sorted(classes) for p in files.get(c, [])]
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"unknown-{_cache_key(paths, limit_per_file)}.npz"
        if cache.exists():
            z = np.load(cache)
            return UnknownSet(z["images"], z["classes"], sorted(set(classes)))
    images: list[NDArray[np.uint8]] = []
    names: list[str] = []
    for path in paths:
        rendered = render_file(path, limit_per_file)
        images.append(rendered)
        names += [class_from_path(path)] * len(rendered)
    out = UnknownSet(
        np.concatenate(images) if images else np.zeros((0, 28, 28, 1), np.uint8),
        np.asarray(names, dtype=np.str_),
        sorted(set(classes)),
    )
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez_compressed(tmp, images=out.images, classes=out.classes)
        os.replace(tmp, cache)
    return out


# ---- measures -------------------------------------------------------------------------------------------


def auroc(known: NDArray[np.floating], unknown: NDArray[np.floating]) -> float:
    """Area under the ROC curve of telling known (positive) from unknown by score; ties count a half.

    The probability that a random known drawing scores higher than a random unknown one (Mann-Whitney U).
    """
    k = np.asarray(known, dtype=np.float64).ravel()
    u = np.asarray(unknown, dtype=np.float64).ravel()
    if not len(k) or not len(u):
        raise ValueError("auroc needs at least one known and one unknown score")
    both = np.concatenate([k, u])
    order = np.argsort(both, kind="mergesort")
    ranks = np.empty(len(both), dtype=np.float64)
    sorted_vals = both[order]
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_vals, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    u_stat = ranks[: len(k)].sum() - len(k) * (len(k) + 1) / 2.0
    return float(u_stat / (len(k) * len(u)))


def threshold_at_tpr(known: NDArray[np.floating], tpr: float = KNOWN_KEPT) -> float:
    """The largest threshold t with at least ``tpr`` of the known scores >= t."""
    k = np.sort(np.asarray(known, dtype=np.float64).ravel())
    if not len(k):
        raise ValueError("no known scores")
    # Keep the top ceil(tpr * n) scores: the threshold is the smallest of them.
    keep = int(np.ceil(tpr * len(k) - 1e-9))
    keep = min(max(keep, 1), len(k))
    return float(k[len(k) - keep])


def fpr_at_tpr(known: NDArray[np.floating], unknown: NDArray[np.floating], tpr: float = KNOWN_KEPT) -> float:
    """Share of unknown drawings called known at the threshold that keeps ``tpr`` of the known ones."""
    t = threshold_at_tpr(known, tpr)
    return float(np.mean(np.asarray(unknown, dtype=np.float64) >= t))


def expected_calibration_error(
    probabilities: NDArray[np.floating], labels: NDArray[np.integer], bins: int = ECE_BINS
) -> float:
    """ECE: the mean over equal-width confidence bins of |accuracy - confidence|, weighted by bin size."""
    conf, acc, count = reliability(probabilities, labels, bins)
    n = count.sum()
    return float(np.sum(count * np.abs(acc - conf)) / max(n, 1))


def reliability(
    probabilities: NDArray[np.floating], labels: NDArray[np.integer], bins: int = ECE_BINS
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.int64]]:
    """Per confidence bin ((i/bins, (i+1)/bins]): mean confidence, accuracy and count (0, 0, 0 when empty)."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels).ravel()
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    idx = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(idx, minlength=bins).astype(np.int64)
    conf_sum = np.bincount(idx, weights=confidence, minlength=bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=bins)
    nz = np.maximum(count, 1)
    return conf_sum / nz, acc_sum / nz, count


def softmax(logits: NDArray[np.floating], temperature: float = 1.0) -> NDArray[np.float64]:
    """Row-wise softmax of ``logits / temperature`` in float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: NDArray[np.floating], labels: NDArray[np.integer], temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / temperature)``."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    m = z.max(axis=1, keepdims=True)
    logsumexp = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True))).ravel()
    return float(np.mean(logsumexp - z[np.arange(len(z)), np.asarray(labels).ravel()]))


def fit_temperature(logits: NDArray[np.floating], labels: NDArray[np.integer]) -> float:
    """Temperature scaling (Guo et al. 2017): the T > 0 minimising the NLL, by golden-section on log T."""
    lo, hi = np.log(0.05), np.log(20.0)
    g = (np.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(logits, labels, np.exp(a)), nll(logits, labels, np.exp(b))
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(logits, labels, np.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(logits, labels, np.exp(b))
    return float(np.exp((lo + hi) / 2.0))


def known_score(logits: NDArray[np.floating], kind: str, temperature: float = 1.0) -> NDArray[np.float64]:
    """The out-of-class score of each row (higher = more known), computed as the exported signature does."""
    z = np.asarray(logits, dtype=np.float64)
    if kind == "msp":
        return softmax(z, temperature).max(axis=1)
    if kind == "energy":
        s = z / temperature
        m = s.max(axis=1, keepdims=True)
        return (temperature * (m + np.log(np.exp(s - m).sum(axis=1, keepdims=True)))).ravel()
    if kind == "max_logit":
        return z.max(axis=1)
    raise ValueError(f"unknown score {kind!r}; one of {SCORES}")


def ood_summary(known: NDArray[np.floating], unknown: NDArray[np.floating], threshold: float | None = None) -> dict:
    """AUROC, FPR at 95% TPR and, with a threshold, the shares kept on each side."""
    out = {
        "auroc": round(auroc(known, unknown), 4),
        "fpr_at_95_tpr": round(fpr_at_tpr(known, unknown, KNOWN_KEPT), 4),
        "known_n": len(known),
        "unknown_n": len(unknown),
    }
    if threshold is not None:
        out["threshold"] = threshold
        out["known_kept"] = round(float(np.mean(np.asarray(known) >= threshold)), 4)
        out["unknown_called_known"] = round(float(np.mean(np.asarray(unknown) >= threshold)), 4)
    return out


__all__ = ["KNOWN_SCORE", "UnknownSet", "auroc", "expected_calibration_error", "fit_temperature", "split_classes"]


# ---- training-side glue ---------------------------------------------------------------------------------

#: Drawings per file at most in the outlier-exposure pool (monkey alone has 1,000; the others 20 to 46).
OE_PER_FILE = 100


@dataclass(slots=True)
class OutlierData:
    """The class split and the outlier-exposure pool: images and targets (-1 unknown, else the known class)."""

    split: dict[str, list[str]]
    train_images: NDArray[np.uint8]
    train_targets: NDArray[np.int32]


def outlier_data(data_dir: str | os.PathLike[str], data: object, cache_dir: Path | None) -> OutlierData:
    """Split the unknown classes of ``data_dir`` and render the pool outlier exposure trains on.

    The pool holds the unknown ``train`` classes (target -1) and the known classes' vector drawings rendered by
    doodle (their class id), so that the model cannot learn "rendered by doodle" as a sign of an unknown class;
    only vector drawings whose rows fall in the known class's training split are used (line i of
    ``simplified/<class>.ndjson`` is row i of its numpy_bitmap file).
    """
    from trainer.data import BitmapData, Split

    assert isinstance(data, BitmapData)
    split = split_classes(unknown_classes(data_dir, data.labels))
    unknown = load_unknown(data_dir, split["train"], cache_dir, limit_per_file=OE_PER_FILE)
    images = [unknown.images]
    targets = [np.full(len(unknown), -1, np.int32)]
    simplified = Path(data_dir) / "simplified"
    for c, label in enumerate(data.labels):
        path = simplified / f"{label}.ndjson"
        if not path.is_file():
            continue
        train_rows = data.splits[c][Split.TRAIN]
        rendered = _cached_render(path, min(OE_PER_FILE, train_rows.stop), cache_dir)
        images.append(rendered)
        targets.append(np.full(len(rendered), c, np.int32))
    return OutlierData(split, np.concatenate(images), np.concatenate(targets))


def _cached_render(path: Path, limit: int, cache_dir: Path | None) -> NDArray[np.uint8]:
    if cache_dir is None:
        return render_file(path, limit)
    cache = Path(cache_dir) / f"known-{_cache_key([path], limit)}.npy"
    if cache.exists():
        return np.load(cache)
    out = render_file(path, limit)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, out)
    os.replace(tmp, cache)
    return out


def choose_score(
    logits_of: object,
    val_logits: NDArray[np.floating],
    outliers: OutlierData,
    data_dir: str | os.PathLike[str],
    cache_dir: Path | None,
    temperature: float,
    method: str,
) -> tuple[dict, dict]:
    """Pick the score with the lowest validation FPR at 95% TPR (then highest AUROC) and its threshold.

    Returns the model card's out-of-class entry (with ``score_kind``, the chosen candidate) and every
    candidate's validation figures. Without unknown validation classes it falls back to the calibrated max
    softmax.
    """
    val_unknown = load_unknown(data_dir, outliers.split["val"], cache_dir)
    candidates: dict[str, dict] = {}
    if len(val_unknown):
        u_logits = logits_of(val_unknown.images)  # type: ignore[operator]
        for kind in SCORES:
            k = known_score(val_logits, kind, temperature)
            u = known_score(u_logits, kind, temperature)
            candidates[kind] = {"auroc": round(auroc(k, u), 4), "fpr_at_95_tpr": round(fpr_at_tpr(k, u), 4)}
        kind = min(candidates, key=lambda c: (candidates[c]["fpr_at_95_tpr"], -candidates[c]["auroc"]))
    else:
        kind = "msp"
    known = known_score(val_logits, kind, temperature)
    threshold = threshold_at_tpr(known, KNOWN_KEPT)
    card = {
        "score": KNOWN_SCORE,
        "score_kind": kind,
        "method": f"{method}; score: {SCORE_DESCRIPTIONS[kind]}, chosen on validation",
        "threshold": threshold,
        "operating_point": {"known_kept": KNOWN_KEPT, "measured_on": "validation"},
        "validation": candidates.get(kind, {}),
        "candidates": candidates,
        "split": {
            "rule": "whole classes by SHA-256 of the name: 60% train (outlier exposure), 20% val, 20% test",
            "train_classes": outliers.split["train"],
            "val_classes": outliers.split["val"],
            "test_classes": outliers.split["test"],
        },
    }
    return card, candidates


SCORE_DESCRIPTIONS = {
    "msp": "max of the calibrated softmax",
    "energy": "T * logsumexp(logits / T) (negative free energy)",
    "max_logit": "largest logit",
}
