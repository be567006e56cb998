"""The /v1 JSON API's request bodies: the proto3 JSON mapping of a message, parsed with its shape checked first.

What is here is a pure function of its arguments, so the gateway's JSON parse workers run it too
(``service.frontends.http.jsonparse``): a body's ``{`` and ``[`` are counted before ``json.loads`` builds
anything (:func:`check_shape`), the document is walked against the message's descriptors before json_format sees
it (``service.frontends.http.jsonwalk``), and stroke arrays are taken as numbers in one pass.
"""

from __future__ import annotations

import json
import logging
from typing import Any, TypeVar

import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message

from quickdraw_client.v1 import classifier_pb2 as pb
from service.core.errors import FieldViolation, InvalidArgument, PayloadTooLarge
from service.frontends.http.jsonwalk import example, json_violations, kind, respell
from service.preprocess.validation import Limits

log = logging.getLogger(__name__)

#: JSON objects (``{``) a ClassifyRequest holds beyond its drawings and strokes (the request, model spec), with
#: slack for braces inside strings; and arrays (``[``) likewise (the drawings list).
SHAPE_SLACK = 16
#: Lists of more than this many times the drawings or strokes a request may hold are refused unparsed.
EARLY_REFUSAL = 2
#: The JSON names (and proto names) of a Stroke's number arrays.
_STROKE_ARRAYS = ("x", "y", "tMs", "t_ms")
#: The longest reason quoted from json_format when it refuses what the JSON walk (``service.frontends.http.jsonwalk``)
#: took.
MAX_REASON_CHARS = 300
M = TypeVar("M", bound=Message)


def _clip(reason: str) -> str:
    return reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 3] + "..."


def shape_limits(limits: Limits) -> tuple[int, int]:
    """The most ``{`` and ``[`` bytes a ClassifyRequest within ``limits`` holds in JSON (with slack).

    Objects: the request and its model spec, and per drawing the drawing, its stroke set or bitmap/image, and
    one per stroke. Arrays: the drawings list, and per drawing its stroke list and per stroke its
    three number arrays.
    """
    d, s = limits.max_drawings_per_request, limits.max_strokes
    return 2 + d * (3 + s) + SHAPE_SLACK, 2 + d * (1 + 3 * s) + SHAPE_SLACK


def check_shape(raw: bytes, limits: Limits) -> None:
    """Refuse a body with more JSON objects or arrays than a ClassifyRequest within ``limits`` can hold.

    ``bytes.count`` scans 16 MB in milliseconds, before ``json.loads`` builds anything: a 4 MB body of 262,144
    empty strokes (9 KB gzipped) once took 9.6 s of CPU to parse and refuse.
    """
    max_objects, max_arrays = shape_limits(limits)
    objects, arrays = raw.count(b"{"), raw.count(b"[")
    if objects > max_objects or arrays > max_arrays:
        what, n, most = (("objects ({)", objects, max_objects) if objects > max_objects
                         else ("arrays ([)", arrays, max_arrays))  # fmt: skip
        reason = (f"holds {n} JSON {what}; a ClassifyRequest within the limits "
                  f"max_drawings_per_request={limits.max_drawings_per_request} and max_strokes={limits.max_strokes} "
                  f"holds at most {most}")
        raise InvalidArgument([FieldViolation("", f"request body {reason}")], f"request body {reason}")


def respelled(error: InvalidArgument, raw: bytes) -> InvalidArgument:
    """``error`` with its field paths (and the message's leading one) spelled as the JSON body ``raw`` spells
    the fields (``topK`` or ``top_k``; ``service.frontends.http.jsonwalk.respell``): validation names them in proto
    terms."""
    descriptor = pb.ClassifyRequest.DESCRIPTOR
    fixed = [FieldViolation(respell(v.field, descriptor, raw), v.description) for v in error.violations]
    message = error.message
    if error.violations and error.violations[0].field and message.startswith(error.violations[0].field + ":"):
        message = fixed[0].field + message[len(error.violations[0].field) :]
    return InvalidArgument(fixed, message)


def parse_body(raw: bytes, message: M, max_message_bytes: int, limits: Limits | None = None) -> M:
    """A JSON body parsed into ``message``; every way it can be wrong is an InvalidArgument naming the field.

    A body whose protobuf form would be over ``max_message_bytes`` is refused as gRPC refuses that message,
    with RESOURCE_EXHAUSTED (a 413). ``json_format.ParseDict`` costs about a microsecond per value (a 16 MB
    body of coordinates took 8 s, on the event loop), so for a ClassifyRequest (given its ``limits``) the
    stroke arrays are counted first, at 4 bytes of protobuf per value; lists of more than ``EARLY_REFUSAL``
    times the drawings or strokes a request may hold are refused with the one violation validation reports
    for their count (a request nearer the limits gets every violation, as on gRPC); and stroke arrays of
    plain JSON numbers are set directly, as the same floats ParseDict would make, after ParseDict has parsed
    the rest.

    What is left is walked against the message's descriptors first (``service.frontends.http.jsonwalk``): every value
    ParseDict would refuse or overflow on is a field violation with its path in the JSON's field names. ParseDict
    stays the parser; should it still refuse the body, the violation is a generic one quoting it.
    """
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        reason = f"is not valid JSON: {exc}"
        raise InvalidArgument([FieldViolation("", reason)], f"request body {reason}") from None
    except RecursionError:  # json's C scanner recurses per nested array or object
        reason = f"nests arrays or objects too deeply to be a {message.DESCRIPTOR.name}"
        raise InvalidArgument([FieldViolation("", reason)], f"request body {reason}") from None
    if not isinstance(data, dict):
        reason = f"must be {example(message.DESCRIPTOR)} (a {message.DESCRIPTOR.name}), got {kind(data)}"
        raise InvalidArgument([FieldViolation("", reason)], f"request body {reason}")
    arrays = []
    if isinstance(message, pb.ClassifyRequest) and limits is not None:
        arrays = _take_stroke_arrays(data, limits, max_message_bytes)
    violations = json_violations(data, message.DESCRIPTOR)
    if violations:
        raise InvalidArgument(violations)
    try:
        json_format.ParseDict(data, message)
    except (json_format.ParseError, OverflowError, ValueError, TypeError) as exc:  # what the walk missed
        log.info("json_format refused a body the JSON walk took: %s", _clip(str(exc)))
        reason = f"could not be parsed as a {message.DESCRIPTOR.name}: {_clip(str(exc))}"
        raise InvalidArgument([FieldViolation("", f"request body {reason}")], f"request body {reason}") from None
    for i, j, name, values in arrays:
        getattr(message.drawings[i].strokes.strokes[j], "t_ms" if name == "tMs" else name).extend(values)  # type: ignore[attr-defined]
    size = message.ByteSize()
    if size > max_message_bytes:
        raise PayloadTooLarge(f"request is {size} bytes as a protobuf message, over the limit of "
                              f"max_message_bytes={max_message_bytes} (gRPC refuses such a message too)")
    return message


def _json_floats(values: list[Any]) -> list[float] | None:
    """A stroke array's JSON values as the floats json_format would set, or None to leave it to json_format.

    Numbers, booleans and numeric strings ("NaN", "Infinity", "1.5") are taken as ``float()`` takes them, as
    json_format takes them, but at C speed when they are all numbers. A JSON number must round to a finite
    float32: json_format refuses NaN, infinities and larger numbers (and also the largest float32 as its own
    printer writes it, 3.4028235e+38, which is taken here, so that what MessageToDict writes parses back).
    Anything else (null, lists, objects, "nan", words, numbers too large) goes to json_format, which says
    what is wrong with it.
    """
    kinds = set(map(type, values))
    if not kinds <= {int, float, bool, str}:
        return None
    try:
        if kinds <= {int, float}:
            array = np.asarray(values, dtype=np.float64)
            numbers = array
        else:
            array = np.array([_json_float(v) for v in values], dtype=np.float64)
            numbers = array[[type(v) is not str for v in values]]  # "NaN" and "Infinity" are allowed
    except (ValueError, OverflowError):
        return None
    with np.errstate(over="ignore", invalid="ignore"):
        if not np.isfinite(numbers.astype(np.float32)).all():
            return None
    return array.tolist()  # type: ignore[no-any-return]


def _json_float(value: float | bool | str) -> float:
    if value == "nan":  # json_format's one refusal of a string float() takes
        raise ValueError(value)
    return float(value)


def _take_stroke_arrays(
    data: dict[str, Any], limits: Limits, max_message_bytes: int
) -> list[tuple[int, int, str, list[float]]]:
    """Take the stroke arrays of plain numbers out of a ClassifyRequest's JSON, to be set after ParseDict.

    First refuses what no valid request holds, before anything walks it: far more drawings or strokes than
    the limits, or more stroke values than ``max_message_bytes`` can carry (a float is 4 bytes of protobuf).
    """
    out: list[tuple[int, int, str, list[float]]] = []
    drawings = data.get("drawings")
    if not isinstance(drawings, list):
        return out
    if len(drawings) > EARLY_REFUSAL * limits.max_drawings_per_request:
        raise InvalidArgument([FieldViolation("drawings", f"has {len(drawings)} drawings, over the limit of "
                                              f"max_drawings_per_request={limits.max_drawings_per_request}")])
    found: list[tuple[int, int, str, list[Any]]] = []
    for i, drawing in enumerate(drawings):
        strokes = drawing.get("strokes") if isinstance(drawing, dict) else None
        items = strokes.get("strokes") if isinstance(strokes, dict) else None
        if not isinstance(items, list):
            continue
        if len(items) > EARLY_REFUSAL * limits.max_strokes:
            raise InvalidArgument([FieldViolation(f"drawings[{i}].strokes.strokes", f"has {len(items)} strokes, "
                                                  f"over the limit of max_strokes={limits.max_strokes}")])
        for j, stroke in enumerate(items):
            if isinstance(stroke, dict) and not ("tMs" in stroke and "t_ms" in stroke):
                found += [(i, j, name, v) for name in _STROKE_ARRAYS if isinstance(v := stroke.get(name), list)]
    values = sum(len(v) for *_, v in found)
    if 4 * values > max_message_bytes:
        raise PayloadTooLarge(f"request holds {values} stroke values, over {max_message_bytes} bytes as a protobuf "
                              f"message (4 bytes each): over the limit of max_message_bytes={max_message_bytes} "
                              "(gRPC refuses such a message too)")
    for i, j, name, v in found:
        numbers = _json_floats(v)
        if numbers is not None:
            del drawings[i]["strokes"]["strokes"][j][name]
            out.append((i, j, name, numbers))
    return out
