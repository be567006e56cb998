"""The gateway end to end: the real gRPC server on free ports, the shipped SavedModel, the public client.

Covers every input kind, probabilities equal to the offline model's whatever the batch, streaming, merged
batches seen through /metrics, every validation error with its field violation, NOT_FOUND versions, a full
queue, health and reflection, and the metrics exposed.
"""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.rpc import code_pb2, error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from harness import SHIPPED_MODEL, RunningGateway
from PIL import Image

from doodle.formats import open_bitmaps, read_ndjson
from quickdraw_client.v1 import classifier_pb2 as pb
from service.backends import find_versions
from service.backends.embedded import EmbeddedBackend
from service.client import QuickDrawClient, to_drawing

pytestmark = pytest.mark.skipif(
    not find_versions(SHIPPED_MODEL), reason=f"no SavedModel under {SHIPPED_MODEL} (the shipped model is missing)"
)


@pytest.fixture(scope="module")
def standin() -> Iterator[object]:
    """The TF Serving stand-in (tests/tfserving_standin.py) serving the shipped model."""
    from tfserving_standin import TFServingStandIn

    with TFServingStandIn(SHIPPED_MODEL) as s:
        yield s


@pytest.fixture(scope="module", params=["embedded", "tfserving"])
def gateway(request: pytest.FixtureRequest) -> Iterator[RunningGateway]:
    """The gateway on each backend: every test that uses it runs against both."""
    settings: dict[str, object] = {"max_top_k": 400, "max_batch_delay_ms": 2.0}
    if request.param == "tfserving":
        standin = request.getfixturevalue("standin")
        settings |= {"backend": "tfserving", "tfserving_target": standin.target, "max_concurrent_batches": 4}
    with RunningGateway(**settings) as gw:
        yield gw


@pytest.fixture(scope="module")
def client(gateway: RunningGateway) -> Iterator[QuickDrawClient]:
    with QuickDrawClient(gateway.target, timeout_s=30) as c:
        yield c


@pytest.fixture(scope="module")
def offline() -> tuple[object, list[str]]:
    """The shipped SavedModel loaded directly with TensorFlow, as ``quickdraw predict`` does."""
    import tensorflow as tf

    version = find_versions(SHIPPED_MODEL)[-1]
    loaded = tf.saved_model.load(str(SHIPPED_MODEL / str(version)))
    labels = (SHIPPED_MODEL / str(version) / "assets" / "labels.txt").read_text().splitlines()
    return loaded, labels


def offline_probs(offline: tuple[object, list[str]], images: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    loaded, _ = offline
    out = loaded.signatures["serving_default"](image=tf.constant(images.reshape(-1, 28, 28, 1)))  # type: ignore[attr-defined]
    return out["probabilities"].numpy()


def full_probs(resp: pb.ClassifyResponse, n_classes: int) -> np.ndarray:
    out = np.zeros((len(resp.predictions), n_classes), np.float32)
    for i, p in enumerate(resp.predictions):
        for s in p.top:
            out[i, s.index] = s.score
    return out


def bad_request(err: grpc.RpcError) -> list[tuple[str, str]]:
    status = rpc_status.from_call(err)
    assert status is not None, "no rich status on the error"
    out = []
    for detail in status.details:
        br = error_details_pb2.BadRequest()
        assert detail.Unpack(br)
        out += [(v.field, v.description) for v in br.field_violations]
    return out


def invalid(client: QuickDrawClient, req: pb.ClassifyRequest) -> list[tuple[str, str]]:
    with pytest.raises(grpc.RpcError) as info:
        client.classify_request(req)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    return bad_request(info.value)


def cat_bitmaps(sample: Path, n: int = 25) -> np.ndarray:
    return np.asarray(open_bitmaps(sample / "numpy_bitmap" / "cat.npy")[:n]).reshape(n, 28, 28)


# --- every input kind -----------------------------------------------------------------------------------------


def test_model_info(gateway: RunningGateway, client: QuickDrawClient) -> None:
    info = client.model_info()
    assert info.name == "quickdraw" and info.backend == gateway.settings.backend
    assert list(info.versions) == [find_versions(SHIPPED_MODEL)[-1]] == [info.default_version]
    assert len(info.labels) == 29 and "cat" in info.labels
    assert set(info.input_kinds) == {"bitmap", "image", "strokes"}
    assert info.limits.max_drawings_per_request == 256 and info.limits.max_message_bytes == 4 * 1024 * 1024


def test_bitmaps_match_the_offline_model_whatever_the_batch(
    client: QuickDrawClient, sample: Path, offline: tuple[object, list[str]]
) -> None:
    images = cat_bitmaps(sample, 40)
    expected = offline_probs(offline, images)
    n_classes = expected.shape[1]
    # The same drawings alone, in one call of 40, and in concurrent calls of assorted sizes.
    together = full_probs(client.classify_request(client.request(list(images), top_k=n_classes)), n_classes)
    with ThreadPoolExecutor(8) as pool:
        alone = list(pool.map(lambda im: client.classify_request(client.request([im], top_k=n_classes)), images))
        chunks = list(pool.map(
            lambda s: client.classify_request(client.request(list(images[s:s + 7]), top_k=n_classes)),
            range(0, 40, 7),
        ))  # fmt: skip
    alone_probs = np.concatenate([full_probs(r, n_classes) for r in alone])
    chunk_probs = np.concatenate([full_probs(r, n_classes) for r in chunks])
    for got in (together, alone_probs, chunk_probs):
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    result = client.classify(list(images[:1]))[0]
    assert result.model_version == find_versions(SHIPPED_MODEL)[-1]
    assert len(result.top) == 3 and result.top[0][1] >= result.top[1][1] >= result.top[2][1]


def test_simplified_strokes_first_25_cats(client: QuickDrawClient, sample: Path) -> None:
    drawings = list(read_ndjson(sample / "simplified" / "cat.ndjson", limit=25))
    results = client.classify([d.google_strokes() for d in drawings])
    top1 = [r.top[0][0] for r in results]
    assert top1.count("cat") >= 18, top1


def test_strokes_render_as_the_bitmap_file(
    client: QuickDrawClient, sample: Path, offline: tuple[object, list[str]]
) -> None:
    """Line i of simplified/cat.ndjson is row i of numpy_bitmap/cat.npy: the gateway's answers agree."""
    drawings = list(read_ndjson(sample / "simplified" / "cat.ndjson", limit=10))
    via_strokes = client.classify([d.google_strokes() for d in drawings])
    via_bitmaps = client.classify(list(cat_bitmaps(sample, 10)))
    agree = sum(a.top[0][0] == b.top[0][0] for a, b in zip(via_strokes, via_bitmaps, strict=True))
    assert agree >= 9


def test_raw_strokes_are_normalised_server_side(client: QuickDrawClient, sample: Path) -> None:
    """Raw drawings sent as RAW get the answers of Google's own simplified version of the same drawing.

    The raw and simplified sample files share key_ids; none of the raw classes is among the model's 29,
    so this compares the gateway's normalisation with Google's rather than checking the label.
    """
    pairs = []
    for path in sorted((sample / "raw").glob("*.ndjson")):
        if not (sample / "simplified" / path.name).exists():
            continue
        simplified = {d.key_id: d for d in read_ndjson(sample / "simplified" / path.name)}
        pairs += [(r, simplified[r.key_id]) for r in read_ndjson(path, limit=15) if r.key_id in simplified]
    assert len(pairs) >= 50
    assert all(r.raw and not s.raw for r, s in pairs)
    via_raw, via_google = [], []
    for i in range(0, len(pairs), 100):
        via_raw += client.classify([r.google_strokes() for r, _ in pairs[i : i + 100]], raw=True)
        via_google += client.classify([s.google_strokes() for _, s in pairs[i : i + 100]])
    agree = sum(a.top[0][0] == b.top[0][0] for a, b in zip(via_raw, via_google, strict=True))
    assert agree / len(pairs) >= 0.9, (agree, len(pairs))


def test_png_and_jpeg_images(client: QuickDrawClient, sample: Path) -> None:
    bitmaps = cat_bitmaps(sample, 8)
    expected = [r.top[0][0] for r in client.classify(list(bitmaps))]
    images = []
    for i, b in enumerate(bitmaps):
        # What a phone sends: a large, dark-on-white image.
        img = Image.fromarray(255 - b).resize((280, 280), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="PNG" if i % 2 else "JPEG", quality=95)
        images.append(buf.getvalue())
    got = [r.top[0][0] for r in client.classify(images)]
    assert sum(a == b for a, b in zip(got, expected, strict=True)) >= 7, (got, expected)


def test_mixed_kinds_in_one_call_keep_their_order(client: QuickDrawClient, sample: Path) -> None:
    bitmap = cat_bitmaps(sample, 1)[0]
    strokes = next(read_ndjson(sample / "simplified" / "cat.ndjson")).google_strokes()
    req = pb.ClassifyRequest(drawings=[to_drawing(bitmap), to_drawing(strokes), to_drawing(bitmap)], top_k=2)
    resp = client.classify_request(req)
    assert len(resp.predictions) == 3
    assert resp.predictions[0] == resp.predictions[2]


# --- streaming ----------------------------------------------------------------------------------------------


def test_stream_answers_every_id_once_with_per_message_errors(client: QuickDrawClient, sample: Path) -> None:
    images = cat_bitmaps(sample, 30)
    msgs = []
    for i, im in enumerate(images):
        req = client.request([im], top_k=3) if i % 10 else pb.ClassifyRequest(top_k=3)  # every 10th is empty
        msgs.append((f"id-{i}", req))
    answers = list(client.stream(msgs, timeout_s=60))
    assert sorted(a.id for a in answers) == sorted(i for i, _ in msgs)
    for a in answers:
        n = int(a.id.split("-")[1])
        if n % 10 == 0:
            assert a.WhichOneof("result") == "error"
            assert a.error.code == code_pb2.INVALID_ARGUMENT
            br = error_details_pb2.BadRequest()
            assert a.error.details[0].Unpack(br)
            assert br.field_violations[0].field == "drawings"
        else:
            assert a.WhichOneof("result") == "response"
            assert len(a.response.predictions) == 1


# --- validation ---------------------------------------------------------------------------------------------


def test_wrong_bitmap_size(client: QuickDrawClient) -> None:
    v = invalid(client, pb.ClassifyRequest(drawings=[pb.Drawing(bitmap=pb.Bitmap(pixels=bytes(100)))]))
    assert v == [("drawings[0].bitmap.pixels", "must be 784 bytes (28x28 uint8, row-major), got 100")]


def test_no_drawings_and_unset_drawing(client: QuickDrawClient) -> None:
    assert invalid(client, pb.ClassifyRequest())[0][0] == "drawings"
    v = invalid(client, pb.ClassifyRequest(drawings=[pb.Drawing()]))
    assert v == [("drawings[0]", "exactly one of bitmap, image or strokes must be set")]


def test_empty_drawing(client: QuickDrawClient) -> None:
    v = invalid(client, client.request([[[[], []]]]))
    assert v == [("drawings[0].strokes.strokes", "drawing is empty: no points in any stroke")]


def test_too_many_strokes_and_points(client: QuickDrawClient) -> None:
    many_strokes = [[[1, 2], [1, 2]]] * 257
    [(field, desc)] = invalid(client, client.request([many_strokes]))
    assert field == "drawings[0].strokes.strokes" and "max_strokes=256" in desc
    many_points = [[list(range(100)) * 90, [5] * 9000]]
    [(field, desc)] = invalid(client, client.request([many_points]))
    assert field == "drawings[0].strokes.strokes" and "9000 points" in desc and "max_points=8192" in desc


def test_coordinates_out_of_range(client: QuickDrawClient) -> None:
    [(field, desc)] = invalid(client, client.request([[[[0, 10], [0, 10]], [[5, 300], [5, 6]]]]))
    assert field == "drawings[0].strokes.strokes[1].x[1]" and "0..255" in desc
    [(field, desc)] = invalid(client, client.request([[[[0, 2e7], [0, 1]]]], raw=True))
    assert field == "drawings[0].strokes.strokes[0].x[1]" and "1e+06" in desc
    [(field, desc)] = invalid(client, client.request([[[[0, 1, 2], [0, 1]]]]))
    assert field == "drawings[0].strokes.strokes[0]" and "must match" in desc


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf(client: QuickDrawClient, value: float) -> None:
    [(field, desc)] = invalid(client, client.request([[[[0, 10], [0, value]]]], raw=True))
    assert field == "drawings[0].strokes.strokes[0].y[1]" and "finite" in desc


def test_undecodable_and_oversized_images(client: QuickDrawClient) -> None:
    [(field, desc)] = invalid(client, client.request([b"not an image at all"]))
    assert field == "drawings[0].image.data"
    big = Image.new("L", (5000, 5000), 255)
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    [(field, desc)] = invalid(client, client.request([buf.getvalue()]))
    assert field == "drawings[0].image.data" and "pixel" in desc
    [(field, desc)] = invalid(client, client.request([b"\x89PNG" + bytes(3 * 1024 * 1024)]))
    assert field == "drawings[0].image.data" and "max_image_bytes=2097152" in desc


def test_top_k_out_of_range(client: QuickDrawClient) -> None:
    bitmap = np.zeros((28, 28), np.uint8)
    [(field, desc)] = invalid(client, client.request([bitmap], top_k=30))
    assert field == "top_k" and "1..29" in desc


def test_too_many_drawings(client: QuickDrawClient) -> None:
    [(field, desc)] = invalid(client, client.request([np.zeros((28, 28), np.uint8)] * 257))
    assert field == "drawings" and "max_drawings_per_request=256" in desc


def test_all_violations_are_reported_together(client: QuickDrawClient) -> None:
    req = pb.ClassifyRequest(drawings=[pb.Drawing(bitmap=pb.Bitmap(pixels=b"x")), pb.Drawing()], top_k=1000)
    fields = [f for f, _ in invalid(client, req)]
    assert fields == ["drawings[0].bitmap.pixels", "drawings[1]", "top_k"]


def test_message_too_large(client: QuickDrawClient) -> None:
    with pytest.raises(grpc.RpcError) as info:
        client.classify([b"\x89PNG" + bytes(5 * 1024 * 1024)])
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_unknown_version_is_not_found(client: QuickDrawClient) -> None:
    with pytest.raises(grpc.RpcError) as info:
        client.classify([np.zeros((28, 28), np.uint8)], version=999)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "version 999" in info.value.details()


# --- batching, queue, metrics -----------------------------------------------------------------------------------


def test_concurrent_calls_merge_into_one_batch_seen_in_metrics(sample: Path) -> None:
    images = cat_bitmaps(sample, 16)
    with RunningGateway(max_batch_delay_ms=500, max_concurrent_batches=1, warmup=False) as gw:
        before = gw.scrape()
        with QuickDrawClient(gw.target) as c:
            barrier = threading.Barrier(16)

            def one(im: np.ndarray) -> str:
                barrier.wait()
                return c.classify([im])[0].top[0][0]

            with ThreadPoolExecutor(16) as pool:
                labels = list(pool.map(one, images))
        after = gw.scrape()
    assert len(labels) == 16
    batches = after["quickdraw_batch_size_drawings_count"] - before.get("quickdraw_batch_size_drawings_count", 0)
    drawings = after["quickdraw_batch_size_drawings_sum"] - before.get("quickdraw_batch_size_drawings_sum", 0)
    assert drawings == 16
    assert batches <= 2, f"16 concurrent calls took {batches} backend batches"
    assert after['quickdraw_batch_size_drawings_bucket{le="4.0"}'] == before.get(
        'quickdraw_batch_size_drawings_bucket{le="4.0"}', 0
    )  # no small batches at all


class _GatedBackend(EmbeddedBackend):
    """The real embedded backend, with a gate that holds batches (and optionally loading) until a test opens it."""

    def __init__(self, *args: object, hold_loading: bool = False, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.gate = threading.Event()
        self.loading_gate = threading.Event()
        if not hold_loading:
            self.loading_gate.set()
        self.batches: list[int] = []

    def _load(self):  # type: ignore[no-untyped-def]
        self.loading_gate.wait(60)
        return super()._load()

    def _run(self, images, version):  # type: ignore[no-untyped-def]
        self.gate.wait(60)
        self.batches.append(len(images))
        return super()._run(images, version)


def gated(hold_loading: bool = False) -> tuple[list[_GatedBackend], object]:
    made: list[_GatedBackend] = []

    def factory(settings):  # type: ignore[no-untyped-def]
        b = _GatedBackend(settings.model_dir, settings.model_name, max_batch_size=settings.max_batch_size,
                          concurrency=settings.max_concurrent_batches, warmup=False, hold_loading=hold_loading)
        made.append(b)
        return b

    return made, factory


def test_full_queue_is_refused_at_once(sample: Path) -> None:
    made, factory = gated()
    images = cat_bitmaps(sample, 8)
    with RunningGateway(factory, max_queued_drawings=4, max_drawings_per_request=4,
                        max_queue_wait_ms=0, max_concurrent_batches=1) as gw, \
            QuickDrawClient(gw.target) as c, ThreadPoolExecutor(4) as pool:
        first = pool.submit(c.classify, [images[0]])  # dispatched, held at the gate
        while not gw.app.metrics.batches_in_flight:
            threading.Event().wait(0.01)
        queued = pool.submit(c.classify, list(images[1:5]))  # fills the queue (4 drawings)
        while gw.scrape().get("quickdraw_queue_depth_drawings", 0) < 4:
            threading.Event().wait(0.01)
        with pytest.raises(grpc.RpcError) as info:
            c.classify([images[5]], timeout_s=5)
        made[0].gate.set()
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_queued_drawings=4" in info.value.details()
        assert len(first.result(30)) == 1 and len(queued.result(30)) == 4  # the accepted calls are answered
        assert gw.scrape()["quickdraw_rejected_requests_total"] == 1


def test_expired_calls_never_reach_the_backend(sample: Path) -> None:
    made, factory = gated()
    images = cat_bitmaps(sample, 3)
    with RunningGateway(factory, max_concurrent_batches=1) as gw, QuickDrawClient(gw.target) as c, \
            ThreadPoolExecutor(2) as pool:
        first = pool.submit(c.classify, [images[0]])
        while not gw.app.metrics.batches_in_flight:
            threading.Event().wait(0.01)
        with pytest.raises(grpc.RpcError) as info:
            c.classify(list(images[1:3]), timeout_s=0.3)  # queued behind the held batch; its deadline passes
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        made[0].gate.set()
        first.result(30)
        deadline = asyncio.run_coroutine_threadsafe(asyncio.sleep(0.2), gw.loop)
        deadline.result(5)
        c.classify([images[0]])  # the collector has moved past the expired item
        assert made[0].batches == [1, 1]  # the two expired drawings were never run
        m = gw.scrape()
        # Whichever fires first (our deadline timer or gRPC cancelling the handler at the deadline), the two
        # drawings are dropped unrun and counted once.
        dropped = m['quickdraw_dropped_drawings_total{reason="deadline"}'] + m.get(
            'quickdraw_dropped_drawings_total{reason="cancelled"}', 0
        )
        assert dropped == 2


# --- health, reflection, metrics -----------------------------------------------------------------------------


def health_status(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_is_serving_only_once_loaded_and_warmed(sample: Path) -> None:
    made, factory = gated(hold_loading=True)
    gw = RunningGateway(factory).start_async()
    try:
        while not gw.app.grpc_port:
            threading.Event().wait(0.01)
        assert health_status(gw.target) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert health_status(gw.target, "quickdraw.v1.Classifier") == health_pb2.HealthCheckResponse.NOT_SERVING
        # liveness: the process serves, so a liveness probe must not restart it while the model loads
        assert health_status(gw.target, "liveness") == health_pb2.HealthCheckResponse.SERVING
        with QuickDrawClient(gw.target, max_attempts=1) as c, pytest.raises(grpc.RpcError) as info:
            c.classify([np.zeros((28, 28), np.uint8)])
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        while not made:
            threading.Event().wait(0.01)
        made[0].loading_gate.set()
        made[0].gate.set()
        gw.started.result(60)  # type: ignore[union-attr]
        assert health_status(gw.target) == health_pb2.HealthCheckResponse.SERVING
        assert health_status(gw.target, "quickdraw.v1.Classifier") == health_pb2.HealthCheckResponse.SERVING
        assert gw.scrape()["quickdraw_ready"] == 1
    finally:
        gw.stop()


def test_reflection_lists_the_services(gateway: RunningGateway) -> None:
    with grpc.insecure_channel(gateway.target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        [resp] = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert {"quickdraw.v1.Classifier", "grpc.health.v1.Health"} <= names


def test_reflection_describes_tf_servings_services(gateway: RunningGateway) -> None:
    """They live in service.protos.tfs's private pool; reflection finds them there (grpcurl describe works)."""
    from google.protobuf import descriptor_pb2

    asks = [reflection_pb2.ServerReflectionRequest(file_containing_symbol=s)
            for s in ("tensorflow.serving.PredictionService", "tensorflow.serving.ModelService",
                      "quickdraw.v1.Classifier")]  # fmt: skip
    with grpc.insecure_channel(gateway.target) as ch:
        answers = list(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(iter(asks)))
    methods = {}
    for resp in answers:
        assert resp.WhichOneof("message_response") == "file_descriptor_response", resp
        for raw in resp.file_descriptor_response.file_descriptor_proto:
            fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
            methods |= {f"{fd.package}.{s.name}": {m.name for m in s.method} for s in fd.service}
    assert {"Predict", "GetModelMetadata"} <= methods["tensorflow.serving.PredictionService"]
    assert "GetModelStatus" in methods["tensorflow.serving.ModelService"]
    assert "Classify" in methods["quickdraw.v1.Classifier"]


def test_reflection_can_be_turned_off() -> None:
    with RunningGateway(reflection=False, warmup=False) as gw, grpc.insecure_channel(gw.target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_metrics_exposed(gateway: RunningGateway, client: QuickDrawClient, sample: Path) -> None:
    client.classify(list(cat_bitmaps(sample, 2)))
    with pytest.raises(grpc.RpcError):
        client.classify_request(pb.ClassifyRequest())
    m = gateway.scrape()
    version = find_versions(SHIPPED_MODEL)[-1]
    assert m['quickdraw_request_duration_seconds_count{code="OK",method="Classify"}'] >= 1
    assert m['quickdraw_request_duration_seconds_count{code="INVALID_ARGUMENT",method="Classify"}'] >= 1
    assert m['quickdraw_request_duration_seconds_bucket{code="OK",le="0.0005",method="Classify"}'] >= 0
    assert 'quickdraw_request_duration_seconds_bucket{code="OK",le="5.0",method="Classify"}' in m
    assert m["quickdraw_queue_wait_seconds_count"] >= 1
    backend = gateway.settings.backend
    assert m[f'quickdraw_backend_duration_seconds_count{{backend="{backend}",outcome="ok"}}'] >= 1
    assert m["quickdraw_batch_size_drawings_count"] >= 1
    assert "quickdraw_inflight_requests" in m and "quickdraw_queue_depth_drawings" in m
    assert m['quickdraw_drawings_total{kind="bitmap"}'] >= 2
    assert m[f'quickdraw_model_version_info{{backend="{backend}",model="quickdraw",version="{version}"}}'] == 1
