"""Request validation with pydantic, and turning valid drawings into the model's 28x28 input.

A ``ClassifyRequest`` proto becomes plain Python data, which the pydantic models below check against the
service's limits (passed in the validation context, since they come from settings). Every problem becomes a
``FieldViolation`` whose field is the proto path (``drawings[2].strokes.strokes[0].x``) and whose description
names the limit. Valid drawings are then rendered by the shared drawing library (``doodle``), the same code
the trainer uses, so a stroke drawing becomes the pixels Google's numpy_bitmap would hold for it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from doodle import (
    BITMAP_PIXELS,
    BITMAP_SIDE,
    ImageLimits,
    decode_image,
    flat_strokes_to_bitmap,
)
from doodle.errors import DoodleError
from quickdraw_client.v1 import classifier_pb2 as pb
from service.core.errors import FieldViolation, InvalidArgument

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


class StrokeArrays:
    """A drawing's strokes as flat arrays: every stroke's x (y, t_ms) values one after another, and each stroke's
    count of them. Checks and rendering work on whole drawings with numpy instead of one object per stroke.

    A plain class, not a dataclass: pydantic takes it as it is (``arbitrary_types_allowed``), field by field.
    """

    __slots__ = ("nt", "nx", "ny", "t_ms", "x", "y")

    def __init__(
        self,
        x: NDArray[np.float64],
        y: NDArray[np.float64],
        t_ms: NDArray[np.float64],
        nx: NDArray[np.int64],
        ny: NDArray[np.int64],
        nt: NDArray[np.int64],
    ) -> None:
        self.x, self.y, self.t_ms, self.nx, self.ny, self.nt = x, y, t_ms, nx, ny, nt

    @classmethod
    def from_proto(cls, strokes: Sequence[pb.Stroke]) -> StrokeArrays:
        """The arrays of a ``Strokes.strokes`` list (one pass per axis, in C, over the parsed floats)."""
        n = len(strokes)
        lengths = [np.fromiter((len(getattr(s, axis)) for s in strokes), np.int64, count=n) for axis in _AXES]
        chain = itertools.chain.from_iterable
        values = [
            np.fromiter(chain(getattr(s, axis) for s in strokes), np.float64, count=int(k.sum()))
            for axis, k in zip(_AXES, lengths, strict=True)
        ]
        return cls(*values, *lengths)

    @classmethod
    def from_lists(cls, strokes: Sequence[tuple[Sequence[float], ...]]) -> StrokeArrays:
        """The arrays of ``(x, y[, t_ms])`` lists (tests and tools)."""
        cols = [[list(s[a]) if a < len(s) else [] for s in strokes] for a in range(3)]
        return cls(
            *(np.asarray(list(itertools.chain.from_iterable(c)), np.float64) for c in cols),
            *(np.asarray([len(v) for v in c], np.int64).reshape(-1) for c in cols),
        )

    def __len__(self) -> int:
        return len(self.nx)

    @property
    def points(self) -> int:
        """Points in all strokes."""
        return int(self.nx.sum())

    def axis(self, name: str) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
        """One axis's values and per-stroke counts."""
        return getattr(self, name), getattr(self, "n" + name[0])

    def stroke(self, j: int, name: str) -> NDArray[np.float64]:
        """One stroke's values of one axis."""
        values, counts = self.axis(name)
        start = int(counts[:j].sum())
        return values[start : start + int(counts[j])]


_AXES = ("x", "y", "t_ms")


def _first_bad(values: NDArray[np.float64], counts: NDArray[np.int64], low: float, high: float) -> int | None:
    """The index of the first stroke holding a value that is not finite or outside low..high (None: none)."""
    if values.size == 0:
        return None
    bad = ~np.isfinite(values) | (values < low) | (values > high)
    if not bad.any():
        return None
    first = int(np.argmax(bad))
    return int(np.searchsorted(np.cumsum(counts), first, side="right"))


class StrokesIn(_Strict):
    """``Drawing.strokes``: 1..max_strokes strokes, 1..max_points points, coordinates in range.

    Checked on the drawing's flat arrays (numpy, whatever the number of strokes); a violation's exact stroke
    and index are worked out only once a check has failed.
    """

    kind: Literal["strokes"] = "strokes"
    strokes: StrokeArrays
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
    def _limits(cls, v: StrokeArrays, info: ValidationInfo) -> StrokeArrays:
        lim = _limits(info)
        shape = []
        for j in np.flatnonzero(v.nx != v.ny).tolist():
            shape.append((f"[{j}]", f"x has {v.nx[j]} points but y has {v.ny[j]}; they must match"))
        for j in np.flatnonzero((v.nt != 0) & (v.nt != v.nx) & (v.nx == v.ny)).tolist():
            shape.append((f"[{j}]", f"t_ms has {v.nt[j]} values for {v.nx[j]} points; give one per point or none"))
        if shape:
            raise _AtField(*sorted(shape, key=lambda p: int(p[0][1:-1])))
        if len(v) > lim.max_strokes:
            raise ValueError(f"has {len(v)} strokes, over the limit of max_strokes={lim.max_strokes}")
        points = v.points
        if points == 0:
            raise ValueError("drawing is empty: no points in any stroke")
        if points > lim.max_points:
            raise ValueError(f"has {points} points in all, over the limit of max_points={lim.max_points}")
        return v

    @model_validator(mode="after")
    def _coordinates(self, info: ValidationInfo) -> StrokesIn:
        lim = _limits(info)
        low, high = (-lim.max_raw_coordinate, lim.max_raw_coordinate) if self.raw else (0.0, SIMPLIFIED_MAX)
        bounds = {"x": (low, high), "y": (low, high), "t_ms": (-math.inf, math.inf)}
        found = [(j, a) for a, axis in enumerate(_AXES)
                 if (j := _first_bad(*self.strokes.axis(axis), *bounds[axis])) is not None]  # fmt: skip
        if not found:
            return self
        i, a = min(found)
        axis = _AXES[a]
        values = self.strokes.stroke(i, axis)
        form = "raw" if self.raw else "simplified"
        if not np.isfinite(values).all():
            j = int(np.flatnonzero(~np.isfinite(values))[0])
            raise _AtField((f"strokes[{i}].{axis}[{j}]", f"is {values[j]}; coordinates must be finite"))
        j = int(np.flatnonzero((values < low) | (values > high))[0])
        raise _AtField(
            (
                f"strokes[{i}].{axis}[{j}]",
                f"is {values[j]:g}, outside {low:g}..{high:g} for {form} coordinates"
                + ("" if self.raw else " (send raw screen coordinates with coordinates=RAW)"),
            )
        )


class _AtField(ValueError):
    """Validation errors deeper than the validator's own field: (sub-path, message) pairs, the sub-path relative to
    the field (``[3]`` or ``strokes[0].x[5]``)."""

    def __init__(self, *problems: tuple[str, str]) -> None:
        super().__init__("; ".join(message for _, message in problems))
        self.problems = problems


DrawingIn = Annotated[BitmapIn | ImageIn | StrokesIn, Field(discriminator="kind")]


class ClassifyIn(_Strict):
    """A whole ``ClassifyRequest``: its drawings are validated one by one (:func:`validate`), then this envelope."""

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


_DRAWING: TypeAdapter[BitmapIn | ImageIn | StrokesIn] = TypeAdapter(DrawingIn)


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
            "strokes": StrokeArrays.from_proto(d.strokes.strokes),
        }
    return {}


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


def _join(path: str, sub: str) -> str:
    if not path:
        return sub
    return f"{path}{sub}" if sub.startswith("[") else f"{path}.{sub}"


def violations(err: ValidationError, prefix: Sequence[int | str] = ()) -> list[FieldViolation]:
    """Field violations for every pydantic error, paths in proto terms (``prefix``: the validated part's loc)."""
    out = []
    for e in err.errors(include_url=False):
        loc = [*prefix, *e["loc"]]
        msg = str(e["msg"]).removeprefix("Value error, ")
        if e["type"] in ("union_tag_not_found", "union_tag_invalid"):
            msg = "exactly one of bitmap, image or strokes must be set"
        ctx_error = e.get("ctx", {}).get("error")
        if isinstance(ctx_error, _AtField):
            out.extend(FieldViolation(_join(_field_path(loc), sub), m) for sub, m in ctx_error.problems)
            continue
        out.append(FieldViolation(_field_path(loc), msg))
    return out


def bitmaps_only(req: pb.ClassifyRequest, limits: Limits) -> tuple[NDArray[np.uint8], int, int | None] | None:
    """The commonest request checked without building its pydantic models: every drawing a bitmap of exactly
    ``BITMAP_PIXELS`` bytes, as many drawings and classes as the limits allow. Returns its bitmaps [n, 28, 28, 1], its
    top_k and the version it asks for (None: the default), or None for any other request, which :func:`validate`
    then checks (and words the errors of); what this accepts, validate accepts the same."""
    drawings = req.drawings
    top_k = req.top_k or DEFAULT_TOP_K
    if not 0 < len(drawings) <= limits.max_drawings_per_request or not 1 <= top_k <= min(limits.max_top_k,
                                                                                          limits.num_classes):
        return None
    pixels = []
    for d in drawings:
        if d.WhichOneof("input") != "bitmap" or len(d.bitmap.pixels) != BITMAP_PIXELS:
            return None
        pixels.append(d.bitmap.pixels)
    images = np.frombuffer(bytearray(b"".join(pixels)), np.uint8).reshape(len(pixels), BITMAP_SIDE, BITMAP_SIDE, 1)
    return images, top_k, (req.model.version if req.HasField("model") and req.model.version else None)


def validate(req: pb.ClassifyRequest, limits: Limits) -> ClassifyIn:
    """Validate a request; raises InvalidArgument with one violation per problem.

    Each drawing is validated on its own (a strokes drawing on its flat arrays), then the envelope: no single
    call holds the GIL for long whatever the request, so the event loop keeps running while a preprocessing
    thread validates a large request. The violations are those one validation of the whole would report.
    """
    context = {"limits": limits}
    drawings: list[BitmapIn | ImageIn | StrokesIn] = []
    problems: list[FieldViolation] = []
    for i, d in enumerate(req.drawings):
        try:
            drawings.append(_DRAWING.validate_python(_drawing_data(d), context=context))
        except ValidationError as exc:
            problems.extend(violations(exc, ("drawings", i)))
    envelope = {
        "drawings": drawings if not problems else drawings or [None],
        "top_k": req.top_k or DEFAULT_TOP_K,
        "version": req.model.version if req.HasField("model") and req.model.version else None,
    }
    try:
        valid = ClassifyIn.model_validate(envelope, context=context)
    except ValidationError as exc:
        # a count is judged only once every drawing is valid, as one validation of the whole request does
        problems.extend(v for v in violations(exc) if not (problems and v.field.startswith("drawings")))
    if problems:
        raise InvalidArgument(problems)
    return valid


# --- rendering ---------------------------------------------------------------------------------------------

#: Renders one drawing's strokes given as flat x, y, per-stroke point counts and whether they are raw.
StrokeRenderer = Callable[[NDArray[np.float64], NDArray[np.float64], NDArray[np.int64], bool], NDArray[np.uint8]]


def render(
    index: int,
    drawing: BitmapIn | ImageIn | StrokesIn,
    limits: Limits,
    decode: Callable[[bytes, ImageLimits], NDArray[np.uint8]] = decode_image,
    draw: StrokeRenderer | None = None,
) -> NDArray[np.uint8]:
    """The 28x28 uint8 bitmap for one valid drawing; raises InvalidArgument if it cannot be decoded.

    ``decode`` decodes images and ``draw`` renders strokes given as flat x, y and per-stroke counts (the
    gateway's run in worker processes under a time budget; ``service.preprocess.decode``); without ``draw`` strokes are
    rendered here, by the same ``doodle.flat_strokes_to_bitmap``.
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
        return (draw or flat_strokes_to_bitmap)(drawing.strokes.x, drawing.strokes.y, drawing.strokes.nx, drawing.raw)
    except DoodleError as exc:
        field = f"drawings[{index}].image.data" if isinstance(drawing, ImageIn) else f"drawings[{index}].strokes"
        raise InvalidArgument([FieldViolation(field, str(getattr(exc, "reason", exc)))]) from None


# --- TF Serving's Predict input -------------------------------------------------------------------------------


def image_tensor(tensor: Any, key: str, limits: Limits) -> NDArray[np.uint8]:
    """TF Serving's ``inputs[key]`` as uint8 [n, 28, 28, 1]; raises InvalidArgument naming the field and limit.

    ``tensor`` is a ``tensorflow.TensorProto`` (``service.protos.tfs.TensorProto``); the checks are TF Serving's own for
    this signature (dtype and shape), plus this service's drawings-per-request limit.
    """
    from service.protos import tfs
    from service.protos.tensors import TensorDecodeError, dtype_name, shape_of, to_numpy

    field = f"inputs[{key}]"
    if tensor.dtype != tfs.DT_UINT8:
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
