"""Hostile input through the real gateway: property-based fuzzing of every request field, and the explicit cases.

One gateway (the real ``App``, the shipped model, the embedded backend) serves the whole module. Hypothesis
generates requests for every public surface: ``quickdraw.v1.Classifier`` Classify and ClassifyStream, TF
Serving's Predict on the gateway, and the JSON API (``POST /v1/classify``). The properties, for every example:

- no crash: the server answers a health check after every call;
- no INTERNAL (no HTTP 500): each call is answered OK or refused with the code its defect calls for;
- no hang: every call has a deadline (``DEADLINE_S``) and must end well within it (``PROMPT_S``);
- invalid input gets INVALID_ARGUMENT (HTTP 400) with a ``google.rpc.BadRequest`` whose field violations name
  exactly the fields that were broken; valid input gets OK (an unknown model version, NOT_FOUND).

The generators build valid requests and then plant zero or more defects, each knowing the field it breaks and
the stage that finds it (validation, the version check, or decoding an image), so every expected answer is
exact. Raw bytes (garbage, truncated or mutated protobuf; any JSON) get looser oracles. The explicit cases:
messages over the size limits, decompression bombs (time and memory), huge and degenerate stroke arrays, NaN
and infinities, absurd sizes and numbers, undecodable protobuf, and JSON that json_format chokes on.

The hypothesis budget is small and derandomized (the same examples on every run, no example database), so the
module takes well under a minute on two cores; ``QUICKDRAW_FUZZ_EXAMPLES=2000`` makes a longer hunt.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from harness import SHIPPED_MODEL, RunningGateway
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import predict_pb2
from test_tfserving import shipped_extra_outputs

from doodle.contract import OUTPUTS
from quickdraw_client.v1 import classifier_pb2 as pb
from service.backends import find_versions
from service.core.errors import InvalidArgument
from service.frontends.http.jsonwalk import respell
from service.preprocess.validation import ImageIn, Limits, bitmaps_only, render, validate
from service.protos.tensors import TensorDecodeError, to_numpy

pytestmark = pytest.mark.skipif(
    not find_versions(SHIPPED_MODEL), reason=f"no SavedModel under {SHIPPED_MODEL} (the shipped model is missing)"
)

#: Every call's deadline, and the time within which it must have ended (well inside the deadline).
DEADLINE_S = 10.0
#: "At once": every call here is refused or answered (a few drawings at most) well under a second; was 5 s, which
#: would have passed a gateway that stalled for seconds.
PROMPT_S = 1.0
#: The same for a call that sends megabytes (a 4 MiB message, a 16 MiB body): the client serializes and writes it
#: in this process, beside the in-process gateway, so its own share is counted too (one took 1.02 s in a full run
#: on 2 cores).
PROMPT_LARGE_S = 2.0
FUZZ_EXAMPLES = int(os.environ.get("QUICKDRAW_FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
LIMITS = Limits()  # the defaults, which the module's gateway runs with
MiB = 1024 * 1024
F32_MAX = float(np.finfo(np.float32).max)
CLASSIFY = "/quickdraw.v1.Classifier/Classify"
CLASSIFY_STREAM = "/quickdraw.v1.Classifier/ClassifyStream"
PREDICT = "/tensorflow.serving.PredictionService/Predict"
HTTP_STATUS = {grpc.StatusCode.OK: 200, grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404,
               grpc.StatusCode.RESOURCE_EXHAUSTED: 413}  # fmt: skip


# --- the gateway and how calls are made and judged ---------------------------------------------------------------


@dataclass
class Outcome:
    """How a call ended: its code, message, field violations (field, description) and how long it took."""

    code: grpc.StatusCode
    message: str
    violations: list[tuple[str, str]]
    elapsed: float
    response: Any = None

    @property
    def fields(self) -> list[str]:
        """The fields named by the violations."""
        return [f for f, _ in self.violations]


def _violations(details: list[Any]) -> list[tuple[str, str]]:
    out = []
    for detail in details:
        bad = error_details_pb2.BadRequest()
        assert detail.Unpack(bad), f"a detail that is not a BadRequest: {detail.type_url}"
        out += [(v.field, v.description) for v in bad.field_violations]
    return out


class Api:
    """Every surface of one running gateway, each call with a deadline, each followed by a health check."""

    def __init__(self, gw: RunningGateway) -> None:
        self.gw = gw
        big = 64 * MiB  # the client may send more than the server takes: the server must say no itself
        self.channel = grpc.insecure_channel(
            gw.target, options=[("grpc.max_send_message_length", big), ("grpc.max_receive_message_length", big)]
        )
        raw: dict[str, Any] = {"request_serializer": None, "response_deserializer": None}  # bytes in, bytes out
        self.classify_raw = self.channel.unary_unary(CLASSIFY, **raw)
        self.stream_raw = self.channel.stream_stream(CLASSIFY_STREAM, **raw)
        self.predict_raw = self.channel.unary_unary(PREDICT, **raw)
        self.classify = self.channel.unary_unary(
            CLASSIFY, request_serializer=pb.ClassifyRequest.SerializeToString,
            response_deserializer=pb.ClassifyResponse.FromString,
        )  # fmt: skip
        self.stream = self.channel.stream_stream(
            CLASSIFY_STREAM, request_serializer=pb.ClassifyStreamRequest.SerializeToString,
            response_deserializer=pb.ClassifyStreamResponse.FromString,
        )  # fmt: skip
        self.predict = self.channel.unary_unary(
            PREDICT, request_serializer=predict_pb2.PredictRequest.SerializeToString,
            response_deserializer=predict_pb2.PredictResponse.FromString,
        )  # fmt: skip
        self._health = health_pb2_grpc.HealthStub(self.channel)
        info = self.channel.unary_unary(
            "/quickdraw.v1.Classifier/GetModelInfo", request_serializer=pb.GetModelInfoRequest.SerializeToString,
            response_deserializer=pb.ModelInfo.FromString,
        )(pb.GetModelInfoRequest(), timeout=DEADLINE_S)  # fmt: skip
        self.version = info.default_version
        self.labels = list(info.labels)
        self.url = f"http://127.0.0.1:{gw.app.http_port}/v1/classify"

    def healthy(self) -> None:
        """The server is up and serving."""
        resp = self._health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING

    def call(self, method: Callable[..., Any], request: Any, timeout: float = DEADLINE_S) -> Outcome:
        """A unary call with a deadline; then the health check."""
        t0 = time.perf_counter()
        try:
            resp = method(request, timeout=timeout)
            out = Outcome(grpc.StatusCode.OK, "", [], time.perf_counter() - t0, resp)
        except grpc.RpcError as err:
            elapsed = time.perf_counter() - t0
            status = rpc_status.from_call(err)  # type: ignore[arg-type]
            out = Outcome(err.code(), err.details() or "", _violations(list(status.details)) if status else [], elapsed)
        self.healthy()
        return out

    def post(self, body: bytes, timeout: float = DEADLINE_S) -> tuple[int, dict[str, Any], float]:
        """POST /v1/classify with the deadline header; (HTTP status, JSON answer, seconds); then the health check."""
        req = urllib.request.Request(self.url, data=body, headers={
            "Content-Type": "application/json", "X-Server-Timeout": str(timeout)})  # fmt: skip
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, text = resp.status, resp.read()
        except urllib.error.HTTPError as err:
            status, text = err.code, err.read()
        elapsed = time.perf_counter() - t0
        self.healthy()
        return status, json.loads(text), elapsed


def spelled(field: str, body: bytes) -> str:
    """A gRPC violation's field (proto names) as the JSON API names it for ``body`` (as the body spells it)."""
    return respell(field, pb.ClassifyRequest.DESCRIPTOR, body)


def http_violations(body: dict[str, Any]) -> list[tuple[str, str]]:
    """The BadRequest field violations of a JSON error (proto3 JSON leaves out an empty field)."""
    out = []
    for detail in body["error"]["details"]:
        assert detail["@type"] == "type.googleapis.com/google.rpc.BadRequest"
        out += [(v.get("field", ""), v["description"]) for v in detail["fieldViolations"]]
    return out


@pytest.fixture(scope="module")
def gw() -> Iterator[RunningGateway]:
    with RunningGateway(warmup=False) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def api(gw: RunningGateway) -> Iterator[Api]:
    a = Api(gw)
    a.healthy()
    yield a
    a.channel.close()


# --- generators: valid requests, and defects that know what they break -------------------------------------------


@dataclass(frozen=True)
class Defect:
    """A planted defect: the stage that finds it ("validate", "version" or "decode") and the field it names."""

    stage: str
    field: str = ""


@dataclass
class Case:
    """A request and the defects planted in it (none: a valid request)."""

    request: pb.ClassifyRequest
    defects: list[Defect] = field(default_factory=list)

    def expected(self) -> tuple[grpc.StatusCode, list[str]]:
        """The code and the violated fields the gateway must answer with (validation runs first, then the
        version is looked up, then images are decoded)."""
        for stage, code in (("validate", grpc.StatusCode.INVALID_ARGUMENT), ("version", grpc.StatusCode.NOT_FOUND),
                            ("decode", grpc.StatusCode.INVALID_ARGUMENT)):  # fmt: skip
            found = [d.field for d in self.defects if d.stage == stage]
            if found:
                return code, sorted(found) if stage != "version" else []
        return grpc.StatusCode.OK, []


SIMPLIFIED = st.floats(0, 255, width=32) | st.integers(0, 255).map(float)
RAW = st.floats(-1e6, 1e6, width=32) | st.sampled_from([0.0, -0.0, 1e6, -1e6, 1e-45, 123456.7])
T_MS = st.floats(width=32, allow_nan=False, allow_infinity=False)
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])


@st.composite
def valid_strokes(draw: st.DrawFn, raw: bool) -> pb.Strokes:
    """1..4 strokes, the first with 1..12 points, the others 0..12 (zero-length strokes are allowed)."""
    coord = RAW if raw else SIMPLIFIED
    out = pb.Strokes(coordinates=pb.Strokes.RAW if raw else draw(st.sampled_from([0, pb.Strokes.SIMPLIFIED])))
    for k in range(draw(st.integers(1, 4))):
        n = draw(st.integers(1 if k == 0 else 0, 12))
        same = draw(st.booleans())  # all points at one place: a dot, or an extent of 0 for raw strokes
        x = [draw(coord)] * n if same else draw(st.lists(coord, min_size=n, max_size=n))
        y = [draw(coord)] * n if same else draw(st.lists(coord, min_size=n, max_size=n))
        t = draw(st.lists(T_MS, min_size=n, max_size=n)) if n and draw(st.booleans()) else []
        out.strokes.add(x=x, y=y, t_ms=t)
    return out


@st.composite
def image_bytes(draw: st.DrawFn) -> bytes:
    """A small PNG or JPEG of a few lines, in any of the modes clients send."""
    w, h = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    fmt = draw(st.sampled_from(["PNG", "JPEG"]))
    mode = draw(st.sampled_from(["L", "RGB", "RGBA", "LA", "P", "1", "I;16"] if fmt == "PNG" else ["L", "RGB", "CMYK"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    background = int(rng.choice([0, 255]))
    img = Image.new("L", (w, h), background)
    pen = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 4))):
        pen.line([tuple(rng.integers(0, max(w, h), 2).tolist()) for _ in range(3)], fill=255 - background,
                 width=int(rng.integers(1, 6)))  # fmt: skip
    if mode in ("RGBA", "LA"):
        img = Image.merge("RGBA", [img, img, img, img.point(lambda v: 255 - v if background == 255 else v)])
    img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def bomb_png(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims w x h pixels (only a few rows of data follow)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    idat = zlib.compress(b"\x00" * (min(w, 4096) + 1) * 4, 9)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bomb_jpeg(w: int, h: int) -> bytes:
    """A real 16x16 JPEG whose frame header (SOF0) is patched to claim w x h pixels (each at most 65535)."""
    buf = io.BytesIO()
    Image.new("L", (16, 16), 255).save(buf, format="JPEG", progressive=False)
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, h, w)  # marker, length (2), precision (1), then height, width
    return bytes(data)


HOSTILE_IMAGES = st.one_of(
    st.binary(min_size=1, max_size=300),
    image_bytes().flatmap(lambda b: st.integers(1, max(1, len(b) - 1)).map(lambda n: b[:n])),  # truncated
    st.tuples(image_bytes(), st.data()).map(lambda t: _flip(t[0], t[1])),  # a byte or two changed
    st.tuples(st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1)).map(lambda wh: bomb_png(*wh)),
    st.tuples(st.integers(1, 65535), st.integers(1, 65535)).map(lambda wh: bomb_jpeg(*wh)),
)


def _flip(data: bytes, drawer: st.DataObject) -> bytes:
    out = bytearray(data)
    for _ in range(drawer.draw(st.integers(1, 2))):
        out[drawer.draw(st.integers(0, len(out) - 1))] = drawer.draw(st.integers(0, 255))
    return bytes(out)


def image_verdict(data: bytes, i: int) -> list[Defect]:
    """Whether the gateway can decode these bytes, asked of the code it renders with (the oracle for images)."""
    try:
        render(i, ImageIn(data=data), LIMITS)
    except InvalidArgument as exc:
        [violation] = exc.violations
        return [Defect("decode", violation.field)]
    return []


@st.composite
def valid_drawing(draw: st.DrawFn) -> pb.Drawing:
    """Any valid drawing: a bitmap, an image, or simplified or raw strokes."""
    kind = draw(st.sampled_from(["bitmap", "image", "simplified", "raw"]))
    if kind == "bitmap":
        return pb.Drawing(bitmap=pb.Bitmap(pixels=draw(st.binary(min_size=784, max_size=784))))
    if kind == "image":
        return pb.Drawing(image=pb.EncodedImage(data=draw(image_bytes())))
    return pb.Drawing(strokes=draw(valid_strokes(raw=kind == "raw")))


def broken_drawing(draw: st.DrawFn, i: int) -> tuple[pb.Drawing, list[Defect]]:
    """Drawing ``i`` with one defect planted, and the defect (none if a changed image happens to decode)."""
    at = f"drawings[{i}]"
    kind = draw(st.sampled_from(["unset", "bitmap", "image_empty", "image", "empty", "xy", "t_ms", "non_finite",
                                 "out_of_range", "coordinates", "strokes", "points"]))  # fmt: skip
    if kind == "unset":
        return pb.Drawing(), [Defect("validate", at)]
    if kind == "bitmap":
        size = draw(st.sampled_from([0, 1, 783, 785, 1568]) | st.integers(0, 3000).filter(lambda n: n != 784))
        return pb.Drawing(bitmap=pb.Bitmap(pixels=bytes(size))), [Defect("validate", f"{at}.bitmap.pixels")]
    if kind == "image_empty":
        d = pb.Drawing()
        d.image.SetInParent()
        return d, [Defect("validate", f"{at}.image.data")]
    if kind == "image":
        data = draw(HOSTILE_IMAGES)
        return pb.Drawing(image=pb.EncodedImage(data=data)), image_verdict(data, i)
    raw = draw(st.booleans())
    strokes = draw(valid_strokes(raw=raw))
    d = pb.Drawing(strokes=strokes)
    s = d.strokes
    if kind == "empty":  # no strokes, or strokes with no points
        del s.strokes[:]
        for _ in range(draw(st.integers(0, 3))):
            s.strokes.add()
        return d, [Defect("validate", f"{at}.strokes.strokes")]
    if kind == "coordinates":  # an enum number proto3 keeps but nobody defined
        s.coordinates = draw(st.integers(3, 2**31 - 1) | st.integers(-(2**31), -1))
        return d, [Defect("validate", f"{at}.strokes.coordinates")]
    if kind == "strokes":
        del s.strokes[:]
        for _ in range(draw(st.integers(LIMITS.max_strokes + 1, LIMITS.max_strokes + 40))):
            s.strokes.add(x=[1.0], y=[1.0])
        return d, [Defect("validate", f"{at}.strokes.strokes")]
    if kind == "points":
        n = draw(st.integers(LIMITS.max_points + 1, LIMITS.max_points + 500))
        s.strokes[0].x[:] = [float(v % 200) for v in range(n)]
        s.strokes[0].y[:] = [float(v % 100) for v in range(n)]
        del s.strokes[0].t_ms[:]
        return d, [Defect("validate", f"{at}.strokes.strokes")]
    j = draw(st.integers(0, len(s.strokes) - 1))
    stroke = s.strokes[j]
    n = len(stroke.x)
    if kind == "xy":  # x and y of different lengths
        if n and draw(st.booleans()):
            del stroke.y[-1]
        else:
            stroke.y.append(1.0)
        return d, [Defect("validate", f"{at}.strokes.strokes[{j}]")]
    if kind == "t_ms" or n == 0:  # times that do not match the points (or times alone, with no points)
        m = draw(st.integers(1, 20).filter(lambda m: m != n))
        stroke.t_ms[:] = [float(v) for v in range(m)]
        return d, [Defect("validate", f"{at}.strokes.strokes[{j}]")]
    k = draw(st.integers(0, n - 1))
    if kind == "non_finite":
        axis = draw(st.sampled_from(["x", "y", "t_ms"] if len(stroke.t_ms) else ["x", "y"]))
        getattr(stroke, axis)[k] = draw(NON_FINITE)
        return d, [Defect("validate", f"{at}.strokes.strokes[{j}].{axis}[{k}]")]
    axis = draw(st.sampled_from(["x", "y"]))  # out of range: beyond 0..255, or beyond +-max_raw_coordinate
    high = LIMITS.max_raw_coordinate if raw else 255.0
    value = draw(st.floats(high, F32_MAX, exclude_min=True, width=32))
    if draw(st.booleans()):
        value = -value if raw else -draw(st.floats(0, F32_MAX, exclude_min=True, width=32))
    getattr(stroke, axis)[k] = value
    return d, [Defect("validate", f"{at}.strokes.strokes[{j}].{axis}[{k}]")]


@st.composite
def classify_cases(draw: st.DrawFn) -> Case:
    """A valid ClassifyRequest with 0..3 defects planted (at most one per drawing)."""
    n = draw(st.integers(1, 4))
    drawings = [draw(valid_drawing()) for _ in range(n)]
    req = pb.ClassifyRequest(top_k=draw(st.integers(0, LIMITS.max_top_k)))
    choice = draw(st.sampled_from(["none", "zero", "served"]))
    if choice != "none":
        req.model.version = 0 if choice == "zero" else -1  # -1: replaced by the served version below
    defects: list[Defect] = []
    for i, d in enumerate(drawings):  # the oracle has the last word on images, valid-looking ones too
        if d.WhichOneof("input") == "image":
            defects += image_verdict(d.image.data, i)
    for i in draw(st.lists(st.integers(0, n - 1), unique=True, max_size=min(n, 3))):
        defects = [x for x in defects if not x.field.startswith(f"drawings[{i}].")]
        drawings[i], found = broken_drawing(draw, i)
        defects += found
    req.drawings.extend(drawings)
    if draw(st.integers(0, 5)) == 0:
        req.top_k = draw(st.integers(LIMITS.max_top_k + 1, 2**32 - 1) | st.just(2**32 - 1))
        defects.append(Defect("validate", "top_k"))
    if draw(st.integers(0, 5)) == 0:
        req.model.version = draw(st.integers(-(2**63), 2**63 - 1).filter(lambda v: v not in (0, -1)))
        defects.append(Defect("version"))
    return Case(req, defects)


def _served(case: Case, api: Api) -> pb.ClassifyRequest:
    """The case's request with the served version filled in where it asked for it (-1)."""
    req = pb.ClassifyRequest()
    req.CopyFrom(case.request)
    if req.HasField("model") and req.model.version == -1:
        req.model.version = api.version
    if any(d.stage == "version" for d in case.defects) and req.model.version == api.version:
        req.model.version = api.version + 1000
    return req


def check(case: Case, out: Outcome, api: Api) -> None:
    """The outcome of one request is the one its defects call for, promptly."""
    assert out.elapsed < PROMPT_S, f"took {out.elapsed:.2f}s"
    code, fields = case.expected()
    assert out.code == code, (out.code, out.message, case.defects)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert sorted(out.fields) == fields, (out.violations, case.defects)
        assert all(description for _, description in out.violations)
    if code == grpc.StatusCode.OK:
        resp = out.response
        assert len(resp.predictions) == len(case.request.drawings) and resp.model_version == api.version
        for p in resp.predictions:
            scores = [s.score for s in p.top]
            assert len(p.top) == (case.request.top_k or 3) and scores == sorted(scores, reverse=True)
            assert all(0.0 <= s <= 1.0 for s in scores) and all(s.label in api.labels for s in p.top)


# --- fuzzing: quickdraw.v1.Classifier ----------------------------------------------------------------------------


@FUZZ
@given(case=classify_cases())
def test_fuzz_classify(api: Api, case: Case) -> None:
    """Every field of ClassifyRequest, valid or with planted defects: the exact code and field violations."""
    request = _served(case, api)
    check(case, api.call(api.classify, request), api)


@settings(FUZZ, max_examples=FUZZ_EXAMPLES * 4)
@given(case=classify_cases())
def test_the_bitmap_fast_path_accepts_only_what_validation_accepts_and_reads_it_the_same(case: Case) -> None:
    """``bitmaps_only`` (the converter's pydantic-free path for the commonest request) on fuzzed requests: when it
    accepts one, full validation accepts it too, with the same bitmaps, top_k and version; a request with any
    defect planted at validation goes to full validation (which words the error)."""
    fast = bitmaps_only(case.request, LIMITS)
    if fast is None:
        return
    assert not any(d.stage == "validate" for d in case.defects), case.defects
    valid = validate(case.request, LIMITS)
    images, top_k, version = fast
    assert (top_k, version) == (valid.top_k, valid.version)
    rendered = np.stack([render(i, d, LIMITS) for i, d in enumerate(valid.drawings)])
    assert np.array_equal(images[..., 0], rendered)


def test_the_bitmap_fast_path_takes_bitmaps_within_the_limits_and_nothing_else() -> None:
    """The requests ``bitmaps_only`` takes (read as validation reads them) and those it leaves to validation."""
    pixels = [bytes([i]) * 784 for i in range(3)]
    req = pb.ClassifyRequest(drawings=[pb.Drawing(bitmap=pb.Bitmap(pixels=p)) for p in pixels], top_k=5)
    req.model.version = 2
    images, top_k, version = bitmaps_only(req, LIMITS) or (None, 0, None)
    assert images is not None and images.shape == (3, 28, 28, 1) and images[2, 5, 5, 0] == 2
    assert (top_k, version) == (5, 2) == (validate(req, LIMITS).top_k, validate(req, LIMITS).version)
    assert bitmaps_only(pb.ClassifyRequest(drawings=req.drawings[:1]), LIMITS)[1:] == (3, None)  # type: ignore[index]
    for bad in (pb.ClassifyRequest(drawings=[pb.Drawing(bitmap=pb.Bitmap(pixels=bytes(783)))]),
                pb.ClassifyRequest(drawings=req.drawings, top_k=LIMITS.max_top_k + 1),
                pb.ClassifyRequest(drawings=[*req.drawings, pb.Drawing(image=pb.EncodedImage(data=b"x"))]),
                pb.ClassifyRequest()):  # fmt: skip
        assert bitmaps_only(bad, LIMITS) is None


@settings(FUZZ, max_examples=max(5, FUZZ_EXAMPLES // 3))
@given(cases=st.lists(classify_cases(), min_size=1, max_size=4))
def test_fuzz_classify_stream(api: Api, cases: list[Case]) -> None:
    """A stream of fuzzed messages: each answered once, by id, as the unary call would be; the stream goes on."""
    requests = [pb.ClassifyStreamRequest(id=f"m{k}", request=_served(c, api)) for k, c in enumerate(cases)]
    t0 = time.perf_counter()
    answers = {a.id: a for a in api.stream(iter(requests), timeout=DEADLINE_S)}
    elapsed = time.perf_counter() - t0
    api.healthy()
    assert sorted(answers) == sorted(r.id for r in requests)
    for k, case in enumerate(cases):
        a = answers[f"m{k}"]
        if a.WhichOneof("result") == "response":
            out = Outcome(grpc.StatusCode.OK, "", [], elapsed, a.response)
        else:
            out = Outcome(_code(a.error.code), a.error.message, _violations(list(a.error.details)), elapsed)
        check(case, out, api)


def _code(number: int) -> grpc.StatusCode:
    return next(c for c in grpc.StatusCode if c.value[0] == number)


@st.composite
def mangled_bytes(draw: st.DrawFn, message: st.SearchStrategy[Any]) -> bytes:
    """Garbage, or a valid message's bytes truncated, with bytes changed, or with bytes inserted."""
    how = draw(st.sampled_from(["garbage", "truncated", "changed", "inserted"]))
    if how == "garbage":
        return draw(st.binary(max_size=512))
    data = bytearray(draw(message).SerializeToString())
    if how == "truncated" or not data:
        return bytes(data[: draw(st.integers(0, max(0, len(data) - 1)))])
    if how == "changed":
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    else:
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(min_size=1, max_size=12))
    return bytes(data)


#: What a mangled request may get: refused as malformed or unknown, or answered.
RAW_CODES = (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)


def check_raw(api: Api, method: Callable[..., Any], typed: Callable[..., Any], parse: Callable[[bytes], Any],
              data: bytes, codes: tuple[grpc.StatusCode, ...] = RAW_CODES) -> None:  # fmt: skip
    """Raw bytes: what protobuf cannot parse gets INVALID_ARGUMENT naming the wire format (the gateway parses the
    bytes itself, after counting on them); what it can gets the typed call's answer, one of ``codes``."""
    out = api.call(method, data)
    assert out.elapsed < PROMPT_S
    try:
        message = parse(data)
    except DecodeError:
        assert out.code == grpc.StatusCode.INVALID_ARGUMENT and "wire format" in out.message, out
        return
    same = api.call(typed, message)
    assert out.code == same.code and out.violations == same.violations
    assert out.code in codes, out


@FUZZ
@given(data=mangled_bytes(classify_cases().map(lambda c: c.request)))
def test_fuzz_classify_raw_bytes(api: Api, data: bytes) -> None:
    """Garbage and mangled protobuf as the raw request body of Classify (sent with an identity serializer)."""
    check_raw(api, api.classify_raw, api.classify, pb.ClassifyRequest.FromString, data)


# --- fuzzing: TF Serving's Predict on the gateway --------------------------------------------------------------


@dataclass
class PredictCase:
    """A PredictRequest, the code it must get, and the one field it breaks ("" for none)."""

    request: predict_pb2.PredictRequest
    code: grpc.StatusCode = grpc.StatusCode.OK
    field: str = ""


DTYPES = [v for v in types_pb2.DataType.values() if v != types_pb2.DT_UINT8]


@st.composite
def predict_cases(draw: st.DrawFn, version: int) -> PredictCase:
    """A valid Predict (1..3 images, packed or as int_val, output_filter, model_spec), or one with one defect."""
    n = draw(st.integers(1, 3))
    images = np.frombuffer(draw(st.binary(min_size=784 * n, max_size=784 * n)), np.uint8)
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "quickdraw"
    if draw(st.booleans()):
        req.model_spec.version.value = version
    req.model_spec.signature_name = draw(st.sampled_from(["", "serving_default"]))
    t = req.inputs["image"]
    t.dtype = types_pb2.DT_UINT8
    for d in (n, 28, 28, 1):
        t.tensor_shape.dim.add(size=d)
    encoding = draw(st.sampled_from(["content", "int_val"]))  # a broadcast single value is refused: see below
    if encoding == "content":
        t.tensor_content = images.tobytes()
    else:
        t.int_val.extend(images.tolist())
    req.output_filter.extend(draw(st.lists(st.sampled_from(OUTPUTS), max_size=4, unique=True)))  # TF Serving
    bad = grpc.StatusCode.INVALID_ARGUMENT  # refuses a name given twice (predict_util.cc)
    kind = draw(st.sampled_from(["none", "name", "version", "label", "signature", "inputs", "filter", "dtype", "shape",
                                 "batch", "content", "int_count", "int_range"]))  # fmt: skip
    text = st.text(max_size=24)
    if kind == "name":
        req.model_spec.name = draw(text.filter(lambda s: s != "quickdraw"))
        return PredictCase(req, grpc.StatusCode.NOT_FOUND)
    if kind == "version":
        req.model_spec.version.value = draw(st.integers(-(2**63), 2**63 - 1).filter(lambda v: v != version))
        return PredictCase(req, grpc.StatusCode.NOT_FOUND)
    if kind == "label":
        req.model_spec.version_label = draw(text)
        return PredictCase(req, bad, "model_spec.version_label")
    if kind == "signature":
        req.model_spec.signature_name = draw(text.filter(lambda s: s not in ("", "serving_default")))
        return PredictCase(req, grpc.StatusCode.FAILED_PRECONDITION, "model_spec.signature_name")  # as TF Serving
    if kind == "inputs":
        other = draw(text.filter(lambda s: s != "image"))
        req.inputs[other].CopyFrom(t)
        if draw(st.booleans()):
            del req.inputs["image"]
        return PredictCase(req, bad, "inputs")
    if kind == "filter":
        req.output_filter.append(draw(text.filter(lambda s: s not in OUTPUTS)))
        return PredictCase(req, bad, "output_filter")
    if kind == "dtype":
        t.dtype = draw(st.sampled_from(DTYPES) | st.integers(0, 2**31 - 1).filter(lambda v: v != types_pb2.DT_UINT8))
        return PredictCase(req, bad, "inputs[image].dtype")
    dims = st.integers(-(2**63), 2**63 - 1) | st.sampled_from([-1, 0, 1, 28, 2**31, 2**32, 2**62, 2**63 - 1])
    if kind == "shape":  # any shape but [n, 28, 28, 1]; products that overflow int64 included
        shape = draw(st.lists(dims, max_size=6).filter(lambda s: len(s) != 4 or s[1:] != [28, 28, 1]))
        del t.tensor_shape.dim[:]
        for d in shape:
            t.tensor_shape.dim.add(size=d)
        return PredictCase(req, bad, "inputs[image].tensor_shape")
    if kind == "batch":
        t.tensor_shape.dim[0].size = draw(dims.filter(lambda b: not 1 <= b <= LIMITS.max_drawings_per_request))
        return PredictCase(req, bad, "inputs[image].tensor_shape.dim[0]")
    if kind == "content":
        del t.int_val[:]
        t.tensor_content = bytes(draw(st.integers(1, 4000).filter(lambda m: m != 784 * n)))
        return PredictCase(req, bad, "inputs[image].tensor_content")
    if kind == "int_count":
        t.ClearField("tensor_content")
        del t.int_val[:]
        t.int_val.extend([7] * draw(st.integers(0, 3000).filter(lambda m: m not in (1, 784 * n))))
        return PredictCase(req, bad, "inputs[image].int_val")
    if kind == "int_range":
        t.ClearField("tensor_content")
        if not t.int_val:
            t.int_val.extend(images.tolist())
        j = draw(st.integers(0, len(t.int_val) - 1))
        t.int_val[j] = draw(st.integers(256, 2**31 - 1) | st.integers(-(2**31), -1))
        return PredictCase(req, bad, f"inputs[image].int_val[{j}]")
    return PredictCase(req)


@FUZZ
@given(data=st.data())
def test_fuzz_predict(api: Api, data: st.DataObject) -> None:
    """TF Serving's Predict: model_spec, inputs (dtype, shape, content), output_filter; one defect or none."""
    case = data.draw(predict_cases(api.version))
    out = api.call(api.predict, case.request)
    assert out.elapsed < PROMPT_S
    assert out.code == case.code, (out.code, out.message, case.field)
    if case.field:
        assert out.fields == [case.field], out.violations
    if case.code == grpc.StatusCode.OK:
        wanted = set(case.request.output_filter) or {*OUTPUTS, *shipped_extra_outputs()}
        assert set(out.response.outputs) == wanted
        n = case.request.inputs["image"].tensor_shape.dim[0].size
        if "probabilities" in wanted:
            probs = to_numpy(out.response.outputs["probabilities"])
            assert probs.shape == (n, len(api.labels)) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-3)


@FUZZ
@given(data=st.data())
def test_fuzz_predict_raw_bytes(api: Api, data: st.DataObject) -> None:
    """Garbage and mangled protobuf as the raw request body of Predict."""
    raw = data.draw(mangled_bytes(predict_cases(api.version).map(lambda c: c.request)))
    check_raw(api, api.predict_raw, api.predict, predict_pb2.PredictRequest.FromString, raw,
              (*RAW_CODES, grpc.StatusCode.FAILED_PRECONDITION))  # an unknown signature_name  # fmt: skip


# --- fuzzing: the JSON API ---------------------------------------------------------------------------------------


@FUZZ
@given(case=classify_cases())
def test_fuzz_http_classify_matches_grpc(api: Api, case: Case) -> None:
    """The fuzzed requests in the proto3 JSON mapping: the same code (as HTTP status) and field violations."""
    request = _served(case, api)
    raw = json.dumps(json_format.MessageToDict(request)).encode()
    status, body, elapsed = api.post(raw)
    assert elapsed < PROMPT_S
    code, fields = case.expected()
    assert status == HTTP_STATUS[code], (status, body, case.defects)
    if code == grpc.StatusCode.INVALID_ARGUMENT:  # named as the body spells them (topK, tMs: the JSON names here)
        assert sorted(f for f, _ in http_violations(body)) == sorted(spelled(f, raw) for f in fields)
    if code == grpc.StatusCode.OK:
        assert len(body["predictions"]) == len(request.drawings)


FIELD_NAMES = ["drawings", "bitmap", "pixels", "image", "data", "strokes", "coordinates", "x", "y", "tMs", "t_ms",
               "topK", "top_k", "model", "version"]  # fmt: skip
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(-(10**400), 10**400) | st.floats() | st.text(max_size=12)
    | st.sampled_from(["NaN", "Infinity", "-Infinity", "RAW", "SIMPLIFIED", "AAAA", "1e400", 1e308, -0.0]),
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=6), inner, max_size=4),
    max_leaves=40,
)


@FUZZ
@given(body=st.dictionaries(st.sampled_from(FIELD_NAMES), JSON_VALUES, max_size=4) | JSON_VALUES)
def test_fuzz_http_any_json(api: Api, body: Any) -> None:
    """Any JSON, shaped like a ClassifyRequest or not: 200, or a 400/404 whose violations say what is wrong."""
    status, answer, elapsed = api.post(json.dumps(body).encode())
    assert elapsed < PROMPT_S
    assert status in (200, 400, 404), (status, answer)
    if status == 400:
        violations = http_violations(answer)
        # Every violation names a field, but when the body as a whole is wrong, or the unknown key is "".
        assert violations and all(f or "body" in answer["error"]["message"] or d.startswith("is not a field of")
                                  for f, d in violations), answer


@FUZZ
@given(body=st.binary(max_size=600) | classify_cases().map(
    lambda c: json.dumps(json_format.MessageToDict(c.request)).encode()).flatmap(
    lambda b: st.integers(0, max(0, len(b) - 1)).map(lambda n: b[:n])))  # fmt: skip
def test_fuzz_http_raw_bytes(api: Api, body: bytes) -> None:
    """Bytes that are not JSON, and JSON cut short: a 400 that says so."""
    status, answer, elapsed = api.post(body)
    assert elapsed < PROMPT_S
    assert status == 400 and answer["error"]["status"] == "INVALID_ARGUMENT", answer
    assert http_violations(answer)


# --- explicit: messages over the size limits ------------------------------------------------------------------


def test_grpc_message_over_max_message_bytes_is_refused_by_grpc(api: Api, gw: RunningGateway) -> None:
    """Over max_message_bytes, gRPC itself answers RESOURCE_EXHAUSTED, on every method; the server stays up."""
    limit = gw.settings.max_message_bytes
    big_image = pb.ClassifyRequest(drawings=[pb.Drawing(image=pb.EncodedImage(data=bytes(limit + 1)))])
    out = api.call(api.classify, big_image)
    assert out.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in out.message
    n = limit // 784 + 1
    tensor = predict_pb2.PredictRequest()
    tensor.model_spec.name = "quickdraw"
    tensor.inputs["image"].dtype = types_pb2.DT_UINT8
    tensor.inputs["image"].tensor_content = bytes(784 * n)
    assert api.call(api.predict, tensor).code == grpc.StatusCode.RESOURCE_EXHAUSTED
    t0 = time.perf_counter()
    with pytest.raises(grpc.RpcError) as err:
        list(api.stream(iter([pb.ClassifyStreamRequest(id="big", request=big_image)]), timeout=DEADLINE_S))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.perf_counter() - t0 < PROMPT_LARGE_S
    api.healthy()
    # Under max_message_bytes but over max_image_bytes: our own refusal, naming the setting.
    image = pb.ClassifyRequest(drawings=[pb.Drawing(image=pb.EncodedImage(data=bytes(LIMITS.max_image_bytes + 1)))])
    out = api.call(api.classify, image)
    assert out.code == grpc.StatusCode.INVALID_ARGUMENT and out.fields == ["drawings[0].image.data"]
    assert f"max_image_bytes={LIMITS.max_image_bytes}" in out.violations[0][1]


def test_http_body_over_the_limit_is_413(api: Api, gw: RunningGateway) -> None:
    """A body over 4 x max_message_bytes is a 413, before it is parsed."""
    status, body, elapsed = api.post(b" " * (4 * gw.settings.max_message_bytes + 1))
    assert (status, body["error"]["status"]) == (413, "RESOURCE_EXHAUSTED") and elapsed < PROMPT_LARGE_S


def test_http_body_whose_protobuf_is_over_max_message_bytes_is_413_without_stalling_grpc(
    api: Api, gw: RunningGateway
) -> None:
    """A body under the JSON limit whose protobuf form gRPC would refuse: 413 too. Such bodies (millions of
    numbers) were parsed on the event loop that also serves gRPC: a 15 MB one stalled every call for 10 s."""
    limit = gw.settings.max_message_bytes
    n = 3_500_000  # two arrays of 3.5M ones: 14 MB of JSON, 28 MB of protobuf
    ones = ",".join(["1"] * n)
    body = f'{{"drawings": [{{"strokes": {{"strokes": [{{"x": [{ones}], "y": [{ones}]}}]}}}}]}}'.encode()
    assert len(body) < 4 * limit
    worst, stop = [0.0], threading.Event()

    def ping() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            api.healthy()
            worst[0] = max(worst[0], time.perf_counter() - t0)
            time.sleep(0.01)

    pinger = threading.Thread(target=ping)
    pinger.start()
    try:
        status, answer, elapsed = api.post(body)
    finally:
        stop.set()
        pinger.join()
    assert (status, answer["error"]["status"]) == (413, "RESOURCE_EXHAUSTED"), answer
    assert f"max_message_bytes={limit}" in answer["error"]["message"] and elapsed < PROMPT_LARGE_S
    assert worst[0] < 3.0, f"health checks waited up to {worst[0]:.2f}s while the body was parsed"
    # An image just over max_message_bytes as protobuf, well under the JSON limit: 413 as gRPC would answer.
    big = json.dumps(json_format.MessageToDict(pb.ClassifyRequest(
        drawings=[pb.Drawing(image=pb.EncodedImage(data=bytes(limit)))]))).encode()  # fmt: skip
    status, answer, _ = api.post(big)
    assert (status, answer["error"]["status"]) == (413, "RESOURCE_EXHAUSTED")


# --- explicit: decompression bombs ------------------------------------------------------------------------------


def _peak_rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux); else the growth measured is only a lower bound
    except OSError:
        pass


BOMBS = {
    "png-30000x30000": (bomb_png(30000, 30000), "max_image_pixels"),  # past Pillow's own guard (2 x 89 MPixel)
    "png-100000x100000": (bomb_png(100_000, 100_000), "max_image_pixels"),
    "png-10000x10000": (bomb_png(10000, 10000), "max_image_pixels"),  # between Pillow's warning and its error
    "png-5000x4000": (bomb_png(5000, 4000), "max_image_pixels"),  # under Pillow's guards: ours
    "png-20000x1": (bomb_png(20000, 1), "max_image_side_px"),
    "jpeg-65000x65000": (bomb_jpeg(65000, 65000), "max_image_pixels"),
    "jpeg-5000x5000": (bomb_jpeg(5000, 5000), "max_image_pixels"),
}


@pytest.mark.parametrize(("name", "data", "limit"), [(k, *v) for k, v in BOMBS.items()], ids=list(BOMBS))
def test_decompression_bombs_are_refused_fast_without_memory(api: Api, name: str, data: bytes, limit: str) -> None:
    """A small image whose header claims a huge size: INVALID_ARGUMENT naming the limit, at once, in no memory
    (decoding 30000x30000 would take 900 MB), on gRPC and over HTTP."""
    assert len(data) < 20_000
    req = pb.ClassifyRequest(drawings=[pb.Drawing(image=pb.EncodedImage(data=data))])
    _reset_peak_rss()
    before = _peak_rss_kib()
    out = api.call(api.classify, req)
    status, body, elapsed = api.post(json.dumps(json_format.MessageToDict(req)).encode())
    growth_mib = (_peak_rss_kib() - before) / 1024
    assert out.code == grpc.StatusCode.INVALID_ARGUMENT and out.fields == ["drawings[0].image.data"], out
    assert limit in out.violations[0][1], out.violations
    assert out.elapsed < 1.0 and elapsed < 1.0, (out.elapsed, elapsed)
    assert status == 400 and http_violations(body) == out.violations
    assert growth_mib < 32, f"{name}: peak RSS grew {growth_mib:.0f} MiB"


def test_largest_allowed_image_decodes_in_bounded_time_and_memory(api: Api) -> None:
    """A 2048x2048 PNG (exactly max_image_pixels) that compresses to a few KB: decoded, within its budget."""
    buf = io.BytesIO()
    Image.new("L", (2048, 2048), 255).save(buf, format="PNG", optimize=True)
    assert LIMITS.max_image_pixels == 2048 * 2048 and len(buf.getvalue()) < 100_000
    _reset_peak_rss()
    before = _peak_rss_kib()
    out = api.call(api.classify, pb.ClassifyRequest(drawings=[pb.Drawing(image=pb.EncodedImage(data=buf.getvalue()))]))
    growth_mib = (_peak_rss_kib() - before) / 1024
    assert out.code == grpc.StatusCode.OK and out.elapsed < PROMPT_S
    assert growth_mib < 256, f"peak RSS grew {growth_mib:.0f} MiB for a 4 MPixel image"


def test_image_refusals_are_stable(api: Api) -> None:
    """The same undecodable bytes get the same message each time (Pillow's named a BytesIO at a fresh address)."""
    req = pb.ClassifyRequest(drawings=[pb.Drawing(image=pb.EncodedImage(data=b"definitely not an image"))])
    first, second = api.call(api.classify, req), api.call(api.classify, req)
    assert first.code == grpc.StatusCode.INVALID_ARGUMENT and first.violations == second.violations
    assert first.message == second.message and " at 0x" not in first.message


# --- explicit: huge and degenerate stroke arrays, NaN and infinities -----------------------------------------------


def _strokes(*strokes: tuple[list[float], ...], raw: bool = False) -> pb.ClassifyRequest:
    """One drawing of strokes, each (x, y) or (x, y, t_ms)."""
    s = pb.Strokes(coordinates=pb.Strokes.RAW if raw else pb.Strokes.SIMPLIFIED)
    for stroke in strokes:
        s.strokes.add(x=stroke[0], y=stroke[1], t_ms=stroke[2] if len(stroke) > 2 else [])
    return pb.ClassifyRequest(drawings=[pb.Drawing(strokes=s)])


def _both(api: Api, req: pb.ClassifyRequest) -> Outcome:
    """The gRPC outcome, checked to be the JSON API's too."""
    out = api.call(api.classify, req)
    raw = json.dumps(json_format.MessageToDict(req)).encode()
    status, body, elapsed = api.post(raw)
    assert status == HTTP_STATUS[out.code] and elapsed < PROMPT_S, (status, body)
    if status >= 400:
        assert http_violations(body) == [(spelled(f, raw), d) for f, d in out.violations]
    return out


ZIGZAG = [float(v % 2) * 1e6 for v in range(LIMITS.max_points)], [v * 100.0 for v in range(LIMITS.max_points)]


@pytest.mark.parametrize(
    ("request_", "field", "needle"),
    [
        (_strokes(([1, 2, 3], [1, 2])), "drawings[0].strokes.strokes[0]", "x has 3 points but y has 2"),
        (_strokes(([], [], [1, 2, 3])), "drawings[0].strokes.strokes[0]", "t_ms has 3 values for 0 points"),
        (_strokes(([], []), ([], [])), "drawings[0].strokes.strokes", "drawing is empty"),
        (_strokes(([1] * 5000, [1] * 5000), ([2] * 3193, [2] * 3193)), "drawings[0].strokes.strokes",
         "8193 points in all, over the limit of max_points=8192"),
        (_strokes(*[([1], [1])] * 257), "drawings[0].strokes.strokes", "max_strokes=256"),
        (_strokes(([0, 256], [0, 0])), "drawings[0].strokes.strokes[0].x[1]", "outside 0..255"),
        (_strokes(([0, -1e-3], [0, 0])), "drawings[0].strokes.strokes[0].x[1]", "outside 0..255"),
        (_strokes(([0, 0], [0, 2e6]), raw=True), "drawings[0].strokes.strokes[0].y[1]", "outside -1e+06..1e+06"),
        (_strokes(([0, 0], [0, -3.4e38]), raw=True), "drawings[0].strokes.strokes[0].y[1]", "outside"),
    ],
    ids=["x-y-lengths", "only-t_ms", "zero-length-only", "max_points", "max_strokes", "simplified-256",
         "simplified-negative", "raw-2e6", "raw-float32-min"],
)  # fmt: skip
def test_degenerate_strokes_name_their_field(api: Api, request_: pb.ClassifyRequest, field: str, needle: str) -> None:
    out = _both(api, request_)
    assert out.code == grpc.StatusCode.INVALID_ARGUMENT and out.fields == [field], out
    assert needle in out.violations[0][1] and out.elapsed < PROMPT_S


@pytest.mark.parametrize(
    "request_",
    [
        _strokes(([100], [100])),
        _strokes(([100], [100]), raw=True),
        _strokes(([5.5] * 50, [7.25] * 50)),
        _strokes(([-3e5] * 50, [4e5] * 50, list(range(50))), raw=True),
        _strokes(([], []), ([1, 2], [1, 2]), ([], [])),
        _strokes(([0, 1e-45], [0, 0]), raw=True),
        _strokes(([-1e6, 1e6], [1e6, -1e6]), raw=True),
        _strokes(([0, 255] * 4096, [0, 255] * 4096)),
        _strokes(ZIGZAG, raw=True),
    ],
    ids=["one-point", "one-point-raw", "identical-points", "identical-raw-timed", "zero-length-between",
         "raw-extent-1e-45", "raw-extremes", "8192-point-zigzag", "8192-point-raw-zigzag"],
)  # fmt: skip
def test_degenerate_but_valid_strokes_are_classified(api: Api, request_: pb.ClassifyRequest) -> None:
    """Valid however odd: one point, all points the same, a subnormal extent, the corners of the raw range,
    and 8,192 points zigzagging across the canvas (RDP over the 2 million resampled points took 47 s)."""
    out = _both(api, request_)
    assert out.code == grpc.StatusCode.OK and out.elapsed < 3.0, out


def test_a_million_points(api: Api) -> None:
    """A million points: gRPC refuses the 8 MB message itself; 450,000 points (3.6 MB) reach validation and get
    max_points at once; over HTTP the million is a 413, as its protobuf form is over max_message_bytes."""
    million = [1.0] * 1_000_000
    assert api.call(api.classify, _strokes((million, million))).code == grpc.StatusCode.RESOURCE_EXHAUSTED
    out = api.call(api.classify, _strokes((million[:450_000], million[:450_000])))
    assert out.code == grpc.StatusCode.INVALID_ARGUMENT and out.fields == ["drawings[0].strokes.strokes"]
    assert "450000 points in all" in out.violations[0][1] and out.elapsed < 2.0
    out = api.call(api.classify, _strokes((million[:900_000], [])))
    assert out.code == grpc.StatusCode.INVALID_ARGUMENT and out.fields == ["drawings[0].strokes.strokes[0]"]
    status, body, elapsed = api.post(json.dumps({"drawings": [{"strokes": {"strokes": [{"x": million,
                                                                                        "y": million}]}}]}).encode())
    assert (status, body["error"]["status"]) == (413, "RESOURCE_EXHAUSTED") and elapsed < PROMPT_LARGE_S


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("axis", ["x", "y", "t_ms"])
@pytest.mark.parametrize("raw", [False, True], ids=["simplified", "raw"])
def test_nan_and_inf_name_the_value(api: Api, value: float, axis: str, raw: bool) -> None:
    stroke = {"x": [1.0, 2.0, 3.0], "y": [1.0, 2.0, 3.0], "t_ms": [0.0, 10.0, 20.0]}
    stroke[axis][2] = value
    out = _both(api, _strokes((stroke["x"], stroke["y"]), (stroke["x"], stroke["y"], stroke["t_ms"]), raw=raw))
    field = f"drawings[0].strokes.strokes[{0 if axis != 't_ms' else 1}].{axis}[2]"
    assert out.code == grpc.StatusCode.INVALID_ARGUMENT and out.fields == [field], out
    assert "finite" in out.violations[0][1]


def test_rendering_stops_at_the_callers_deadline(api: Api) -> None:
    """Valid but slow: 30 drawings of 8,192 points take ~5 s to render. Past the caller's deadline the rest is
    not rendered, so the preprocessing threads are free again at once, not seconds later."""
    rng = np.random.default_rng(0)
    heavy = pb.ClassifyRequest()
    for _ in range(30):
        xy = rng.uniform(0, 255, (2, 8192))
        heavy.drawings.add().strokes.strokes.add(x=xy[0].tolist(), y=xy[1].tolist())
    with ThreadPoolExecutor(2) as pool:  # two at once: both preprocessing threads
        outs = list(pool.map(lambda _: api.call(api.classify, heavy, timeout=1.0), range(2)))
    assert all(o.code == grpc.StatusCode.DEADLINE_EXCEEDED and o.elapsed < 2.0 for o in outs), outs
    t0 = time.perf_counter()
    small = api.call(api.classify, _strokes(([10, 200], [10, 200])))
    assert small.code == grpc.StatusCode.OK and time.perf_counter() - t0 < 3.0, small  # was ~4.4 s


# --- explicit: negative and absurd sizes -----------------------------------------------------------------------


BITMAP = pb.Drawing(bitmap=pb.Bitmap(pixels=bytes(784)))


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative numbers go on the wire as 10-byte two's complement
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def test_absurd_sizes(api: Api) -> None:
    """top_k and versions at the ends of their types (a -1 through wire bytes too), bitmaps one byte off."""
    for top_k in (LIMITS.max_top_k + 1, 2**31, 2**32 - 1):
        out = api.call(api.classify, pb.ClassifyRequest(drawings=[BITMAP], top_k=top_k))
        assert out.code == grpc.StatusCode.INVALID_ARGUMENT and out.fields == ["top_k"], out
    drawing = BITMAP.SerializeToString()
    body = b"\x0a" + _varint(len(drawing)) + drawing
    out = api.call(api.classify_raw, body + b"\x10" + _varint(-1))  # top_k = -1: uint32 keeps 4294967295
    assert out.code == grpc.StatusCode.INVALID_ARGUMENT and out.fields == ["top_k"] and "4294967295" in out.message
    for version in (-1, -(2**63), 2**63 - 1, api.version + 1):
        out = api.call(api.classify, pb.ClassifyRequest(drawings=[BITMAP], model=pb.ModelSpec(version=version)))
        assert out.code == grpc.StatusCode.NOT_FOUND and f"version {version} is not served" in out.message
    model = b"\x08" + _varint(-5)
    out = api.call(api.classify_raw, body + b"\x1a" + _varint(len(model)) + model)
    assert out.code == grpc.StatusCode.NOT_FOUND and "version -5" in out.message
    for size in (783, 785, 0, 784 * 2):
        out = _both(api, pb.ClassifyRequest(drawings=[pb.Drawing(bitmap=pb.Bitmap(pixels=bytes(size)))]))
        assert out.fields == ["drawings[0].bitmap.pixels"] and f"got {size}" in out.violations[0][1]
    many = pb.ClassifyRequest(drawings=[BITMAP] * (LIMITS.max_drawings_per_request + 1))
    out = _both(api, many)
    assert out.fields == ["drawings"] and "max_drawings_per_request=256" in out.violations[0][1]
    out = _both(api, pb.ClassifyRequest(drawings=[pb.Drawing(strokes=pb.Strokes(coordinates=7, strokes=[
        pb.Stroke(x=[1], y=[1])]))]))  # fmt: skip
    assert out.fields == ["drawings[0].strokes.coordinates"] and "is 7" in out.violations[0][1]


@pytest.mark.parametrize(
    ("dims", "field"),
    [
        ([-1, 28, 28, 1], "inputs[image].tensor_shape.dim[0]"),
        ([0, 28, 28, 1], "inputs[image].tensor_shape.dim[0]"),
        ([2**40, 28, 28, 1], "inputs[image].tensor_shape.dim[0]"),
        ([2**63 - 1, 28, 28, 1], "inputs[image].tensor_shape.dim[0]"),
        ([2**62, 2**62, 28, 1], "inputs[image].tensor_shape"),
        ([1, 28, 28, -1], "inputs[image].tensor_shape"),
        ([1, 784], "inputs[image].tensor_shape"),
        ([], "inputs[image].tensor_shape"),
    ],
)
def test_predict_tensor_shapes_negative_or_enormous(api: Api, dims: list[int], field: str) -> None:
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "quickdraw"
    t = req.inputs["image"]
    t.dtype = types_pb2.DT_UINT8
    for d in dims:
        t.tensor_shape.dim.add(size=d)
    t.tensor_content = bytes(784)
    out = api.call(api.predict, req)
    assert out.code == grpc.StatusCode.INVALID_ARGUMENT and out.fields == [field], out


def test_predict_int_val_outside_uint8(api: Api) -> None:
    """int_val carries uint8 as int32: 300 and -1 are refused, naming the value (-1 broadcast was an INTERNAL
    OverflowError, 300 was silently wrapped to 44; a single value is now refused before its range is looked at)."""
    for values, name in (([300] + [0] * 783, "inputs[image].int_val[0]"), ([-1], "inputs[image].int_val"),
                         ([0] * 500 + [2**31 - 1] + [0] * 283, "inputs[image].int_val[500]")):  # fmt: skip
        req = predict_pb2.PredictRequest()
        req.model_spec.name = "quickdraw"
        t = req.inputs["image"]
        t.dtype = types_pb2.DT_UINT8
        for d in (1, 28, 28, 1):
            t.tensor_shape.dim.add(size=d)
        t.int_val.extend(values)
        out = api.call(api.predict, req)
        assert out.code == grpc.StatusCode.INVALID_ARGUMENT and out.fields == [name], out


def test_predict_broadcast_single_value_is_refused(api: Api) -> None:
    """TF Serving broadcasts one int_val over the shape: 63 bytes asked for 256 drawings' work. The gateway
    refuses it, naming the field, and says to send every value."""
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "quickdraw"
    t = req.inputs["image"]
    t.dtype = types_pb2.DT_UINT8
    for d in (256, 28, 28, 1):
        t.tensor_shape.dim.add(size=d)
    t.int_val.append(7)
    assert req.ByteSize() < 64
    out = api.call(api.predict, req)
    assert out.code == grpc.StatusCode.INVALID_ARGUMENT and out.fields == ["inputs[image].int_val"], out
    assert "does not broadcast" in out.message and out.elapsed < 0.5


@pytest.mark.parametrize(
    ("dims", "values", "field"),
    [([2**32, 2**32], [], "tensor_shape"), ([2**62, 4, 4], [1], "tensor_shape"), ([3, -2], [], "tensor_shape"),
     ([2**20, 2**20], [7], "tensor_shape"), ([2, 2], [1, 2, 3], "int_val"), ([2, 2], [1, 2, 256, 3], "int_val[2]")],
)  # fmt: skip
def test_to_numpy_shapes_that_overflow(dims: list[int], values: list[int], field: str) -> None:
    """numpy's int64 product of [2**32, 2**32] wraps to 0, which matched an empty tensor and crashed reshape
    (a ValueError, so an INTERNAL); a broadcast single value would fill any shape, however large."""
    from tensorflow.core.framework import tensor_pb2

    t = tensor_pb2.TensorProto(dtype=types_pb2.DT_UINT8)
    for d in dims:
        t.tensor_shape.dim.add(size=d)
    t.int_val.extend(values)
    with pytest.raises(TensorDecodeError) as err:
        to_numpy(t)
    assert err.value.field == field


# --- explicit: undecodable protobuf ---------------------------------------------------------------------------


GARBAGE = [b"\xff", b"\xff\xff\xff\xff", b"\x0a", b"\x0a\x05\x0a", b"\x0a\xff\xff\xff\xff\x0f", b"\x07", b"\x00",
           bytes(range(256))]  # fmt: skip


@pytest.mark.parametrize("data", GARBAGE, ids=[f"g{i}" for i in range(len(GARBAGE))])
def test_undecodable_protobuf_is_invalid_argument(api: Api, data: bytes) -> None:
    """Bytes protobuf cannot parse, as the body of Classify, Predict and ClassifyStream.

    The gateway takes these methods' requests as bytes (it counts drawings and strokes on the wire before
    parsing), so it parses them itself: bytes that are not a message get INVALID_ARGUMENT naming the wire
    format (grpc-python's own deserializer answered UNKNOWN). A stream message gets its answer on the stream,
    which stays open. The server stays up and healthy.
    """
    for parse in (pb.ClassifyRequest.FromString, pb.ClassifyStreamRequest.FromString,
                  predict_pb2.PredictRequest.FromString):  # fmt: skip
        with pytest.raises(DecodeError):
            parse(data)
    for method in (api.classify_raw, api.predict_raw):
        out = api.call(method, data)
        assert out.code == grpc.StatusCode.INVALID_ARGUMENT and "wire format" in out.message, out
        assert out.elapsed < PROMPT_S
    answers = [pb.ClassifyStreamResponse.FromString(a) for a in api.stream_raw(iter([data]), timeout=DEADLINE_S)]
    assert len(answers) == 1 and answers[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], answers
    api.healthy()


def test_truncated_protobuf(api: Api) -> None:
    """A valid request cut mid-field does not parse (INVALID_ARGUMENT, as above); cut between fields it is a
    shorter valid message, answered as such."""
    full = pb.ClassifyRequest(drawings=[BITMAP, BITMAP], top_k=5).SerializeToString()
    one = len(BITMAP.SerializeToString()) + 3  # the first drawing with its tag and length
    assert api.call(api.classify_raw, full[:10]).code == grpc.StatusCode.INVALID_ARGUMENT
    out = api.call(api.classify_raw, full[:one])
    assert out.code == grpc.StatusCode.OK and len(pb.ClassifyResponse.FromString(out.response).predictions) == 1


# --- explicit: JSON that json_format chokes on -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field", "needle"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "", "nests arrays or objects too deeply"),
        (b'{"drawings": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "", "nests arrays or objects too deeply"),
        (b'{"drawings": [{"strokes": {"strokes": [{"x": [1' + b"0" * 400 + b'], "y": [1]}]}}]}',
         "drawings[0].strokes.strokes[0].x[0]", "out of range"),
        (b'{"drawings": [{"strokes": {"coordinates": 1e400}}]}', "drawings[0].strokes.coordinates", "out of range"),
        (b'{"drawings": [{"strokes": {"strokes": [{"x": [NaN], "y": [1]}]}}]}',
         "drawings[0].strokes.strokes[0].x[0]", "NaN"),
        (b'{"drawings": [{"strokes": {"strokes": [{"x": ["1", "2"], "y": [1]}]}}]}',
         "drawings[0].strokes.strokes[0]", "x has 2 points but y has 1"),
        (b'{"drawings": [{"strokes": {"strokes": [{"x": [1e39], "y": [1]}]}}]}',
         "drawings[0].strokes.strokes[0].x[0]", "is out of range for a float"),
        (b'{"drawings": [' + b"{}," * 600 + b"{}]}", "drawings", "601 drawings"),
        (b'{"drawings": {"a field: b": 1}}', "drawings", "expected an array of objects"),
        (b'{"\\n": 1}', "\n", "is not a field of quickdraw.v1.ClassifyRequest"),
        (b'{"drawings": [{"strokes": {"strokes": [{"x": ["' + b"z" * 5000 + b'"], "y": [1]}]}}]}',
         "drawings[0].strokes.strokes[0].x[0]", 'got the string "zzz'),
    ],
    ids=["nested-array", "nested-in-field", "400-digit-int", "enum-1e400", "NaN-literal", "quoted-numbers",
         "float32-overflow", "601-drawings",
         "object-for-list", "newline-key", "5000-char-word"],
)  # fmt: skip
def test_json_that_json_format_chokes_on(api: Api, body: bytes, field: str, needle: str) -> None:
    """Each was a 500 (RecursionError, OverflowError) or parsed on the event loop; now a 400 naming the field."""
    status, answer, elapsed = api.post(body)
    assert status == 400 and elapsed < PROMPT_S, answer
    [(got, description)] = http_violations(answer)
    assert got == field and needle in description, (got, description)
    assert len(description) <= 300  # the value is quoted clipped, however long
