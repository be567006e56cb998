"""Field violations for JSON that ``json_format.ParseDict`` would refuse, found by walking the JSON itself.

:func:`json_violations` walks a parsed JSON value (what ``json.loads`` made) against a message descriptor, by
the proto3 JSON mapping as ``json_format`` implements it: fields by JSON name or proto name, null for a
field's default, objects for messages and maps, arrays for repeated fields, int64/uint64 (and every integer)
as numbers or strings, floats as numbers or the strings "NaN", "Infinity" and "-Infinity", bytes as base64
(standard or URL-safe, padding optional), enums by name or number, and the well-known wrappers as their bare
values. Each value ParseDict would refuse, or overflow on, is a :class:`FieldViolation` with its path in the
JSON's own field names (``drawings[2].strokes.strokes[0].x[5]``) and what was expected and found (the value
clipped to ``VALUE_CHARS``), in JSON terms: a string where a message belongs is ``expected an object like
{"data": "<base64>"}, got a string`` (the example built from the descriptor). :func:`respell` names a proto
field path (validation's) as a body spelled the fields.

The walk accepts everything ParseDict accepts (its quirks too: ``1.5`` is enum 1, ``"1e3"`` an int64 of 1000,
``[]`` an empty message), so that ParseDict stays the parser and the walk only names what is wrong. Arrays
of numbers for float fields are checked with numpy when they are all plain numbers. The walk is a plain
function of its arguments (it runs in ``service.frontends.http.jsonparse``'s worker processes too).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import math
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from service.core.errors import FieldViolation

#: The most violations one walk reports (it stops there).
MAX_VIOLATIONS = 20
#: The longest value quoted in a violation's description.
VALUE_CHARS = 100
#: ParseDict's default nesting limit for messages.
MAX_DEPTH = 100
#: The largest finite float32 (json_format refuses JSON numbers beyond it for a float field).
FLOAT32_MAX = float(np.finfo(np.float32).max)

_CPP = FieldDescriptor
#: An integer written as a string: ASCII digits, a minus sign for a negative one.
_DIGITS = re.compile(r"-?[0-9]+")
_INT_RANGES = {
    _CPP.CPPTYPE_INT32: ("int32", -(2**31), 2**31 - 1),
    _CPP.CPPTYPE_INT64: ("int64", -(2**63), 2**63 - 1),
    _CPP.CPPTYPE_UINT32: ("uint32", 0, 2**32 - 1),
    _CPP.CPPTYPE_UINT64: ("uint64", 0, 2**64 - 1),
}
_FLOAT_NAMES = {_CPP.CPPTYPE_FLOAT: "float", _CPP.CPPTYPE_DOUBLE: "double"}
_FLOAT_WORDS = ("NaN", "Infinity", "-Infinity")
_UNPAIRED_SURROGATE = re.compile("[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]")
_EXTENSION_NAME = re.compile(r"\[[a-zA-Z0-9\._]*\]$")
_WRAPPERS_FILE = "google/protobuf/wrappers.proto"
#: Well-known types json_format parses from a string (``FromJsonString``).
_STRING_TYPES = ("google.protobuf.Duration", "google.protobuf.Timestamp", "google.protobuf.FieldMask")


def json_violations(data: Any, descriptor: Descriptor, limit: int = MAX_VIOLATIONS) -> list[FieldViolation]:
    """What in ``data`` (parsed JSON) the message ``descriptor`` cannot hold: up to ``limit`` violations, in
    document order; empty when ParseDict should take it."""
    walk = _Walk(limit)
    walk.message(data, descriptor, "", 0)
    return walk.found


_PATH_TOKEN = re.compile(r"\[[^\]]*\]|[^.\[\]]+")


def respell(path: str, descriptor: Descriptor, body: bytes) -> str:
    """A field path in proto names (``top_k``, ``drawings[0].strokes.strokes[1].t_ms``), as the client spelled
    the fields in its JSON ``body``: by the proto name where the body uses it (as a key) and not the JSON name,
    otherwise by the JSON name (``topK``, ``tMs``), the JSON API's own spelling. A path that names no field (a
    header, the body) comes back as it is.

    Spellings are looked up in the body's bytes, so the large bodies parsed in worker processes are respelled
    the same way without parsing them again; a body that spells one field both ways gets the JSON name.
    """
    out: list[str] = []
    current: Descriptor | None = descriptor
    for token in _PATH_TOKEN.findall(path):
        if token.startswith("["):
            out.append(token)
            continue
        field = None
        if current is not None:
            field = current.fields_by_name.get(token) or next(
                (f for f in current.fields if f.json_name == token), None)  # fmt: skip
        if field is None:
            out.append(("." if out else "") + token)
            current = None
            continue
        name = field.json_name
        if field.name != field.json_name:
            proto_key, json_key = f'"{field.name}"'.encode(), f'"{field.json_name}"'.encode()
            if proto_key in body and json_key not in body:
                name = field.name
        out.append(("." if out else "") + name)
        current = field.message_type if field.cpp_type == _CPP.CPPTYPE_MESSAGE else None
    return "".join(out) if out else path


def found(value: Any) -> str:
    """A JSON value as a description quotes it: its kind and, clipped to ``VALUE_CHARS``, the value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        digits = len(str(abs(value))) if abs(value).bit_length() < 14_000 else None
        return f"{value}" if digits is not None and digits <= VALUE_CHARS else f"a {digits or 'huge'}-digit integer"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN (not JSON: write the string \"NaN\")"
        if math.isinf(value):
            return "a number too large for a double"
        return repr(value)
    if isinstance(value, str):
        return f"the string {_clip(json.dumps(value, ensure_ascii=False))}"
    if isinstance(value, list):
        return f"an array of {len(value)} item{'' if len(value) == 1 else 's'}"
    if isinstance(value, dict):
        keys = ", ".join(json.dumps(k, ensure_ascii=False) for k in itertools.islice(value, 8))
        return f"an object with keys {_clip(keys)}" if value else "an empty object"
    return type(value).__name__


def kind(value: Any) -> str:
    """A JSON value's kind in JSON terms: "a string", "a number", "an array", "an object", "a boolean", "null"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _placeholder(field: FieldDescriptor) -> str:
    """A field's value in an example object: a short JSON value, or a ``<...>`` hint."""
    if field.is_repeated and not (field.type == _CPP.TYPE_MESSAGE and field.message_type.GetOptions().map_entry):
        return "[...]"
    cpp = field.cpp_type
    if cpp == _CPP.CPPTYPE_MESSAGE:
        return "{...}"
    if field.type == _CPP.TYPE_BYTES:
        return '"<base64>"'
    if cpp == _CPP.CPPTYPE_STRING:
        return '"<text>"'
    if cpp == _CPP.CPPTYPE_BOOL:
        return "true"
    if cpp == _CPP.CPPTYPE_ENUM:
        values = [v.name for v in field.enum_type.values if v.number != 0] or [field.enum_type.values[0].name]
        return json.dumps(values[0])
    if cpp in _FLOAT_NAMES:
        return "1.5"
    return "1"


def example(descriptor: Descriptor, most: int = 3) -> str:
    """What a message looks like in JSON, for a description: ``an object like {"data": "<base64>"}``, or, for a
    message that is one oneof, ``an object with one of the keys "bitmap", "image", "strokes"``."""
    fields = list(descriptor.fields)
    oneofs = descriptor.oneofs
    if len(oneofs) == 1 and fields and all(f.containing_oneof is oneofs[0] for f in fields):
        keys = ", ".join(json.dumps(f.json_name) for f in fields)
        return f"an object with one of the keys {keys}"
    if not fields:
        return "an object"
    items = [f"{json.dumps(f.json_name)}: {_placeholder(f)}" for f in fields[:most]]
    return "an object like {" + ", ".join(items) + (", ..." if len(fields) > most else "") + "}"


def _clip(text: str) -> str:
    return text if len(text) <= VALUE_CHARS else text[: VALUE_CHARS - 3] + "..."


def _items(field: FieldDescriptor) -> str:
    """What a repeated field's items are, in JSON terms (``objects like {...}``, ``numbers``)."""
    cpp = field.cpp_type
    if cpp == _CPP.CPPTYPE_MESSAGE:
        return example(field.message_type).replace("an object", "objects", 1)
    if field.type == _CPP.TYPE_BYTES:
        return "base64 strings"
    if cpp == _CPP.CPPTYPE_STRING:
        return "strings"
    if cpp == _CPP.CPPTYPE_BOOL:
        return "booleans"
    if cpp == _CPP.CPPTYPE_ENUM:
        return "enum names"
    return "numbers"


def _got(value: Any) -> str:
    """What a wrong JSON value is, in JSON terms: its kind, and its keys, length or value where that helps."""
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return found(value)
    if isinstance(value, list):
        return found(value)
    return f"{kind(value)} ({found(value)})" if value is not None and not isinstance(value, bool) else found(value)


def _key_path(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Walk:
    """One walk's violations, and the bound on them."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.found: list[FieldViolation] = []

    @property
    def full(self) -> bool:
        """Whether the walk has found as many violations as it reports."""
        return len(self.found) >= self.limit

    def add(self, path: str, description: str) -> None:
        """Record a violation (past the bound, nothing)."""
        if not self.full:
            self.found.append(FieldViolation(path, description))

    def message(self, value: Any, descriptor: Descriptor, path: str, depth: int) -> None:
        """A JSON value for a message field (or the request): an object of its fields, or a well-known type."""
        if depth >= MAX_DEPTH:
            self.add(path, f"nests messages more than {MAX_DEPTH} deep")
            return
        name = descriptor.full_name
        if descriptor.file.name == _WRAPPERS_FILE:
            self.scalar(value, descriptor.fields_by_name["value"], path)
        elif name == "google.protobuf.Value":
            if isinstance(value, dict):
                self.message(value, descriptor.fields_by_name["struct_value"].message_type, path, depth + 1)
            elif isinstance(value, list):
                self.message(value, descriptor.fields_by_name["list_value"].message_type, path, depth + 1)
        elif name == "google.protobuf.Struct":
            if not isinstance(value, dict):
                self.add(path, f"must be a JSON object (a {name}), got {found(value)}")
                return
            for key, item in value.items():
                self.message(item, descriptor.fields_by_name["fields"].message_type.fields_by_name["value"]
                             .message_type, _key_path(path, key), depth + 1)  # fmt: skip
        elif name == "google.protobuf.ListValue":
            if not isinstance(value, list):
                self.add(path, f"must be a JSON array (a {name}), got {found(value)}")
                return
            for index, item in enumerate(value):
                self.message(item, descriptor.fields_by_name["values"].message_type, f"{path}[{index}]", depth + 1)
        elif name in _STRING_TYPES:
            if not isinstance(value, str):
                self.add(path, f"must be a JSON string (a {name}), got {found(value)}")
        elif name == "google.protobuf.Any":
            return  # its type comes from the value's "@type": left to ParseDict
        elif isinstance(value, dict):
            self.fields(value, descriptor, path, depth)
        elif not (isinstance(value, (list, str)) and not value):  # json_format takes [] and "" as no fields
            self.add(path, f"expected {example(descriptor)}, got {_got(value)}")

    def fields(self, js: dict[str, Any], descriptor: Descriptor, path: str, depth: int) -> None:
        """A JSON object's members, each checked against the field it names."""
        by_json = {f.json_name: f for f in descriptor.fields}
        oneofs: dict[str, str] = {}
        for key, value in js.items():
            if self.full:
                return
            field = by_json.get(key) or descriptor.fields_by_name.get(key)
            where = _key_path(path, key if len(key) <= VALUE_CHARS else _clip(key))
            if field is None:
                if descriptor.is_extendable and _EXTENSION_NAME.match(key):
                    continue  # an extension: ParseDict looks it up
                names = ", ".join(f.json_name for f in descriptor.fields)
                self.add(where, f"is not a field of {descriptor.full_name} (its fields: {_clip(names)})")
                continue
            oneof = field.containing_oneof
            if oneof is not None and value is not None:
                if oneof.name in oneofs:
                    self.add(where, f"is a second field of the oneof {oneof.name} of {descriptor.full_name} "
                             f"({oneofs[oneof.name]} is set too); set only one")  # fmt: skip
                    continue
                oneofs[oneof.name] = key
            if value is None:
                continue  # null: the field's default
            self.field(value, field, where, depth)

    def field(self, value: Any, field: FieldDescriptor, path: str, depth: int) -> None:
        """A field's (non-null) JSON value: a map, a repeated field, a message or a scalar."""
        if field.type == _CPP.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            self.map(value, field, path, depth)
        elif field.is_repeated:
            if not isinstance(value, list):
                self.add(path, f"expected an array of {_items(field)}, got {_got(value)}")
                return
            indices: Iterable[int] = range(len(value))
            if field.cpp_type in _FLOAT_NAMES:
                indices = _float_suspects(value, field)
            for index in indices:
                if self.full:
                    return
                item, where = value[index], f"{path}[{index}]"
                if item is None and (field.cpp_type != _CPP.CPPTYPE_MESSAGE
                                     or field.message_type.full_name != "google.protobuf.Value"):
                    self.add(where, "must not be null (an element of a repeated field)")
                elif field.cpp_type == _CPP.CPPTYPE_MESSAGE:
                    self.message(item, field.message_type, where, depth + 1)
                else:
                    self.scalar(item, field, where)
        elif field.cpp_type == _CPP.CPPTYPE_MESSAGE:
            self.message(value, field.message_type, path, depth + 1)
        else:
            self.scalar(value, field, path)

    def map(self, value: Any, field: FieldDescriptor, path: str, depth: int) -> None:
        """A map field: a JSON object whose keys are the key type as strings."""
        if not isinstance(value, dict):
            self.add(path, f"must be a JSON object (a map), got {found(value)}")
            return
        key_field = field.message_type.fields_by_name["key"]
        value_field = field.message_type.fields_by_name["value"]
        for key, item in value.items():
            if self.full:
                return
            where = f"{path}[{_clip(key)}]"
            if key_field.cpp_type == _CPP.CPPTYPE_BOOL:
                problem = None if key in ("true", "false") else f'expected the key "true" or "false", got {found(key)}'
            else:
                problem = scalar_problem(key, key_field)
            if problem is not None:
                self.add(where, f"is not a valid map key: {problem}")
            elif value_field.cpp_type == _CPP.CPPTYPE_MESSAGE:
                self.message(item, value_field.message_type, where, depth + 1)
            else:
                self.scalar(item, value_field, where)

    def scalar(self, value: Any, field: FieldDescriptor, path: str) -> None:
        """A scalar field's JSON value (null is refused here: only a map value or a wrapper's can be)."""
        problem = scalar_problem(value, field)
        if problem is not None:
            self.add(path, problem)


def _float_suspects(values: list[Any], field: FieldDescriptor) -> list[int]:
    """The indices of an array for a float (double) field that are not plain JSON numbers the field takes,
    found at C speed where they are numbers, so that a long array is not walked value by value."""
    numbers = [i for i, v in enumerate(values) if type(v) is int or type(v) is float]
    others = [] if len(numbers) == len(values) else sorted(set(range(len(values))).difference(numbers))
    try:
        array = np.asarray([values[i] for i in numbers] if others else values, dtype=np.float64)
    except OverflowError:  # an integer beyond a double: walk them all
        return list(range(len(values)))
    bound = FLOAT32_MAX if field.cpp_type == _CPP.CPPTYPE_FLOAT else math.inf
    with np.errstate(invalid="ignore"):
        bad = np.flatnonzero(~(np.abs(array) <= bound) | ~np.isfinite(array))
    if not bad.size:
        return others
    return sorted(others + [numbers[i] for i in bad.tolist()])


def scalar_problem(value: Any, field: FieldDescriptor) -> str | None:
    """Why json_format would refuse ``value`` (not null) for the scalar ``field``, or None if it takes it."""
    cpp = field.cpp_type
    if cpp in _INT_RANGES:
        return _integer_problem(value, *_INT_RANGES[cpp])
    if cpp in _FLOAT_NAMES:
        return _float_problem(value, _FLOAT_NAMES[cpp])
    if cpp == _CPP.CPPTYPE_BOOL:
        return None if isinstance(value, bool) else f"expected true or false (a bool), got {found(value)}"
    if cpp == _CPP.CPPTYPE_ENUM:
        return _enum_problem(value, field)
    if field.type == _CPP.TYPE_BYTES:
        return _bytes_problem(value)
    if not isinstance(value, str):
        return f"expected a JSON string, got {found(value)}"
    if _UNPAIRED_SURROGATE.search(value):
        return f"is not valid Unicode (an unpaired surrogate) in {found(value)}"
    return None


def _integer_problem(value: Any, kind: str, low: int, high: int) -> str | None:
    """As json_format's ``_ConvertInteger`` and the range check on setting the field."""
    expected = f"expected an integer ({kind}: a JSON number or a string of digits), got {found(value)}"
    if isinstance(value, bool):
        return expected
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return f"is out of range for {kind} ({low}..{high}), got {found(value)}"
        if not value.is_integer():
            return expected
        number = int(value)
    elif isinstance(value, int):
        number = value
    elif isinstance(value, str):
        # Stricter than json_format, which reads the string with Python's int(): "+1", "1_0" and "\u0661" (an
        # Arabic-Indic one) would be 1, 10 and 1. A string is ASCII digits, with a minus sign for a negative
        # number, as the one version parser reads a version at every door (service/core/versions.py).
        if _DIGITS.fullmatch(value) is None:
            try:
                as_float = float(value) if value.isascii() and " " not in value and "_" not in value else math.nan
            except ValueError:
                return expected
            if (math.isinf(as_float) and value.lstrip("+-").lower() in ("inf", "infinity")) or math.isnan(as_float):
                return expected
            if math.isinf(as_float):
                return f"is out of range for {kind} ({low}..{high}), got {found(value)}"
            return expected
        number = int(value)
    else:
        return expected
    if not low <= number <= high:
        return f"is out of range for {kind} ({low}..{high}), got {found(value)}"
    return None


def _float_problem(value: Any, kind: str) -> str | None:
    """As json_format's ``_ConvertFloat``: finite JSON numbers (within float32 for a float), or what
    ``float()`` takes ("1.5", "NaN", "Infinity"), but not "nan"."""
    expected = f'expected a {kind} (a JSON number, or a string such as "1.5", "NaN" or "Infinity"), got {found(value)}'
    if isinstance(value, float):
        if math.isnan(value):
            return f"expected a {kind}, got {found(value)}"
        if math.isinf(value) or (kind == "float" and abs(value) > FLOAT32_MAX):
            most = f" (at most {FLOAT32_MAX:.9g} in magnitude)" if kind == "float" else ""
            return (f"is out of range for a {kind}{most}, got {found(value)}; the strings \"Infinity\" and "
                    '"-Infinity" are the infinities')  # fmt: skip
        return None
    if value == "nan":
        return expected
    try:
        float(value)
    except OverflowError:
        return f"is out of range for a {kind}, got {found(value)}"
    except (TypeError, ValueError):
        return None if value in _FLOAT_WORDS else expected
    return None


def _enum_problem(value: Any, field: FieldDescriptor) -> str | None:
    """As json_format: a value's name, or a number (``int()`` of it) that an open enum takes as an int32."""
    enum = field.enum_type
    names = ", ".join(v.name for v in enum.values[:12]) + (", ..." if len(enum.values) > 12 else "")
    expected = f"expected a value of the enum {enum.full_name} ({names}, or its number), got {found(value)}"
    if isinstance(value, (list, dict)):
        return expected
    if isinstance(value, str) and value in enum.values_by_name:
        return None
    try:
        number = int(value)
    except ValueError:
        return expected
    except OverflowError:
        return f"is out of range for the enum {enum.full_name} (an int32), got {found(value)}"
    if enum.is_closed and number not in enum.values_by_number:
        return expected
    if not -(2**31) <= number < 2**31:
        return f"is out of range for the enum {enum.full_name} (an int32), got {found(value)}"
    return None


def _bytes_problem(value: Any) -> str | None:
    """As json_format: base64 in either alphabet, padding optional (what ``urlsafe_b64decode`` takes once
    padded)."""
    if not isinstance(value, str):
        return f"expected base64 bytes (a JSON string), got {found(value)}"
    try:
        encoded = value.encode("utf-8")
        base64.urlsafe_b64decode(encoded + b"=" * (4 - len(encoded) % 4))
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        return f"expected base64 bytes (standard or URL-safe, padding optional), got {found(value)}: {exc}"
    return None
