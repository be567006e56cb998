"""``GET /openapi.json``: the JSON API's OpenAPI document validates, matches the proto descriptors, and a request
built from it (paths, property names and types read from the document) succeeds against a live gateway.

Runtime: about 5 s (one in-process gateway with the shipped model).
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from harness import RunningGateway

from quickdraw_client.v1 import classifier_pb2 as pb

openapi_spec_validator = pytest.importorskip(
    "openapi_spec_validator", reason="openapi-spec-validator is not installed (the dev extra: pip install -e '.[dev]')"
)
jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed (openapi-spec-validator needs it)")


@pytest.fixture(scope="module")
def gateway() -> Iterator[RunningGateway]:
    with RunningGateway() as gw:
        yield gw


def fetch(gw: RunningGateway, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{gw.app.http_port}{path}", data=data,
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def document(gateway: RunningGateway) -> dict[str, Any]:
    status, doc = fetch(gateway, "/openapi.json")
    assert status == 200
    return doc  # type: ignore[no-any-return]


def schema_validator(doc: dict[str, Any], schema: dict[str, Any]) -> Any:
    """A JSON Schema validator for ``schema`` whose ``#/components/...`` references resolve in ``doc``."""
    return jsonschema.Draft202012Validator({**schema, "components": doc["components"]})


def resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def operation(doc: dict[str, Any], operation_id: str) -> tuple[str, str, dict[str, Any]]:
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if op.get("operationId") == operation_id:
                return path, method, op
    raise AssertionError(f"no operation {operation_id}")


def test_the_document_validates(document: dict[str, Any]) -> None:
    openapi_spec_validator.validate(document)
    assert document["openapi"].startswith("3.")


def test_every_message_schema_is_its_descriptor_in_json_names(document: dict[str, Any]) -> None:
    """Generated, not hand-written: each quickdraw.v1 message's properties are its fields' JSON names."""
    schemas = document["components"]["schemas"]
    messages = [m for m in pb.DESCRIPTOR.message_types_by_name.values()
                if f"quickdraw.v1.{m.name}" in schemas]  # fmt: skip
    assert {"ClassifyRequest", "ClassifyResponse", "ModelInfo", "Drawing", "Stroke"} <= {m.name for m in messages}
    for message in messages:
        props = schemas[message.full_name]["properties"]
        assert list(props) == [f.json_name for f in message.fields], message.full_name
    assert "topK" in schemas["quickdraw.v1.ClassifyRequest"]["properties"]
    assert schemas["quickdraw.v1.Strokes.Coordinates"]["enum"] == ["COORDINATES_UNSPECIFIED", "SIMPLIFIED", "RAW"]


def value_for(doc: dict[str, Any], schema: dict[str, Any], pixels: bytes) -> Any:
    """A value the schema describes, filled in from it: objects take their required member (the first of a
    oneOf), else every property whose schema is not an object; base64 strings carry ``pixels``."""
    schema = resolve(doc, schema)
    if schema.get("type") == "object":
        props = schema.get("properties", {})
        if "oneOf" in schema:
            names = schema["oneOf"][0]["required"]
        else:
            names = [n for n, s in props.items() if resolve(doc, s).get("type") != "object"]
        return {n: value_for(doc, props[n], pixels) for n in names}
    if schema.get("type") == "array":
        return [value_for(doc, schema["items"], pixels)]
    if schema.get("contentEncoding") == "base64":
        return base64.b64encode(pixels).decode()
    if schema.get("type") == "integer":
        return 3
    raise AssertionError(f"no value for {schema}")


def test_a_request_built_from_the_document_succeeds(
    gateway: RunningGateway, document: dict[str, Any], sample: Path
) -> None:
    path, method, op = operation(document, "Classify")
    assert method == "post"
    request_schema = op["requestBody"]["content"]["application/json"]["schema"]
    cat = np.load(sample / "numpy_bitmap" / "cat.npy", mmap_mode="r")[0]
    body = value_for(document, request_schema, cat.tobytes())
    assert set(body) == {"drawings", "topK"} and set(body["drawings"][0]) == {"bitmap"}  # read from the document
    schema_validator(document, request_schema).validate(body)

    status, answer = fetch(gateway, path, body)
    assert status == 200, answer
    schema_validator(document, op["responses"]["200"]["content"]["application/json"]["schema"]).validate(answer)
    [prediction] = answer["predictions"]
    assert len(prediction["top"]) == 3 and prediction["top"][0]["label"] == "cat"

    # what the document says is wrong, the gateway refuses, with an error body of the documented shape
    bad = {"drawings": [{"image": "not an object"}]}
    assert not schema_validator(document, request_schema).is_valid(bad)
    status, answer = fetch(gateway, path, bad)
    assert status == 400
    error_schema = op["responses"]["default"]["content"]["application/json"]["schema"]
    schema_validator(document, error_schema).validate(answer)

    path, method, op = operation(document, "GetModelInfo")
    status, info = fetch(gateway, path)
    assert method == "get" and status == 200
    schema_validator(document, op["responses"]["200"]["content"]["application/json"]["schema"]).validate(info)


def test_the_document_marks_the_bearer_token_when_one_is_required() -> None:
    from service.frontends.http.openapi import document

    assert "security" not in document()
    doc = document(bearer=True)
    openapi_spec_validator.validate(doc)
    assert doc["security"] == [{"bearer": []}] and doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
