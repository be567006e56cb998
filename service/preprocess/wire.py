"""Counting a request's parts on its protobuf wire bytes, before anything is built from them.

A 4 MiB ClassifyRequest of two-byte empty drawings (``b"\\x0a\\x00" * 2_097_144``) parses in ~90 ms into two
million messages and 80 MB, before any limit is looked at; a nested one (one drawing of two million empty
strokes) does the same one level down. So the gRPC handlers receive the raw bytes, and these scanners walk
only the fields that hold repeated *messages* (drawings, strokes, Predict's inputs and tensor dims), stopping
at the first count over a bound: the work is bounded by the limits, whatever the request holds. Numbers
(packed floats and ints) are not walked: the parser stores them as flat arrays, bounded by the message size.

Counts up to ``SCAN_FACTOR`` times a limit are let through, so that validation reports the exact count and
every other violation of a request near its limits, as it always has; beyond that the request is refused at
once with one violation naming the limit. Malformed bytes stop the scan and are left for the parser to refuse
with its own error.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.core.errors import FieldViolation, InvalidArgument

#: Repeated messages are counted up to this many times their limit before the request is refused unparsed.
SCAN_FACTOR = 2
#: Most fields a message may hold besides its repeated messages: generated serializers write each singular
#: field once; a request with more is hand-made, and merging thousands of copies costs the parser.
MAX_OTHER_FIELDS = 32
#: TF Serving's Predict: most inputs and output_filter entries, and fields of one TensorProto (serializers
#: write numbers packed, so a tensor has a handful of fields), and dims of one shape.
MAX_PREDICT_INPUTS = 16
MAX_OUTPUT_FILTER = 16
MAX_TENSOR_FIELDS = 64
MAX_TENSOR_DIMS = 16
#: A request at most this large is parsed before its parts are counted, then counted on the parsed message with
#: the same errors (Classify, Predict and OIP's ModelInfer alike): protobuf's C parser (upb) makes no Python object
#: until one is read, and 4 KiB of the worst content (2,048 empty messages or map entries) parses in at most ~40 us
#: (against ~1 ms of gateway CPU for a legitimate call), so a walk of the wire first (~3 us of Python for a
#: one-image request, ~8 us among the rest of a call) would buy nothing there. A one-image request is under 1 KiB;
#: four images of OIP's raw form are 3.2 KiB. Singular fields (and map keys) sent more than once are merged as
#: protobuf defines; only larger requests are refused for them (``hand_made``).
PARSE_FIRST_BYTES = 4 * 1024

_WT_VARINT, _WT_I64, _WT_LEN, _WT_I32 = 0, 1, 2, 5
#: Serialized protobuf: as gRPC handed it over, or a view into a larger message.
Wire = bytes | memoryview


class Malformed(Exception):
    """The bytes are not valid protobuf; the parser will say so."""


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs ~1 us more per call
class Spans:
    """The byte ranges of one repeated message field's values, and how many other fields the message held."""

    spans: list[tuple[int, int]]
    others: int


def _varint(buf: Wire, i: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if i >= end or shift > 63:
            raise Malformed
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7


def scan(buf: Wire, start: int, end: int, field: int, limit: int, other_limit: int = MAX_OTHER_FIELDS) -> Spans:
    """The spans of ``field`` (a LEN field) in the message ``buf[start:end]``.

    Stops when ``field`` occurs more than ``limit`` times or any other field more than ``other_limit`` times in
    all, returning what it has so far (the caller sees ``len(spans) > limit`` or ``others > other_limit``).
    """
    (spans,), others = scan_fields(buf, start, end, (field,), limit, other_limit)
    return Spans(spans, others)


def scan_fields(buf: Wire, start: int, end: int, fields: tuple[int, ...], limit: int,
                other_limit: int = MAX_OTHER_FIELDS) -> tuple[list[list[tuple[int, int]]], int]:
    """:func:`scan` for several LEN fields in one walk of ``buf[start:end]``: their spans, in the order of
    ``fields``, and how many other fields the message held.

    Stops when any of ``fields`` occurs more than ``limit`` times or the other fields more than ``other_limit``
    times in all (the caller sees a list longer than ``limit``, or ``others > other_limit``).
    """
    found: dict[int, list[tuple[int, int]]] = {(f << 3) | _WT_LEN: [] for f in fields}
    others = 0
    i = start
    while i < end:
        tag = buf[i]
        if tag < 0x80:
            i += 1
        else:
            tag, i = _varint(buf, i, end)
        if tag < 8:  # field number 0: not protobuf
            raise Malformed
        wire = tag & 7
        if wire == _WT_LEN:
            n = buf[i] if i < end else 0x80
            if n < 0x80:
                i += 1
            else:
                n, i = _varint(buf, i, end)
            if i + n > end:
                raise Malformed
            spans = found.get(tag)
            i += n
            if spans is not None:
                spans.append((i - n, i))
                if len(spans) > limit:
                    break
                continue
        elif wire == _WT_VARINT:
            _, i = _varint(buf, i, end)
        elif wire == _WT_I32:
            i += 4
        elif wire == _WT_I64:
            i += 8
        else:  # groups (3, 4) and invalid wire types: the parser refuses them
            raise Malformed
        others += 1
        if others > other_limit:
            break
    if i > end:
        raise Malformed
    return list(found.values()), others


def too_many(field: str, what: str, limit: int, setting: str = "") -> InvalidArgument:
    """The refusal of ``field`` holding more ``what`` than ``limit`` (counted on the wire, before parsing)."""
    name = f"{setting}={limit}" if setting else str(limit)
    counted = SCAN_FACTOR * limit if setting else limit
    reason = f"has more than {counted} {what}, over the limit of {name} (refused before parsing)"
    return InvalidArgument([FieldViolation(field, reason)])


def hand_made(field: str, other_limit: int) -> InvalidArgument:
    """The refusal of a message with more fields than a serializer writes (the count stopped there)."""
    reason = (f"holds more than {other_limit} fields besides its repeated ones; protobuf serializers write "
              "each field once (refused before parsing)")
    return InvalidArgument([FieldViolation(field, reason)])


def check_classify(buf: Wire, max_drawings: int, max_strokes: int, start: int = 0, end: int | None = None,
                   prefix: str = "", top: Spans | None = None) -> None:  # fmt: skip
    """Refuse a serialized ClassifyRequest (``buf[start:end]``) whose drawings or strokes are far over the limits.

    Raises InvalidArgument naming the limit; lets malformed bytes through for the parser to refuse. ``top``: the
    whole request's top level as :func:`top_level` counted it already (not scanned again).
    """
    end = len(buf) if end is None else end
    try:
        if top is None:
            top = scan(buf, start, end, 1, SCAN_FACTOR * max_drawings)
            if len(top.spans) > SCAN_FACTOR * max_drawings:
                raise too_many(f"{prefix}drawings", "drawings", max_drawings, "max_drawings_per_request")
            if top.others > MAX_OTHER_FIELDS:
                raise hand_made(prefix or "request", MAX_OTHER_FIELDS)
        for d, (a, b) in enumerate(top.spans):
            drawing = scan(buf, a, b, 3, MAX_OTHER_FIELDS)  # Drawing.strokes (a oneof member: merged if repeated)
            if len(drawing.spans) > MAX_OTHER_FIELDS or drawing.others > MAX_OTHER_FIELDS:
                raise hand_made(f"{prefix}drawings[{d}]", MAX_OTHER_FIELDS)
            strokes = 0
            for a2, b2 in drawing.spans:
                inner = scan(buf, a2, b2, 1, SCAN_FACTOR * max_strokes - strokes)
                strokes += len(inner.spans)
                if strokes > SCAN_FACTOR * max_strokes:
                    raise too_many(f"{prefix}drawings[{d}].strokes.strokes", "strokes", max_strokes, "max_strokes")
                if inner.others > MAX_OTHER_FIELDS:
                    raise hand_made(f"{prefix}drawings[{d}].strokes", MAX_OTHER_FIELDS)
    except Malformed:
        return


def count_drawings(buf: Wire, max_drawings: int) -> int:
    """The drawings of a serialized ClassifyRequest, counted on its top level only (see :func:`top_level`); malformed
    bytes count 0 (the parser refuses them later)."""
    top = top_level(buf, max_drawings)
    return 0 if top is None else len(top.spans)


def top_level(buf: Wire, max_drawings: int) -> Spans | None:
    """A serialized ClassifyRequest's drawings, found on its top level only: at most ``SCAN_FACTOR`` times
    ``max_drawings`` and ``MAX_OTHER_FIELDS`` fields are looked at, so this costs the same whatever the request
    holds, cheap enough for the event loop to decide admission before anything else is done. None: malformed.

    Raises InvalidArgument for far too many drawings or fields, as :func:`check_classify` does.
    """
    try:
        top = scan(buf, 0, len(buf), 1, SCAN_FACTOR * max_drawings)
    except Malformed:
        return None
    if len(top.spans) > SCAN_FACTOR * max_drawings:
        raise too_many("drawings", "drawings", max_drawings, "max_drawings_per_request")
    if top.others > MAX_OTHER_FIELDS:
        raise hand_made("request", MAX_OTHER_FIELDS)
    return top


def stream_parts(buf: Wire) -> tuple[bytes, Wire]:
    """A serialized ClassifyStreamRequest split into its ``id`` (UTF-8 bytes) and its ``request`` (bytes).

    Both are found over at most ``MAX_OTHER_FIELDS`` fields; repeated ``request`` fields are concatenated,
    which is protobuf's merge of them, the last ``id`` wins, and unknown fields are skipped, as the parser
    would have it.
    Raises Malformed for bytes that are not a message, InvalidArgument for a hand-made one with many fields.
    """
    ids = scan(buf, 0, len(buf), 1, MAX_OTHER_FIELDS)
    requests = scan(buf, 0, len(buf), 2, MAX_OTHER_FIELDS)
    if len(ids.spans) + len(requests.spans) > MAX_OTHER_FIELDS or ids.others > MAX_OTHER_FIELDS:
        raise hand_made("stream message", MAX_OTHER_FIELDS)
    ident = bytes(buf[ids.spans[-1][0] : ids.spans[-1][1]]) if ids.spans else b""
    if len(requests.spans) == 1:  # the usual case: a view, not a copy of up to max_message_bytes
        a, b = requests.spans[0]
        return ident, memoryview(buf)[a:b]
    return ident, b"".join(bytes(buf[a:b]) for a, b in requests.spans)


def check_predict(buf: bytes) -> None:
    """Refuse a serialized PredictRequest with more inputs, outputs, tensor fields or dims than any real one has."""
    others = MAX_OTHER_FIELDS + MAX_OUTPUT_FILTER + MAX_PREDICT_INPUTS
    try:
        top = scan(buf, 0, len(buf), 2, MAX_PREDICT_INPUTS, others)  # inputs: map<string, TensorProto> entries
        if len(top.spans) > MAX_PREDICT_INPUTS:
            raise too_many("inputs", "entries", MAX_PREDICT_INPUTS)
        if top.others > others:  # the scan stopped early: what follows was not counted (81 empty fields did it)
            raise hand_made("request", others)
        filters = scan(buf, 0, len(buf), 3, MAX_OUTPUT_FILTER, others)  # output_filter: repeated string
        if len(filters.spans) > MAX_OUTPUT_FILTER:
            raise too_many("output_filter", "names", MAX_OUTPUT_FILTER)
        for a, b in top.spans:
            entry = scan(buf, a, b, 2, 4)  # map entry: key = 1, value = 2 (a TensorProto)
            if len(entry.spans) > 4 or entry.others > 4:
                raise hand_made("inputs", 4)
            for a2, b2 in entry.spans:
                tensor = scan(buf, a2, b2, 2, 4, MAX_TENSOR_FIELDS)  # TensorProto.tensor_shape
                if tensor.others > MAX_TENSOR_FIELDS or len(tensor.spans) > 4:
                    reason = (f"a tensor holds more than {MAX_TENSOR_FIELDS} fields: send its values packed "
                              "(tensor_content, or packed int_val/float_val, as protobuf serializers do)")
                    raise InvalidArgument([FieldViolation("inputs", reason)])
                for a3, b3 in tensor.spans:
                    dims = scan(buf, a3, b3, 2, MAX_TENSOR_DIMS, 4)  # TensorShapeProto.dim
                    if len(dims.spans) > MAX_TENSOR_DIMS or dims.others > 4:
                        raise too_many("inputs.tensor_shape.dim", "dimensions", MAX_TENSOR_DIMS)
    except Malformed:
        return


def check_metadata_request(buf: Wire, max_fields: int = MAX_OUTPUT_FILTER) -> None:
    """Refuse a serialized GetModelMetadataRequest with more ``metadata_field`` names (field 2) than any real one
    has (TF Serving knows one), before parsing it: 2,000,000 of them took the event loop 150 ms to parse."""
    try:
        names = scan(buf, 0, len(buf), 2, max_fields, MAX_OTHER_FIELDS)
    except Malformed:
        return
    if len(names.spans) > max_fields:
        raise too_many("metadata_field", "names", max_fields)
    if names.others > MAX_OTHER_FIELDS:
        raise hand_made("request", MAX_OTHER_FIELDS)
