"""The JSON API's OpenAPI 3.1 document, generated from the ``quickdraw.v1`` protobuf descriptors.

Nothing here is written by hand but the routes: every schema is walked from the messages' descriptors with
protobuf's JSON mapping, as ``json_format`` (and so the gateway) reads and writes them: lowerCamelCase JSON names
(``topK``; the proto names are accepted too, and the schemas allow other properties for that reason), enums by
name, ``bytes`` as base64 strings, 64-bit integers as strings (numbers accepted), floats as numbers or the strings
"NaN", "Infinity" and "-Infinity", repeated fields as arrays, maps as objects, and a message whose fields are one
``oneof`` as "exactly one of these properties". A change to ``protos/quickdraw/v1/classifier.proto`` (after
``make protos``) changes the document with it. The gateway serves it at ``GET /openapi.json``
(``service.frontends.http.server``); ``tests/test_openapi.py`` validates it with ``openapi-spec-validator`` and sends a
request
built from it.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.rpc import error_details_pb2

from quickdraw_client.v1 import classifier_pb2 as pb

#: The document's version of the API (the proto package's version).
API_VERSION = "v1"
#: The header the JSON API reads a call's deadline from (seconds); ``service.frontends.http.server.TIMEOUT_HEADER`` is
#: the same.
TIMEOUT_HEADER = "X-Server-Timeout"
_F = FieldDescriptor
_INT32 = {_F.CPPTYPE_INT32: ("int32", -(2**31), 2**31 - 1), _F.CPPTYPE_UINT32: ("uint32", 0, 2**32 - 1)}
_INT64 = {_F.CPPTYPE_INT64: "int64", _F.CPPTYPE_UINT64: "uint64"}
_FLOAT_WORDS = ["NaN", "Infinity", "-Infinity"]


def schema_name(descriptor: Descriptor | EnumDescriptor) -> str:
    """A component name for a message or enum: its full name (``quickdraw.v1.ClassifyRequest``)."""
    return descriptor.full_name


def _ref(descriptor: Descriptor | EnumDescriptor) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{schema_name(descriptor)}"}


class _Schemas:
    """The schemas of every message and enum reachable from the roots, built once each."""

    def __init__(self) -> None:
        self.schemas: dict[str, dict[str, Any]] = {}

    def message(self, descriptor: Descriptor) -> dict[str, Any]:
        """A ``$ref`` to the message's schema, building it (and what it refers to) the first time."""
        name = schema_name(descriptor)
        if name not in self.schemas:
            self.schemas[name] = {}  # placeholder first: messages may refer to themselves
            self.schemas[name] = self._message_schema(descriptor)
        return _ref(descriptor)

    def enum(self, descriptor: EnumDescriptor) -> dict[str, Any]:
        """A ``$ref`` to the enum's schema: its value names (numbers are accepted on input too)."""
        name = schema_name(descriptor)
        if name not in self.schemas:
            self.schemas[name] = {
                "type": "string",
                "enum": [v.name for v in descriptor.values],
                "description": f"the enum {descriptor.full_name}, by value name (a value's number is accepted too)",
            }
        return _ref(descriptor)

    def _message_schema(self, descriptor: Descriptor) -> dict[str, Any]:
        properties = {f.json_name: self.field(f) for f in descriptor.fields}
        schema: dict[str, Any] = {
            "type": "object",
            "description": f"the message {descriptor.full_name} in protobuf's JSON mapping (field names in "
            "lowerCamelCase; the proto names are accepted too)",
            "properties": properties,
        }
        fields = list(descriptor.fields)
        for oneof in descriptor.oneofs:
            members = [f.json_name for f in oneof.fields]
            whole = bool(fields) and len(members) == len(fields)  # the message is this oneof: one member is set
            if whole:
                schema["oneOf"] = [{"required": [m]} for m in members]
            how = "exactly" if whole else "at most"
            schema["description"] += f"; {how} one of {', '.join(members)} (the oneof {oneof.name})"
        return schema

    def field(self, field: FieldDescriptor) -> dict[str, Any]:
        """A field's schema: a map, an array of its type, or its type."""
        if field.type == _F.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            value = field.message_type.fields_by_name["value"]
            return {"type": "object", "additionalProperties": self.single(value)}
        if field.is_repeated:
            return {"type": "array", "items": self.single(field)}
        return self.single(field)

    def single(self, field: FieldDescriptor) -> dict[str, Any]:
        """One value of a field, by the JSON mapping of its type."""
        cpp = field.cpp_type
        if cpp == _F.CPPTYPE_MESSAGE:
            return self.message(field.message_type)
        if cpp == _F.CPPTYPE_ENUM:
            return self.enum(field.enum_type)
        if field.type == _F.TYPE_BYTES:
            return {"type": "string", "contentEncoding": "base64", "format": "byte"}
        if cpp == _F.CPPTYPE_STRING:
            return {"type": "string"}
        if cpp == _F.CPPTYPE_BOOL:
            return {"type": "boolean"}
        if cpp in _INT32:
            fmt, low, high = _INT32[cpp]
            return {"type": "integer", "format": fmt, "minimum": low, "maximum": high}
        if cpp in _INT64:
            return {"type": ["string", "integer"], "format": _INT64[cpp],
                    "description": "a 64-bit integer: written as a string, read from a string or a number"}  # fmt: skip
        kind = "float" if cpp == _F.CPPTYPE_FLOAT else "double"
        return {"oneOf": [{"type": "number", "format": kind}, {"type": "string", "enum": _FLOAT_WORDS}]}


def _error_schema(schemas: _Schemas) -> dict[str, Any]:
    """The JSON error body: the gRPC status, with the HTTP status and the code's name."""
    bad_request = schemas.message(error_details_pb2.BadRequest.DESCRIPTOR)
    detail = {"allOf": [{"type": "object", "properties": {"@type": {"type": "string"}}, "required": ["@type"]},
                        bad_request]}  # fmt: skip
    return {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "status", "message"],
                "properties": {
                    "code": {"type": "integer", "description": "the HTTP status"},
                    "status": {"type": "string", "description": "the gRPC status code's name (INVALID_ARGUMENT)"},
                    "message": {"type": "string"},
                    "details": {
                        "type": "array",
                        "description": "google.rpc.Status details: a google.rpc.BadRequest "
                        "(@type type.googleapis.com/google.rpc.BadRequest) listing every field violation",
                        "items": detail,
                    },
                },
            }
        },
    }


def document(server_url: str | None = None, bearer: bool = False) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the JSON API (``server_url``: the gateway's base URL, if known; ``bearer``: the
    API routes need a bearer token)."""
    schemas = _Schemas()
    classify_request = schemas.message(pb.ClassifyRequest.DESCRIPTOR)
    bitmap = schemas.message(pb.Bitmap.DESCRIPTOR)
    classify_response = {
        "allOf": [
            schemas.message(pb.ClassifyResponse.DESCRIPTOR),
            {"type": "object", "properties": {"bitmaps": {
                "type": "array", "items": bitmap,
                "description": "with ?bitmaps=true: for each drawing, the 28x28 image the model was given"}}},
        ]
    }  # fmt: skip
    model_info = schemas.message(pb.ModelInfo.DESCRIPTOR)
    schemas.schemas["Error"] = _error_schema(schemas)
    error = {"description": "an error: the gRPC status as JSON, with the HTTP status its code maps to",
             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}  # fmt: skip

    def json_answer(description: str, schema: dict[str, Any]) -> dict[str, Any]:
        return {"description": description, "content": {"application/json": {"schema": schema}}}

    service = pb.DESCRIPTOR.services_by_name["Classifier"]
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "Quick, Draw! classifier: JSON API",
            "version": API_VERSION,
            "description": f"The gRPC service {service.full_name} in protobuf's JSON mapping, generated from its "
            "descriptors. Errors carry the gRPC status (code name, message, google.rpc.BadRequest field "
            "violations) with the HTTP status its code maps to.",
        },
        "paths": {
            "/v1/classify": {
                "post": {
                    "operationId": "Classify",
                    "summary": f"{service.methods_by_name['Classify'].full_name}: classify 1..N drawings",
                    "parameters": [
                        {"name": "bitmaps", "in": "query", "required": False, "schema": {"type": "boolean"},
                         "description": "add bitmaps: the 28x28 image the model was given, per drawing"},
                        {"name": TIMEOUT_HEADER, "in": "header", "required": False,
                         "schema": {"type": "number", "exclusiveMinimum": 0},
                         "description": "the call's deadline, in seconds"},
                    ],
                    "requestBody": {"required": True, "content": {"application/json": {"schema": classify_request}}},
                    "responses": {"200": json_answer("the predictions, one per drawing", classify_response),
                                  "default": error},
                }
            },
            "/v1/model": {
                "get": {
                    "operationId": "GetModelInfo",
                    "summary": f"{service.methods_by_name['GetModelInfo'].full_name}: the served model and the limits",
                    "responses": {"200": json_answer("the model", model_info), "default": error},
                }
            },
        },
        "components": {"schemas": dict(sorted(schemas.schemas.items()))},
    }
    if server_url:
        doc["servers"] = [{"url": server_url}]
    if bearer:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc
