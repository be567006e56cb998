"""The JSON API on the HTTP port: the same answers, errors and metrics as gRPC, through the same gateway.

Each check calls both transports where it can: probabilities and field violations must be identical. Also the
HTTP status of each error kind, JSON parse errors as field violations, the 28x28 bitmaps the model saw, the
deadline header, UNAVAILABLE while the model loads, the page and its files, and ``http_api=False``.
"""

from __future__ import annotations

import base64
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import json_format
from grpc_status import rpc_status
from harness import SHIPPED_MODEL, RunningGateway

from doodle import Drawing, drawing_to_bitmap, strokes_from_google
from doodle.formats import read_ndjson
from quickdraw_client.v1 import classifier_pb2 as pb
from service.backends import find_versions
from service.backends.embedded import EmbeddedBackend
from service.client import QuickDrawClient
from service.frontends.http.jsonwalk import respell
from service.settings import Settings

pytestmark = pytest.mark.skipif(not find_versions(SHIPPED_MODEL), reason=f"no SavedModel under {SHIPPED_MODEL}")


@pytest.fixture(scope="module")
def gateway() -> Iterator[RunningGateway]:
    with RunningGateway(warmup=False) as gw:
        yield gw


@pytest.fixture(scope="module")
def client(gateway: RunningGateway) -> Iterator[QuickDrawClient]:
    with QuickDrawClient(gateway.target, timeout_s=30) as c:
        yield c


def call(gw: RunningGateway, path: str, body: Any = None, headers: dict[str, str] | None = None,
         ) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(HTTP status, JSON body, headers) of a GET (no body) or POST (a dict as JSON, or raw bytes)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{gw.app.http_port}{path}", data=data,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), dict(err.headers)


def violations(body: dict[str, Any]) -> list[tuple[str, str]]:
    [detail] = body["error"]["details"]
    assert detail["@type"] == "type.googleapis.com/google.rpc.BadRequest"
    return [(v.get("field", ""), v["description"]) for v in detail["fieldViolations"]]  # proto3 JSON omits ""


def grpc_violations(client: QuickDrawClient, request: pb.ClassifyRequest) -> tuple[grpc.StatusCode, list[Any]]:
    from google.rpc import error_details_pb2

    with pytest.raises(grpc.RpcError) as info:
        client.classify_request(request)
    status = rpc_status.from_call(info.value)
    out = []
    for detail in status.details if status else []:
        bad = error_details_pb2.BadRequest()
        detail.Unpack(bad)
        out.extend((v.field, v.description) for v in bad.field_violations)
    return info.value.code(), out


def simplified(sample: Path, word: str, n: int) -> list[list[list[list[int]]]]:
    out = []
    for d in read_ndjson(sample / "simplified" / f"{word}.ndjson"):
        out.append(d.google_strokes())
        if len(out) == n:
            break
    return out


def strokes_json(drawing: list[list[list[float]]], raw: bool = False) -> dict[str, Any]:
    return {"strokes": {"coordinates": "RAW" if raw else "SIMPLIFIED",
                        "strokes": [{"x": s[0], "y": s[1]} for s in drawing]}}


def test_classify_answers_as_grpc_does(gateway: RunningGateway, client: QuickDrawClient, sample: Path) -> None:
    cats = simplified(sample, "cat", 5)
    request = {"drawings": [strokes_json(d) for d in cats], "topK": 5}
    status, body, headers = call(gateway, "/v1/classify", request)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    expected = client.classify_request(json_format.ParseDict(request, pb.ClassifyRequest()))
    assert json_format.ParseDict(body, pb.ClassifyResponse()) == expected
    assert body["modelName"] == "quickdraw" and body["modelVersion"] == str(find_versions(SHIPPED_MODEL)[-1])
    assert [p["top"][0]["label"] for p in body["predictions"]].count("cat") >= 4
    assert all(set(s) == {"label", "score", "index"} for p in body["predictions"] for s in p["top"])
    assert "bitmaps" not in body


def test_bitmaps_are_what_the_shared_library_renders(gateway: RunningGateway, sample: Path) -> None:
    cats = simplified(sample, "cat", 2)
    raw = [[[x * 3.7 + 120 for x in s[0]], [y * 3.7 - 40 for y in s[1]]] for s in cats[1]]
    request = {"drawings": [strokes_json(cats[0]), strokes_json(raw, raw=True)]}
    status, body, _ = call(gateway, "/v1/classify?bitmaps=true", request)
    assert status == 200 and len(body["bitmaps"]) == 2
    for got, drawing, is_raw in zip(body["bitmaps"], (cats[0], raw), (False, True), strict=True):
        pixels = np.frombuffer(base64.b64decode(got["pixels"]), np.uint8).reshape(28, 28)
        as_sent = [[np.asarray(axis, np.float32).tolist() for axis in s] for s in drawing]  # proto floats
        want = drawing_to_bitmap(Drawing(word="", strokes=strokes_from_google(as_sent), raw=is_raw))
        np.testing.assert_array_equal(pixels, want)


@pytest.mark.parametrize(
    "request_json",
    [
        {},
        {"drawings": [{}]},
        {"drawings": [{"bitmap": {"pixels": base64.b64encode(b"x" * 10).decode()}}]},
        {"drawings": [{"strokes": {"strokes": [{"x": [1, 300], "y": [1, 2]}]}}], "topK": 99},
        {"drawings": [{"strokes": {"strokes": [{"x": [1, 2], "y": [1]}, {"x": [], "y": []}]}}]},
        {"drawings": [{"image": {"data": ""}}]},
    ],
)
def test_validation_errors_carry_the_grpc_field_violations(
    gateway: RunningGateway, client: QuickDrawClient, request_json: dict[str, Any]
) -> None:
    status, body, _ = call(gateway, "/v1/classify", request_json)
    code, expected = grpc_violations(client, json_format.ParseDict(request_json, pb.ClassifyRequest()))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert status == 400 and body["error"]["status"] == "INVALID_ARGUMENT" and body["error"]["code"] == 400
    # the same violations, each field named as the JSON body spells it (topK, tMs: the JSON names here)
    spelled = [(respell(f, pb.ClassifyRequest.DESCRIPTOR, json.dumps(request_json).encode()), d) for f, d in expected]
    assert violations(body) == spelled and expected
    assert body["error"]["message"].startswith(spelled[0][0])


@pytest.mark.parametrize(
    ("raw", "field", "reason"),
    [
        (b"{nope", "", "is not valid JSON"),
        (b"[1, 2]", "", 'must be an object like {"drawings": [...], "topK": 1, "model": {...}} (a ClassifyRequest), '
         "got an array"),
        (b'{"drawings": [{"strokes": {"strokes": [{"x": ["a"], "y": [1]}]}}]}',
         "drawings[0].strokes.strokes[0].x[0]", 'expected a float (a JSON number, or a string such as "1.5", "NaN" '
         'or "Infinity"), got the string "a"'),
        (b'{"drawing": []}', "drawing", "is not a field of quickdraw.v1.ClassifyRequest"),
        (b'{"drawings": [{"strokes": {"coordinates": "POLAR"}}]}', "drawings[0].strokes.coordinates",
         'of the enum quickdraw.v1.Strokes.Coordinates (COORDINATES_UNSPECIFIED, SIMPLIFIED, RAW, or its number), '
         'got the string "POLAR"'),
        (b'{"topK": -1}', "topK", "is out of range for uint32 (0..4294967295), got -1"),
        (b"\xff\xfe", "", "is not valid JSON"),
    ],
)
def test_malformed_json_is_a_bad_request_naming_the_field(
    gateway: RunningGateway, raw: bytes, field: str, reason: str
) -> None:
    status, body, _ = call(gateway, "/v1/classify", raw)
    assert status == 400 and body["error"]["status"] == "INVALID_ARGUMENT"
    [(got_field, description)] = violations(body)
    assert got_field == field and reason in description


def test_error_kinds_map_to_http_statuses(gateway: RunningGateway, sample: Path) -> None:
    cat = strokes_json(simplified(sample, "cat", 1)[0])
    status, body, _ = call(gateway, "/v1/classify", {"drawings": [cat], "model": {"version": "99"}})
    assert (status, body["error"]["status"]) == (404, "NOT_FOUND") and "version 99 is not served" in body[
        "error"]["message"]
    status, body, _ = call(gateway, "/v1/classify", {"drawings": [cat]}, {"X-Server-Timeout": "soon"})
    assert status == 400 and violations(body) == [("X-Server-Timeout header", "is 'soon'; expected seconds > 0")]
    limit = gateway.app.settings.max_message_bytes * 4
    status, body, _ = call(gateway, "/v1/classify", b" " * (limit + 1))
    assert (status, body["error"]["status"]) == (413, "RESOURCE_EXHAUSTED") and str(limit) in body["error"]["message"]
    status, body, headers = call(gateway, "/v1/classify")  # GET
    assert (status, body["error"]["status"], headers.get("Allow")) == (405, "UNIMPLEMENTED", "POST")
    status, body, _ = call(gateway, "/v1/nothing-here")
    assert (status, body["error"]["status"]) == (404, "NOT_FOUND")


def test_model_info_as_grpc(gateway: RunningGateway, client: QuickDrawClient) -> None:
    status, body, _ = call(gateway, "/v1/model")
    assert status == 200
    assert json_format.ParseDict(body, pb.ModelInfo()) == client.model_info()
    assert len(body["labels"]) == 29 and "cat" in body["labels"] and body["backend"] == "embedded"


def test_metrics_count_http_calls_by_method_and_code(gateway: RunningGateway, sample: Path) -> None:
    before = gateway.scrape()
    call(gateway, "/v1/classify", {"drawings": [strokes_json(simplified(sample, "cat", 1)[0])]})
    call(gateway, "/v1/classify", {"drawings": []})
    call(gateway, "/v1/model")
    after = gateway.scrape()

    def grew(key: str) -> float:
        return after.get(key, 0) - before.get(key, 0)

    assert grew('quickdraw_request_duration_seconds_count{code="OK",method="http:Classify"}') == 1
    assert grew('quickdraw_request_duration_seconds_count{code="INVALID_ARGUMENT",method="http:Classify"}') == 1
    assert grew('quickdraw_request_duration_seconds_count{code="OK",method="http:GetModelInfo"}') == 1
    assert grew('quickdraw_drawings_total{kind="strokes"}') == 1
    assert grew("quickdraw_batch_size_drawings_count") >= 1


def test_page_and_files(gateway: RunningGateway) -> None:
    base = f"http://127.0.0.1:{gateway.app.http_port}"
    with urllib.request.urlopen(f"{base}/", timeout=10) as resp:
        page = resp.read().decode()
        assert resp.headers["Content-Type"].startswith("text/html")
        assert "default-src 'self'" in resp.headers["Content-Security-Policy"]
    assert 'src="static/playground.js"' in page and 'href="static/playground.css"' in page
    assert "http://" not in page and "https://" not in page  # nothing from a CDN
    for name in ("playground.js", "playground.css"):
        with urllib.request.urlopen(f"{base}/static/{name}", timeout=10) as resp:
            assert resp.status == 200 and "https://" not in resp.read().decode()
    for bad in ("/static/nothing.js", "/static/..%2Fhttp.py", "/static/%2E%2E/api.py"):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(base + bad, timeout=10)
        assert info.value.code == 404


class _HeldBackend(EmbeddedBackend):
    """The embedded backend, its loading and batches held until the test opens ``gate``."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings.model_dir, settings.model_name, max_batch_size=settings.max_batch_size,
                         concurrency=1, warmup=False)
        self.gate = threading.Event()

    def _load(self):  # type: ignore[no-untyped-def]
        self.gate.wait(60)
        return super()._load()

    def _run(self, images, version):  # type: ignore[no-untyped-def]
        self.gate.wait(60)
        return super()._run(images, version)


def test_unavailable_while_loading_then_deadline_header(sample: Path) -> None:
    made: list[_HeldBackend] = []

    def factory(settings: Settings) -> _HeldBackend:
        made.append(_HeldBackend(settings))
        return made[-1]

    cat = {"drawings": [strokes_json(simplified(sample, "cat", 1)[0])]}
    gw = RunningGateway(factory).start_async()
    try:
        while not gw.app.grpc_port or not made:
            threading.Event().wait(0.01)
        status, body, headers = call(gw, "/v1/classify", cat)
        assert (status, body["error"]["status"], headers.get("Retry-After")) == (503, "UNAVAILABLE", "1")
        assert call(gw, "/v1/model")[0] == 503
        assert "quickdraw_ready 0.0" in urllib.request.urlopen(
            f"http://127.0.0.1:{gw.app.http_port}/metrics", timeout=10).read().decode()  # /metrics while loading
        made[0].gate.set()
        gw.started.result(60)  # type: ignore[union-attr]
        made[0].gate.clear()  # hold the next batch
        held = threading.Thread(target=call, args=(gw, "/v1/classify", cat))
        held.start()
        while not gw.app.metrics.batches_in_flight:
            threading.Event().wait(0.01)
        status, body, _ = call(gw, "/v1/classify", cat, {"X-Server-Timeout": "0.2"})  # queued behind it
        assert (status, body["error"]["status"]) == (504, "DEADLINE_EXCEEDED")
        made[0].gate.set()
        held.join(30)
        assert call(gw, "/v1/classify", cat)[0] == 200
    finally:
        made[0].gate.set() if made else None
        gw.stop()


def test_api_and_page_can_be_turned_off() -> None:
    with RunningGateway(http_api=False, warmup=False) as gw:
        base = f"http://127.0.0.1:{gw.app.http_port}"
        for path in ("/", "/static/playground.js", "/v1/model"):
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(base + path, timeout=10)
            assert info.value.code == 404
        assert "quickdraw_ready 1.0" in urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()


def test_the_shape_count_takes_the_largest_valid_request_and_refuses_more() -> None:
    """The ``{``/``[`` count before json.loads never refuses a request within the limits."""
    from service.core.errors import InvalidArgument
    from service.frontends.http.jsonbody import check_shape
    from service.preprocess.validation import Limits

    limits = Limits(8, 20, 16, 8192, 1e6, 1024, 1024, num_classes=345)
    stroke = {"x": [1.0], "y": [2.0], "tMs": [3]}
    request = {"drawings": [{"strokes": {"strokes": [stroke] * 16, "coordinates": "RAW"}}] * 8,
               "model": {"version": 1}, "topK": 3}  # fmt: skip
    raw = json.dumps(request).encode()
    check_shape(raw, limits)
    json_format.Parse(raw, pb.ClassifyRequest())  # it is a real request
    request["drawings"] = request["drawings"] * 2
    with pytest.raises(InvalidArgument, match="max_drawings_per_request=8 and max_strokes=16"):
        check_shape(json.dumps(request).encode(), limits)


def test_connection_caps_fit_under_the_descriptor_limit() -> None:
    """With a limit of 1,024 descriptors both caps are lowered in proportion, leaving FD_RESERVE for the rest;
    with a generous limit they are the settings."""
    from service import app
    from service.settings import Settings

    s = Settings(max_grpc_connections=2000, max_http_connections=1000)
    grpc_cap, http_cap = app.connection_caps(s, 1024)
    assert grpc_cap + http_cap <= 1024 - app.FD_RESERVE and grpc_cap > http_cap > 0
    assert app.connection_caps(s, 1 << 20) == (2000, 1000)


# --- the JSON walk: field violations from the JSON and the descriptors, before ParseDict ------------------------

WALK_LIMITS_ARGS = (8, 20, 16, 8192, 1e6, 1024, 1024)


def _walk_refusal(raw: bytes) -> list[tuple[str, str]]:
    """The field violations parse_body gives a body (it must refuse it, and ParseDict must agree)."""
    from service.core.errors import InvalidArgument
    from service.frontends.http.jsonbody import parse_body
    from service.preprocess.validation import Limits

    with pytest.raises(InvalidArgument) as info:
        parse_body(raw, pb.ClassifyRequest(), 1 << 22, Limits(*WALK_LIMITS_ARGS, num_classes=345))
    with pytest.raises((json_format.ParseError, OverflowError)):
        json_format.Parse(raw, pb.ClassifyRequest())  # the walk refuses only what ParseDict refuses
    return [(v.field, v.description) for v in info.value.violations]


def _stroke(x: Any, y: Any = None) -> dict[str, Any]:
    return {"x": x, "y": [1] * len(x) if y is None and isinstance(x, list) else y}


def _drawings(*strokes: dict[str, Any]) -> dict[str, Any]:
    ok = {"strokes": {"strokes": [_stroke([1, 2])]}}
    return {"drawings": [ok, ok, {"strokes": {"strokes": list(strokes), "coordinates": "RAW"}}]}


@pytest.mark.parametrize(
    ("body", "field", "description"),
    [
        # unknown fields, at the top and deep down, by the name the JSON gives
        (b'{"drawing": []}', "drawing",
         "is not a field of quickdraw.v1.ClassifyRequest (its fields: drawings, topK, model)"),
        (json.dumps({"drawings": [{"strokes": {"strokes": [{"x": [1], "y": [1], "z": [1]}]}}]}).encode(),
         "drawings[0].strokes.strokes[0].z", "is not a field of quickdraw.v1.Stroke (its fields: x, y, tMs)"),
        # wrong types at depth
        (json.dumps(_drawings(_stroke([1, 2, 3, 4, 5, "six"]))).encode(), "drawings[2].strokes.strokes[0].x[5]",
         'expected a float (a JSON number, or a string such as "1.5", "NaN" or "Infinity"), got the string "six"'),
        (json.dumps(_drawings(_stroke([1, 2], [True, {}]))).encode(), "drawings[2].strokes.strokes[0].y[1]",
         'expected a float (a JSON number, or a string such as "1.5", "NaN" or "Infinity"), got an empty object'),
        (b'{"drawings": [{"strokes": [1]}]}', "drawings[0].strokes",
         'expected an object like {"strokes": [...], "coordinates": "SIMPLIFIED"}, got an array of 1 item'),
        (b'{"drawings": [{"image": {"data": 5}}]}', "drawings[0].image.data",
         "expected base64 bytes (a JSON string), got 5"),
        (b'{"top_k": "three"}', "top_k",
         'expected an integer (uint32: a JSON number or a string of digits), got the string "three"'),
        (b'{"topK": 2.5}', "topK", "expected an integer (uint32: a JSON number or a string of digits), got 2.5"),
        # a JSON array for each repeated field, and nothing else
        (b'{"drawings": {"a": 1}}', "drawings",
         'expected an array of objects with one of the keys "bitmap", "image", "strokes", got an object with keys '
         '"a"'),
        (b'{"drawings": [{"strokes": {"strokes": {"x": [1]}}}]}', "drawings[0].strokes.strokes",
         'expected an array of objects like {"x": [...], "y": [...], "tMs": [...]}, got an object with keys "x"'),
        (b'{"drawings": [{"strokes": {"strokes": [{"x": 1, "y": [1]}]}}]}', "drawings[0].strokes.strokes[0].x",
         "expected an array of numbers, got a number (1)"),
        # base64: either alphabet, padding optional; not a length that no base64 has
        (b'{"drawings": [{"bitmap": {"pixels": "AAAAA"}}]}', "drawings[0].bitmap.pixels",
         'expected base64 bytes (standard or URL-safe, padding optional), got the string "AAAAA": Invalid '
         "base64-encoded string: number of data characters (5) cannot be 1 more than a multiple of 4"),
        # enums by name or number
        (b'{"drawings": [{"strokes": {"coordinates": "POLAR"}}]}', "drawings[0].strokes.coordinates",
         "expected a value of the enum quickdraw.v1.Strokes.Coordinates (COORDINATES_UNSPECIFIED, SIMPLIFIED, RAW,"
         ' or its number), got the string "POLAR"'),
        (b'{"drawings": [{"strokes": {"coordinates": 2147483648}}]}', "drawings[0].strokes.coordinates",
         "is out of range for the enum quickdraw.v1.Strokes.Coordinates (an int32), got 2147483648"),
        # numbers that overflow: ParseDict's OverflowErrors, and its range checks
        (b'{"drawings": [{"strokes": {"strokes": [{"x": [1, 1' + b"0" * 400 + b'], "y": [1, 2]}]}}]}',
         "drawings[0].strokes.strokes[0].x[1]", "is out of range for a float, got a 401-digit integer"),
        (b'{"drawings": [{"strokes": {"strokes": [{"x": [1e400], "y": [1]}]}}]}',
         "drawings[0].strokes.strokes[0].x[0]", "is out of range for a float (at most 3.40282347e+38 in magnitude), "
         'got a number too large for a double; the strings "Infinity" and "-Infinity" are the infinities'),
        (b'{"drawings": [{"strokes": {"coordinates": 1e400}}]}', "drawings[0].strokes.coordinates",
         "is out of range for the enum quickdraw.v1.Strokes.Coordinates (an int32), got a number too large for a "
         "double"),
        (b'{"topK": 1' + b"0" * 400 + b"}", "topK", "is out of range for uint32 (0..4294967295), got a 401-digit "
         "integer"),
        (b'{"model": {"version": 1e400}}', "model.version",
         "is out of range for int64 (-9223372036854775808..9223372036854775807), got a number too large for a double"),
        # null: a field's default, but not an element of a repeated field
        (b'{"drawings": [null]}', "drawings[0]", "must not be null (an element of a repeated field)"),
        (b'{"drawings": [{"strokes": {"strokes": [{"x": [1, null], "y": [1, 2]}]}}]}',
         "drawings[0].strokes.strokes[0].x[1]", "must not be null (an element of a repeated field)"),
        # int64 as a string, of digits (or what int() or float() take)
        (b'{"model": {"version": "12a"}}', "model.version",
         'expected an integer (int64: a JSON number or a string of digits), got the string "12a"'),
        (b'{"model": {"version": "9223372036854775808"}}', "model.version",
         "is out of range for int64 (-9223372036854775808..9223372036854775807), got the string "
         '"9223372036854775808"'),
        (b'{"model": {"version": "1 2"}}', "model.version",
         'expected an integer (int64: a JSON number or a string of digits), got the string "1 2"'),
        # a oneof holds one member (null is none)
        (b'{"drawings": [{"bitmap": {}, "strokes": {}}]}', "drawings[0].strokes",
         "is a second field of the oneof input of quickdraw.v1.Drawing (bitmap is set too); set only one"),
    ],
    ids=["unknown-top", "unknown-deep", "string-in-floats", "object-in-floats", "list-for-message", "number-for-bytes",
         "word-for-uint32", "fraction-for-uint32", "object-for-drawings", "object-for-strokes", "number-for-x",
         "base64-length", "enum-name", "enum-int32", "400-digit-float", "1e400-float", "1e400-enum", "400-digit-uint32",
         "1e400-int64", "null-drawing", "null-coordinate", "int64-word", "int64-too-big", "int64-space", "oneof"],
)  # fmt: skip
def test_the_json_walk_names_each_field_exactly(body: bytes, field: str, description: str) -> None:
    assert _walk_refusal(body) == [(field, description)]


def test_the_json_walk_reports_every_violation_bounded() -> None:
    from service.frontends.http.jsonwalk import MAX_VIOLATIONS

    body = {"drawings": [{"strokes": {"strokes": [{"x": ["a", 1, "b"], "y": [1, 2, 3]}], "coordinates": "P"}},
                         {"bitmap": {"pixels": "A"}}], "topK": -1, "nope": 1}  # fmt: skip
    assert [f for f, _ in _walk_refusal(json.dumps(body).encode())] == [
        "drawings[0].strokes.strokes[0].x[0]", "drawings[0].strokes.strokes[0].x[2]",
        "drawings[0].strokes.coordinates", "drawings[1].bitmap.pixels", "topK", "nope"]
    many = {"drawings": [{"strokes": {"strokes": [{"x": ["a"] * 1000, "y": [1] * 1000}]}}]}
    got = _walk_refusal(json.dumps(many).encode())
    assert [f for f, _ in got] == [f"drawings[0].strokes.strokes[0].x[{i}]" for i in range(MAX_VIOLATIONS)]


@pytest.mark.parametrize(
    "body",
    [
        {"drawings": [{"bitmap": {"pixels": base64.b64encode(bytes(range(250, 256)) * 2).decode()}}]},
        {"drawings": [{"bitmap": {"pixels": base64.urlsafe_b64encode(bytes(range(250, 256)) * 2).decode()}}]},
        {"drawings": [{"bitmap": {"pixels": "-_8"}}, {"image": {"data": "+/8="}}, {"image": {"data": ""}}]},
        {"drawings": [{"strokes": {"coordinates": c}} for c in ("RAW", 2, "2", 7, None)]},
        {"drawings": [{"bitmap": None, "strokes": {"strokes": [{"x": ["NaN", "Infinity", "-Infinity", "1.5", 2],
                                                                "y": [1, 2, 3, 4, 5], "tMs": None}]}}]},
        {"drawings": None, "topK": None, "model": None},
        {"model": {"version": "12"}, "topK": "5"},
        {"model": {"version": "1000"}, "top_k": 4.0},  # "1e3" json_format takes; the walk does not (see below)
        {"model": {"version": -(2**63)}, "topK": 2**32 - 1},
        {"drawings": [{"strokes": {"strokes": [{"x": [10**39], "y": ["1e39"]}]}}]},  # json_format takes these
        {"model": []},  # and an empty array as an empty message
    ],
)  # fmt: skip
def test_the_json_walk_takes_what_json_format_takes(body: dict[str, Any]) -> None:
    from service.frontends.http.jsonwalk import json_violations

    assert json_violations(json.loads(json.dumps(body)), pb.ClassifyRequest.DESCRIPTOR) == []
    json_format.ParseDict(json.loads(json.dumps(body)), pb.ClassifyRequest())


def test_the_json_walk_is_generic_over_descriptors() -> None:
    """Maps (keys as their type), the wrappers (bare values), Struct and Value, by their own paths."""
    from google.protobuf import message_factory, struct_pb2, wrappers_pb2
    from google.rpc import error_details_pb2

    from service.frontends.http.jsonwalk import json_violations

    def walk(data: Any, descriptor: Any) -> list[tuple[str, str]]:
        out = [(v.field, v.description) for v in json_violations(data, descriptor)]
        message = message_factory.GetMessageClass(descriptor)()
        try:
            json_format.ParseDict(data, message)
        except (json_format.ParseError, OverflowError, ValueError):
            assert out
        else:
            assert not out
        return out

    info = error_details_pb2.ErrorInfo.DESCRIPTOR
    assert walk({"metadata": {"a": "b"}, "reason": "r"}, info) == []
    assert walk({"metadata": {"a": 1}}, info) == [("metadata[a]", "expected a JSON string, got 1")]
    assert walk({"metadata": [1]}, info) == [("metadata", "must be a JSON object (a map), got an array of 1 item")]
    assert walk("-5", wrappers_pb2.Int64Value.DESCRIPTOR) == []
    assert walk("x", wrappers_pb2.Int64Value.DESCRIPTOR) == [
        ("", 'expected an integer (int64: a JSON number or a string of digits), got the string "x"')]
    assert walk({"a": [1, "b", {"c": None}]}, struct_pb2.Struct.DESCRIPTOR) == []
    quota = error_details_pb2.QuotaFailure.DESCRIPTOR
    assert walk({"violations": [{"subject": "s"}, {"subject": 5}]}, quota) == [
        ("violations[1].subject", "expected a JSON string, got 5")]


def test_the_json_walk_checks_number_arrays_at_c_speed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A long array of plain numbers is checked with numpy, not value by value (the stroke arrays of a valid
    body are taken out before the walk; one that was not is still checked fast): only what is not a number the
    field takes is walked."""
    from service.frontends.http import jsonwalk

    walked: list[str] = []
    scalar = jsonwalk._Walk.scalar

    def counted(self: Any, value: Any, field: Any, path: str) -> None:
        walked.append(path)
        scalar(self, value, field, path)

    monkeypatch.setattr(jsonwalk._Walk, "scalar", counted)
    n = 200_000
    data = {"drawings": [{"strokes": {"strokes": [{"x": list(range(n)), "y": [0.5] * n, "tMs": [1e38] * n}]}}]}
    assert jsonwalk.json_violations(data, pb.ClassifyRequest.DESCRIPTOR) == [] and walked == []
    x = data["drawings"][0]["strokes"]["strokes"][0]["x"]  # type: ignore[index]
    x[7], x[n // 2], x[-1] = "NaN", 1e39, "z"
    got = jsonwalk.json_violations(data, pb.ClassifyRequest.DESCRIPTOR)
    path = "drawings[0].strokes.strokes[0].x"
    assert walked == [f"{path}[7]", f"{path}[{n // 2}]", f"{path}[{n - 1}]"]
    assert [v.field for v in got] == [f"{path}[{n // 2}]", f"{path}[{n - 1}]"]


@pytest.mark.parametrize(
    ("body", "field", "description"),
    [
        # a base64 string where an EncodedImage belongs: one violation at the image, not one per character
        ({"drawings": [{"image": "iVBORw0KGgoAAAANSUhEUg=="}]}, "drawings[0].image",
         'expected an object like {"data": "<base64>"}, got a string'),
        ({"drawings": [{"bitmap": [0, 255]}]}, "drawings[0].bitmap",
         'expected an object like {"pixels": "<base64>"}, got an array of 2 items'),
        ({"drawings": ["cat"]}, "drawings[0]",
         'expected an object with one of the keys "bitmap", "image", "strokes", got a string'),
        ({"drawings": [{"strokes": {"strokes": [{"x": 1, "y": [1]}]}}]}, "drawings[0].strokes.strokes[0].x",
         "expected an array of numbers, got a number (1)"),
        ({"drawings": [{"bitmap": {}}], "model": 5}, "model",
         'expected an object like {"version": 1}, got a number (5)'),
    ],
    ids=["string-for-image", "array-for-bitmap", "string-for-drawing", "number-for-x", "number-for-model"],
)  # fmt: skip
def test_a_wrong_json_type_is_named_in_json_terms(
    gateway: RunningGateway, body: dict[str, Any], field: str, description: str
) -> None:
    status, answer, _ = call(gateway, "/v1/classify", body)
    assert status == 400 and violations(answer) == [(field, description)]
    assert answer["error"]["message"] == f"{field}: {description}"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"drawings": [{"bitmap": {"pixels": base64.b64encode(bytes(784)).decode()}}], "topK": 99}, "topK"),
        ({"drawings": [{"bitmap": {"pixels": base64.b64encode(bytes(784)).decode()}}], "top_k": 99}, "top_k"),
        ({"drawings": [{"strokes": {"coordinates": "RAW", "strokes": [{"x": [1, 2], "y": [1, 2],
                                                                       "tMs": [0, "NaN"]}]}}]},
         "drawings[0].strokes.strokes[0].tMs[1]"),
        ({"drawings": [{"strokes": {"coordinates": "RAW", "strokes": [{"x": [1, 2], "y": [1, 2],
                                                                       "t_ms": [0, "NaN"]}]}}]},
         "drawings[0].strokes.strokes[0].t_ms[1]"),
        ({"drawings": [{"strokes": {"strokes": [{"x": [1, 300], "y": [1, 2]}]}}], "top_k": 99}, "top_k"),
    ],
    ids=["topK", "top_k", "tMs", "t_ms", "top_k-second"],
)  # fmt: skip
def test_violations_name_fields_as_the_body_spells_them(
    gateway: RunningGateway, client: QuickDrawClient, body: dict[str, Any], field: str
) -> None:
    """Validation names fields in proto terms (top_k); the JSON API's answer names them as the body did."""
    status, answer, _ = call(gateway, "/v1/classify", body)
    assert status == 400
    fields = [f for f, _ in violations(answer)]
    assert field in fields, fields
    swapped = {"topK": "top_k", "top_k": "topK"}.get(field)
    assert swapped is None or swapped not in fields
    other = field.replace("tMs", "t_ms") if "tMs" in field else field.replace("t_ms", "tMs")
    assert other == field or other not in fields
    _, over_grpc = grpc_violations(client, json_format.ParseDict(body, pb.ClassifyRequest()))
    # the gRPC call's violations, in proto names, only named as the body spells them
    assert [respell(f, pb.ClassifyRequest.DESCRIPTOR, json.dumps(body).encode()) for f, _ in over_grpc] == fields
    assert any(f.replace("tMs", "t_ms").replace("topK", "top_k") == f2 for f in fields for f2, _ in over_grpc)


def test_respell_follows_the_descriptors() -> None:
    d = pb.ClassifyRequest.DESCRIPTOR
    assert respell("top_k", d, b'{"topK": 1}') == "topK"
    assert respell("top_k", d, b'{"top_k": 1}') == "top_k"
    assert respell("top_k", d, b"{}") == "topK"  # absent: the JSON API's own spelling
    assert respell("top_k", d, b'{"top_k": 1, "topK": 2}') == "topK"
    assert respell("drawings[2].strokes.strokes[0].t_ms[4]", d, b'"t_ms"') == "drawings[2].strokes.strokes[0].t_ms[4]"
    assert respell("drawings[2].strokes.strokes[0].t_ms[4]", d, b'"tMs"') == "drawings[2].strokes.strokes[0].tMs[4]"
    assert respell("Content-Type header", d, b"") == "Content-Type header"
    assert respell("", d, b"{}") == ""


@pytest.mark.parametrize("text", ["+1", "1_0", "\u0661", "1e3"])
def test_integer_strings_are_ascii_digits(text: str) -> None:
    """Stricter than json_format (Python's int() reads "+1", "1_0" and an Arabic-Indic one as 1, 10 and 1): a
    version written as a string is ASCII digits at /v1 as at every other door."""
    from service.core.errors import InvalidArgument
    from service.frontends.http.jsonbody import parse_body
    from service.preprocess.validation import Limits

    raw = json.dumps({"model": {"version": text}}).encode()
    with pytest.raises(InvalidArgument) as info:
        parse_body(raw, pb.ClassifyRequest(), 1 << 22, Limits(*WALK_LIMITS_ARGS, num_classes=345))
    assert [v.field for v in info.value.violations] == ["model.version"]
    assert "a string of digits" in info.value.violations[0].description
