"""Request validation with pydantic, and turning valid drawings into the model's 28x28 input.

A ``ClassifyRequest`` proto becomes plain Python data, which the pydantic models below check against the
service's limits (passed in the validation context, since they come from settings). Every problem becomes a
``FieldViolation`` whose field is the proto path (``drawings[2].strokes.strokes[0].x``) and whose description
names the limit. Valid drawings are then rendered by the shared drawing library (``doodle``), the same code
the trainer uses, so a stroke drawing becomes the pixels Google's numpy_bitmap would hold for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from doodle import (
    BITMAP_PIXELS,
    BITMAP_SIDE,
    Drawing,
    ImageLimits,
    decode_image,
    drawing_to_bitmap,
    strokes_from_google,
)
from doodle.errors import DoodleError
from quickdraw.v1 import classifier_pb2 as pb
from service.errors import FieldViolation, InvalidArgument

SIMPLIFIED_MAX = 255.0
DEFAULT_TOP_K = 3


@dataclass(frozen=True)
class Limits:
    """Request limits, from the settings; also reported by GetModelInfo."""

    max_drawings_per_request: int = 256
    max_top_k: int = 20
    max_strokes: int = 256
    max_points: int = 8192
    max_raw_coordinate: float = 1.0e6
    max_image_bytes: int = 2 * 1024 * 1024
    max_image_pixels: int = 4 * 1024 * 1024
    num_classes: int = 345
    max_jpeg_scans: int = 32


class Kind(StrEnum):
    """The input forms; also the ``kind`` label of the drawings metric."""

    BITMAP = "bitmap"
    IMAGE = "image"
    STROKES = "strokes"


def _limits(info: ValidationInfo) -> Limits:
    return info.context["limits"] if info.context else Limits()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class BitmapIn(_Strict):
    """``Drawing.bitmap``: exactly 784 bytes."""

    kind: Literal["bitmap"] = "bitmap"
    pixels: bytes

    @field_validator("pixels")
    @classmethod
    def _size(cls, v: bytes) -> bytes:
        if len(v) != BITMAP_PIXELS:
            raise ValueError(
                f"must be {BITMAP_PIXELS} bytes ({BITMAP_SIDE}x{BITMAP_SIDE} uint8, row-major), got {len(v)}"
            )
        return v


class ImageIn(_Strict):
    """``Drawing.image``: non-empty PNG/JPEG bytes within max_image_bytes (decoded later)."""

    kind: Literal["image"] = "image"
    data: bytes

    @field_validator("data")
    @classmethod
    def _size(cls, v: bytes, info: ValidationInfo) -> bytes:
        limit = _limits(info).max_image_bytes
        if not v:
            raise ValueError("is empty; expected PNG or JPEG bytes")
        if len(v) > limit:
            raise ValueError(f"is {len(v)} bytes, over the limit of max_image_bytes={limit}")
        return v


class StrokeIn(_Strict):
    """One stroke: parallel x, y (and optional t_ms) lists of finite numbers."""

    x: list[float]
    y: list[float]
    t_ms: list[float] = Field(default_factory=list)

    @model_validator(mode="after")
    def _shape(self) -> StrokeIn:
        if len(self.x) != len(self.y):
            raise ValueError(f"x has {len(self.x)} points but y has {len(self.y)}; they must match")
        if self.t_ms and len(self.t_ms) != len(self.x):
            raise ValueError(f"t_ms has {len(self.t_ms)} values for {len(self.x)} points; give one per point or none")
        return self


class StrokesIn(_Strict):
    """``Drawing.strokes``: 1..max_strokes strokes, 1..max_points points, coordinates in range."""

    kind: Literal["strokes"] = "strokes"
    strokes: list[StrokeIn]
    coordinates: int = pb.Strokes.COORDINATES_UNSPECIFIED

    @property
    def raw(self) -> bool:
        """Raw screen coordinates, to be normalised first (else simplified, 0..255)."""
        return self.coordinates == pb.Strokes.RAW

    @field_validator("coordinates")
    @classmethod
    def _known(cls, v: int) -> int:
        # proto3 keeps an enum number it does not know; it must not be taken for SIMPLIFIED.
        if v not in pb.Strokes.Coordinates.values():
            names = ", ".join(f"{name} ({number})" for name, number in pb.Strokes.Coordinates.items())
            raise ValueError(f"is {v}, not one of {names}")
        return v

    @field_validator("strokes")
    @classmethod
    def _limits(cls, v: list[StrokeIn], info: ValidationInfo) -> list[StrokeIn]:
        lim = _limits(info)
        if len(v) > lim.max_strokes:
            raise ValueError(f"has {len(v)} strokes, over the limit of max_strokes={lim.max_strokes}")
        points = sum(len(s.x) for s in v)
        if points == 0:
            raise ValueError("drawing is empty: no points in any stroke")
        if points > lim.max_points:
            raise ValueError(f"has {points} points in all, over the limit of max_points={lim.max_points}")
        return v

    @model_validator(mode="after")
    def _coordinates(self, info: ValidationInfo) -> StrokesIn:
        lim = _limits(info)
        low, high = (-lim.max_raw_coordinate, lim.max_raw_coordinate) if self.raw else (0.0, SIMPLIFIED_MAX)
        form = "raw" if self.raw else "simplified"
        for i, s in enumerate(self.strokes):
            for axis in ("x", "y", "t_ms"):
                values = np.asarray(getattr(s, axis), dtype=np.float64)
                if values.size == 0:
                    continue
                if not np.isfinite(values).all():
                    j = int(np.flatnonzero(~np.isfinite(values))[0])
                    raise _AtField(f"strokes[{i}].{axis}[{j}]", f"is {values[j]}; coordinates must be finite")
                if axis == "t_ms":
                    continue
                bad = np.flatnonzero((values < low) | (values > high))
                if bad.size:
                    j = int(bad[0])
                    raise _AtField(
                        f"strokes[{i}].{axis}[{j}]",
                        f"is {values[j]:g}, outside {low:g}..{high:g} for {form} coordinates"
                        + ("" if self.raw else " (send raw screen coordinates with coordinates=RAW)"),
                    )
        return self


class _AtField(ValueError):
    """A validation error deeper than the validator's own field; carries the sub-path."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}|{message}")


DrawingIn = Annotated[BitmapIn | ImageIn | StrokesIn, Field(discriminator="kind")]


class ClassifyIn(_Strict):
    """A whole ``ClassifyRequest``."""

    drawings: list[DrawingIn]
    top_k: int = DEFAULT_TOP_K
    version: int | None = None

    @field_validator("drawings")
    @classmethod
    def _count(cls, v: list[Any], info: ValidationInfo) -> list[Any]:
        limit = _limits(info).max_drawings_per_request
        if not v:
            raise ValueError("is empty; send at least one drawing")
        if len(v) > limit:
            raise ValueError(f"has {len(v)} drawings, over the limit of max_drawings_per_request={limit}")
        return v

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int, info: ValidationInfo) -> int:
        lim = _limits(info)
        high = min(lim.max_top_k, lim.num_classes)
        if not 1 <= v <= high:
            raise ValueError(f"is {v}, outside 1..{high} (max_top_k={lim.max_top_k}, {lim.num_classes} classes)")
        return v


# --- proto -> plain data ------------------------------------------------------------------------------------


def _drawing_data(d: pb.Drawing) -> dict[str, Any]:
    which = d.WhichOneof("input")
    if which == "bitmap":
        return {"kind": "bitmap", "pixels": d.bitmap.pixels}
    if which == "image":
        return {"kind": "image", "data": d.image.data}
    if which == "strokes":
        return {
            "kind": "strokes",
            "coordinates": d.strokes.coordinates,
            "strokes": [{"x": list(s.x), "y": list(s.y), "t_ms": list(s.t_ms)} for s in d.strokes.strokes],
        }
    return {}


def request_data(req: pb.ClassifyRequest) -> dict[str, Any]:
    """A ClassifyRequest as plain data for ``ClassifyIn``."""
    return {
        "drawings": [_drawing_data(d) for d in req.drawings],
        "top_k": req.top_k or DEFAULT_TOP_K,
        "version": req.model.version if req.HasField("model") and req.model.version else None,
    }


def _field_path(loc: Sequence[int | str]) -> str:
    """pydantic's loc ``('drawings', 2, 'strokes', 'strokes', 0, 'x')`` as ``drawings[2].strokes.strokes[0].x``.

    The discriminator tag pydantic inserts is the proto oneof's field name, so the path is the proto's.
    """
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def violations(err: ValidationError) -> list[FieldViolation]:
    """Field violations for every pydantic error, paths in proto terms."""
    out = []
    for e in err.errors(include_url=False):
        loc = list(e["loc"])
        msg = str(e["msg"]).removeprefix("Value error, ")
        if e["type"] in ("union_tag_not_found", "union_tag_invalid"):
            msg = "exactly one of bitmap, image or strokes must be set"
        ctx_error = e.get("ctx", {}).get("error")
        if isinstance(ctx_error, _AtField):
            sub, msg = str(ctx_error).split("|", 1)
            out.append(FieldViolation(f"{_field_path(loc)}.{sub}" if loc else sub, msg))
            continue
        out.append(FieldViolation(_field_path(loc), msg))
    return out


def validate(req: pb.ClassifyRequest, limits: Limits) -> ClassifyIn:
    """Validate a request; raises InvalidArgument with one violation per problem."""
    try:
        return ClassifyIn.model_validate(request_data(req), context={"limits": limits})
    except ValidationError as exc:
        raise InvalidArgument(violations(exc)) from None


# --- rendering ---------------------------------------------------------------------------------------------


def render(
    index: int,
    drawing: BitmapIn | ImageIn | StrokesIn,
    limits: Limits,
    decode: Callable[[bytes, ImageLimits], NDArray[np.uint8]] = decode_image,
) -> NDArray[np.uint8]:
    """The 28x28 uint8 bitmap for one valid drawing; raises InvalidArgument if it cannot be decoded.

    ``decode`` decodes images (the gateway's runs them in worker processes under a time budget).
    """
    if isinstance(drawing, BitmapIn):
        return np.frombuffer(drawing.pixels, dtype=np.uint8).reshape(BITMAP_SIDE, BITMAP_SIDE)
    try:
        if isinstance(drawing, ImageIn):
            return decode(
                drawing.data,
                ImageLimits(
                    max_image_bytes=limits.max_image_bytes,
                    max_image_pixels=limits.max_image_pixels,
                    max_image_side_px=max(1, math.isqrt(limits.max_image_pixels) * 4),
                    max_jpeg_scans=limits.max_jpeg_scans,
                ),
            )
        strokes = strokes_from_google([[s.x, s.y, s.t_ms] if s.t_ms else [s.x, s.y] for s in drawing.strokes if s.x])
        return drawing_to_bitmap(Drawing(word="", strokes=strokes, raw=drawing.raw))
    except DoodleError as exc:
        field = f"drawings[{index}].image.data" if isinstance(drawing, ImageIn) else f"drawings[{index}].strokes"
        raise InvalidArgument([FieldViolation(field, str(getattr(exc, "reason", exc)))]) from None


# --- TF Serving's Predict input -------------------------------------------------------------------------------


def image_tensor(tensor: Any, key: str, limits: Limits) -> NDArray[np.uint8]:
    """TF Serving's ``inputs[key]`` as uint8 [n, 28, 28, 1]; raises InvalidArgument naming the field and limit.

    ``tensor`` is a ``tensorflow.TensorProto``; the checks are TF Serving's own for this signature (dtype and
    shape), plus this service's drawings-per-request limit.
    """
    from tensorflow.core.framework import types_pb2

    from service.tensors import TensorDecodeError, dtype_name, shape_of, to_numpy

    field = f"inputs[{key}]"
    if tensor.dtype != types_pb2.DT_UINT8:
        raise InvalidArgument(
            [FieldViolation(f"{field}.dtype", f"expected DT_UINT8, got {dtype_name(tensor.dtype)}")]
        )
    shape = shape_of(tensor)
    want = (BITMAP_SIDE, BITMAP_SIDE, 1)
    if len(shape) != 4 or shape[1:] != want:
        raise InvalidArgument(
            [FieldViolation(f"{field}.tensor_shape", f"expected [n, 28, 28, 1], got {list(shape)}")]
        )
    if not 1 <= shape[0] <= limits.max_drawings_per_request:
        raise InvalidArgument(
            [FieldViolation(f"{field}.tensor_shape.dim[0]",
                            f"batch of {shape[0]}; must be 1..{limits.max_drawings_per_request} "
                            "(max_drawings_per_request)")]
        )  # fmt: skip
    try:
        return to_numpy(tensor, broadcast=False).astype(np.uint8, copy=False)  # type: ignore[return-value]
    except TensorDecodeError as exc:
        raise InvalidArgument([FieldViolation(f"{field}.{exc.field}", str(exc))]) from None
