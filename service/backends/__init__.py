"""Backends run model batches; the gateway talks to them through one small Protocol.

``embedded`` loads the SavedModel in-process with TensorFlow. Every backend takes uint8 images
[n, 28, 28, 1] and returns float32 probabilities [n, classes] in the order of ``ModelDescription.labels``.

Out-of-class detection (issue 18): a version whose signature gives ``doodle.contract.KNOWN_SCORE`` has the
backend pass that score on too (``Answered.known``, float32 [n]), and a version whose ``model_card.json`` has a
``MODEL_CARD_OOD`` entry has its threshold in ``ModelDescription.out_of_class`` (``OutOfClassInfo``). A drawing is
known when its score is at least the threshold; the gateway decides only when it has both, so models exported
before issue 18 serve as before, their predictions carrying no decision.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from doodle.contract import KNOWN_SCORE, LABELS_PATH, MODEL_CARD_DISTRIBUTION, MODEL_CARD_OOD
from service.core.modelhealth import Reference

#: A version's model card, beside ``saved_model.pb`` (the trainer writes it; the out-of-class threshold is there).
MODEL_CARD = "model_card.json"

#: From this many probabilities (rows x classes) ``TopK.of`` partitions before it sorts (see there).
PARTITION_FROM = 16384


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs ~1 us more per call
class TopK:
    """The best ``k`` classes of each drawing, best first (ties: the lower index first, as ``tf.math.top_k``).

    What a backend gives instead of probabilities when every caller of a batch wants no more than its exported
    ``top_k_*`` outputs hold: ``scores`` float32 [n, k] and ``indices`` int [n, k]. Sliced and measured like the
    probabilities array it stands for (``len``, ``[a:b]``), so the batcher hands out either alike.
    """

    scores: NDArray[np.float32]
    indices: NDArray[np.integer]

    def __len__(self) -> int:
        return len(self.scores)

    def __getitem__(self, rows: slice) -> TopK:
        return TopK(self.scores[rows], self.indices[rows])

    @staticmethod
    def of(probs: NDArray[np.float32], k: int) -> TopK:
        """Rank probabilities [n, classes]: exactly what a stable descending sort cut at ``k`` gives.

        A full sort for small arrays; from ``PARTITION_FROM`` elements a partition, then a sort of the ``k`` best
        only (where the ``k``-th score ties with one left out, the partition may have picked a higher index than
        the sort would, and such rows are sorted in full). Measured (numpy 2.4, k=3): at 29 classes the sort takes
        2 us for one row and 20 us for 128, the partition 30 and 65; at 345 classes x 128 rows 1.6 ms against 0.4."""
        n, classes = probs.shape
        k = min(k, classes)
        if k == 0 or n == 0:
            return TopK(np.zeros((n, 0), np.float32), np.zeros((n, 0), np.intp))
        if k == classes or probs.size < PARTITION_FROM:
            idx = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        else:
            idx = np.argpartition(-probs, k - 1, axis=1)[:, :k]
            vals = np.take_along_axis(probs, idx, axis=1)
            order = np.lexsort((idx, -vals), axis=1)  # by score descending, then by index
            idx = np.take_along_axis(idx, order, axis=1)
            kth = np.take_along_axis(probs, idx[:, -1:], axis=1)
            ties = np.flatnonzero((probs == kth).sum(axis=1) != (np.take_along_axis(probs, idx, 1) == kth).sum(axis=1))
            for row in ties:  # the k-th score ties with one outside the partition: rare, sorted in full
                idx[row] = np.argsort(-probs[row], kind="stable")[:k]
        return TopK(np.take_along_axis(probs, idx, axis=1), idx)


#: What a backend batch gives: probabilities [n, classes], or the best classes only (``TopK``).
Scores = NDArray[np.float32] | TopK

#: The version a call asks for when it names none and the backend chooses (``Backend.versionless``).
ANY_VERSION = 0


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs ~1 us more per call
class Answered:
    """Scores and the model version that produced them.

    A backend whose replicas may serve different versions for a while (TF Serving during a roll-out) answers a
    batch sent for ``ANY_VERSION`` with this, so each caller learns the version that really answered."""

    scores: Scores
    version: int
    #: The version's ``KNOWN_SCORE`` for each drawing, float32 [n] (None: that version has no such output). Sliced
    #: with the scores.
    known: NDArray[np.float32] | None = None


@dataclass(frozen=True)
class OutOfClassInfo:
    """A version's out-of-class decision, from its model card's ``MODEL_CARD_OOD`` entry: a drawing is known when
    its ``KNOWN_SCORE`` is at least ``threshold``; ``known_kept`` (None: not said) is the share of drawings of the
    known classes kept at that threshold, measured on ``measured_on``; ``method`` says how the score is made."""

    threshold: float
    score: str = KNOWN_SCORE
    method: str = ""
    known_kept: float | None = None
    measured_on: str = ""

    @staticmethod
    def from_card(entry: Any) -> OutOfClassInfo:
        """The model card's out-of-class entry; ValueError when it has no usable threshold or names another score."""
        if not isinstance(entry, dict):
            raise ValueError(f"{MODEL_CARD_OOD!r} must be an object, not {type(entry).__name__}")
        threshold = entry.get("threshold")
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not math.isfinite(threshold):
            raise ValueError(f"{MODEL_CARD_OOD!r} has no finite number 'threshold' (got {threshold!r})")
        score = entry.get("score", KNOWN_SCORE)
        if score != KNOWN_SCORE:
            raise ValueError(f"{MODEL_CARD_OOD!r} names the score {score!r}; the gateway serves {KNOWN_SCORE!r}")
        point = entry.get("operating_point")
        point = point if isinstance(point, dict) else {}
        kept = point.get("known_kept")
        kept_ok = isinstance(kept, int | float) and not isinstance(kept, bool) and math.isfinite(kept)
        return OutOfClassInfo(
            threshold=float(threshold),
            score=score,
            method=str(entry.get("method") or ""),
            known_kept=float(kept) if kept_ok else None,
            measured_on=str(point.get("measured_on") or ""),
        )


@dataclass(frozen=True)
class ModelDescription:
    """What a backend serves: the model name, its versions (ascending) and the labels in output order."""

    name: str
    versions: tuple[int, ...]
    labels: tuple[str, ...]
    #: The version a request without one gets, when not the highest (a TF Serving version label's).
    default: int | None = None
    #: The out-of-class decision of each served version that makes one (its signature gives ``KNOWN_SCORE`` and
    #: its model card a threshold); versions not here make none.
    out_of_class: dict[int, OutOfClassInfo] = field(default_factory=dict, hash=False)
    #: TF Serving version labels known to the backend and the version each points at (the roll-out plan's
    #: targets may name them; ``service.dataplane.rollout``).
    version_labels: dict[str, int] = field(default_factory=dict, hash=False)

    @property
    def default_version(self) -> int:
        """What a request without a version gets: ``default`` if set, else the highest version."""
        return self.versions[-1] if self.default is None else self.default

    @property
    def ood(self) -> OutOfClassInfo | None:
        """The default version's out-of-class decision (None: it makes none)."""
        return self.out_of_class.get(self.default_version)

    @functools.cached_property
    def label_chars(self) -> int:
        """The longest label's length: what every door's bound on its answer's size counts per class given (once
        per description, not per call)."""
        return max((len(x) for x in self.labels), default=0)


class Backend(Protocol):
    """A model runner behind the batcher: everything the gateway asks of one, with no member probed for."""

    name: str
    #: True when the backend itself picks the version for calls that name none (``predict`` then takes
    #: ``ANY_VERSION`` and answers ``Answered``); False: the gateway sends the default version's number.
    versionless: bool
    #: How many best classes :meth:`predict_top_k` gives per drawing; 0 when it cannot give top-k outputs alone.
    top_k_width: int
    #: Where a backend counts what it does (replicas, retries, versions): the composition root sets it.
    metrics: Any
    #: Called with the new description when the served versions change (hot reload, a roll-out).
    on_change: Callable[[ModelDescription | None], None] | None
    #: Called with what died and why when one of the backend's background tasks dies.
    on_failure: Callable[[str, BaseException | None], None] | None

    @property
    def signature_defs(self) -> Any:
        """The served version's SignatureDefs (``service.protos.tfs.SignatureDefMap``) as TF Serving's
        GetModelMetadata gives them; None until known."""
        ...

    async def start(self) -> ModelDescription:
        """Load and warm up the model; return what is served. Ready to predict when it returns."""
        ...

    def predict(
        self, images: NDArray[np.uint8], version: int, deadline_s: float | None = None, attempts: int | None = None
    ) -> Awaitable[NDArray[np.float32] | Answered]:
        """Probabilities for a batch of images, by ``deadline_s`` (monotonic clock) if given, in at most
        ``attempts`` backend attempts (None: the backend's own retry policy; shadow calls ask for 1). A backend should
        start the work when called (a future from an executor, a gRPC call) rather than when the awaitable is
        first awaited; a coroutine works too. Failures are ServiceErrors (Unavailable, DeadlineExceeded...).
        ``Answered`` names the version that answered (required for ``ANY_VERSION``)."""
        ...

    def predict_top_k(
        self, images: NDArray[np.uint8], version: int, deadline_s: float | None = None
    ) -> Awaitable[Answered]:
        """The best ``top_k_width`` classes of each drawing alone (``Answered.scores`` a ``TopK``); called only when
        ``top_k_width`` > 0."""
        ...

    def watch_labels(self, labels: frozenset[str]) -> None:
        """Follow these version labels (a roll-out plan's targets) in ``ModelDescription.version_labels``."""
        ...

    async def close(self) -> None:
        """Release resources; called after the last batch finished."""
        ...


def find_versions(base: Path) -> list[int]:
    """Integer version folders under a model base directory that hold a SavedModel, ascending."""
    if not base.is_dir():
        return []
    return sorted(int(p.name) for p in base.iterdir() if p.name.isdigit() and (p / "saved_model.pb").is_file())


def read_labels(version_dir: Path) -> tuple[str, ...]:
    """Class names from ``LABELS_PATH`` (``assets/labels.txt``), one per line, in output order."""
    return tuple(line for line in (version_dir / LABELS_PATH).read_text(encoding="utf-8").splitlines() if line)


def read_card(version_dir: Path) -> dict[str, Any] | None:
    """``version_dir``'s ``model_card.json`` (None: there is none); ValueError when it cannot be read as a JSON
    object."""
    path = version_dir / MODEL_CARD
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} cannot be read: {exc}") from None
    try:
        card = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None
    return card if isinstance(card, dict) else None


def read_reference(version_dir: Path, labels: tuple[str, ...]) -> Reference | None:
    """The validation distribution in ``version_dir``'s model card (``MODEL_CARD_DISTRIBUTION``: model health), for
    a model of ``labels``; None when there is no card or no such entry. ValueError when it is unusable."""
    card = read_card(version_dir)
    if card is None or MODEL_CARD_DISTRIBUTION not in card:
        return None
    try:
        return Reference.from_card(card[MODEL_CARD_DISTRIBUTION], labels)
    except ValueError as exc:
        raise ValueError(f"{version_dir / MODEL_CARD}: {exc}") from None


def read_out_of_class(version_dir: Path) -> OutOfClassInfo | None:
    """The out-of-class entry of ``version_dir``'s ``model_card.json`` (None: no card, or no such entry).

    Raises ValueError when the card cannot be read as JSON or the entry is unusable (an export mistake)."""
    card = read_card(version_dir)
    if card is None or MODEL_CARD_OOD not in card:
        return None
    try:
        return OutOfClassInfo.from_card(card[MODEL_CARD_OOD])
    except ValueError as exc:
        raise ValueError(f"{version_dir / MODEL_CARD}: {exc}") from None
