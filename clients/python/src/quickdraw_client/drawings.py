"""Drawings in the forms a caller has them, and results in plain Python.

A drawing may be a numpy array (28x28 or 784 uint8, as Google's numpy_bitmap rows), PNG/JPEG bytes, strokes in
Google's layout (``[[[x...], [y...]], ...]``, optionally with a third ``[t...]`` list per stroke; ``raw=True``
for screen coordinates, which the gateway normalises) or a ready ``quickdraw.v1.Drawing``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar, Union

import numpy as np
from numpy.typing import NDArray

from quickdraw_client.v1 import classifier_pb2 as pb

BITMAP_SIDE = 28
BITMAP_PIXELS = BITMAP_SIDE * BITMAP_SIDE

StrokeList = Sequence[Sequence[Sequence[float]]]
#: Every form a drawing may take (a Union, not ``|``: this runs on Python 3.10's typing too).
DrawingLike = Union[NDArray[np.uint8], bytes, StrokeList, pb.Drawing]  # noqa: UP007
D = TypeVar("D")


def to_drawing(d: DrawingLike, raw: bool = False) -> pb.Drawing:
    """Any supported drawing form as a ``quickdraw.v1.Drawing``."""
    if isinstance(d, pb.Drawing):
        return d
    if isinstance(d, (bytes, bytearray, memoryview)):
        return pb.Drawing(image=pb.EncodedImage(data=bytes(d)))
    if isinstance(d, np.ndarray):
        if d.size != BITMAP_PIXELS:
            raise ValueError(f"a bitmap must have {BITMAP_PIXELS} pixels (28x28), got shape {d.shape}")
        return pb.Drawing(bitmap=pb.Bitmap(pixels=np.ascontiguousarray(d, dtype=np.uint8).tobytes()))
    strokes = [
        pb.Stroke(x=s[0], y=s[1], t_ms=s[2] if len(s) > 2 else ())  # Google's [[x...], [y...](, [t...])]
        for s in d
    ]
    coordinates = pb.Strokes.RAW if raw else pb.Strokes.SIMPLIFIED
    return pb.Drawing(strokes=pb.Strokes(strokes=strokes, coordinates=coordinates))


@dataclass(frozen=True)
class Result:
    """Top-k for one drawing, the model version that answered, and whether the drawing looks like one of the
    model's classes at all.

    ``known`` is True or False when the model version makes an out-of-class decision (``known_score >= threshold``),
    None when it makes none (models exported before it): then ``known_score`` and ``threshold`` are None too. When
    ``known`` is False, ``top`` holds the closest classes, not what the drawing is.
    """

    top: list[tuple[str, float]]
    model_version: int
    known: bool | None = None
    known_score: float | None = None
    threshold: float | None = None

    @staticmethod
    def of(prediction: pb.Prediction, model_version: int) -> Result:
        """A ``quickdraw.v1.Prediction`` as a Result."""
        top = [(s.label, s.score) for s in prediction.top]
        if not prediction.HasField("out_of_class"):
            return Result(top, model_version)
        ood = prediction.out_of_class
        return Result(top, model_version, ood.known, ood.score, ood.threshold)

    def __str__(self) -> str:
        best = "  ".join(f"{label} {score:.2f}" for label, score in self.top)
        if self.known is False:
            closest = f"; closest: {best}" if best else ""
            return f"not a known class (known_score {self.known_score:.2f} < {self.threshold:.2f}){closest}"
        return best


@dataclass(frozen=True)
class StreamItem(Generic[D]):
    """One answer of a stream: the drawing as it was given, and its result or the error the gateway gave it
    (``"INVALID_ARGUMENT: drawings[0].bitmap.pixels: ..."``, as a unary call would have failed)."""

    drawing: D
    result: Result | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the drawing was classified."""
        return self.error is None
