"""The TF Serving backend and TF Serving's API on the gateway, over real gRPC, with the stand-in behind it.

The stand-in (tests/tfserving_standin.py) replaces ``tensorflow_model_server``, which no registry here has:
it serves the real TF Serving gRPC API over the real SavedModel. Two versions of the shipped model are
served (both the same weights; the stand-in records which version each call asked for).
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from harness import SHIPPED_MODEL, RunningGateway
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tfserving_standin import TFServingStandIn

from doodle.formats import open_bitmaps, read_ndjson
from quickdraw_client.v1 import classifier_pb2 as pb
from quickdraw_client.v1 import classifier_pb2_grpc as pb_grpc
from service.backends import find_versions
from service.client import QuickDrawClient
from service.protos.tensors import from_numpy, to_numpy

pytestmark = pytest.mark.skipif(
    not find_versions(SHIPPED_MODEL), reason=f"no SavedModel under {SHIPPED_MODEL} (the shipped model is missing)"
)
SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "quickdraw"


def sample_bitmaps(n: int) -> np.ndarray:
    """``n`` real bitmaps, round-robin over the sample classes."""
    files = sorted((SAMPLE / "numpy_bitmap").glob("*.npy"))
    per = -(-n // len(files))
    rows = np.concatenate([np.asarray(open_bitmaps(f)[:per]) for f in files])[:n]
    return rows.reshape(-1, 28, 28, 1).astype(np.uint8)


@pytest.fixture(scope="module")
def model_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Versions 1 and 2, both the shipped model (symlinks)."""
    base = tmp_path_factory.mktemp("tfs-models") / "quickdraw"
    base.mkdir()
    shipped = SHIPPED_MODEL / str(find_versions(SHIPPED_MODEL)[-1])
    for v in (1, 2):
        (base / str(v)).symlink_to(shipped.resolve(), target_is_directory=True)
    return base


@pytest.fixture(scope="module")
def standin(model_base: Path) -> Iterator[TFServingStandIn]:
    with TFServingStandIn(model_base, version_labels={"stable": 1, "canary": 2}) as s:
        yield s


@pytest.fixture(scope="module")
def gateway(standin: TFServingStandIn, model_base: Path) -> Iterator[RunningGateway]:
    with RunningGateway(
        backend="tfserving", tfserving_target=standin.target, model_dir=model_base, max_batch_delay_ms=2.0,
        max_top_k=400, max_concurrent_batches=4, tfserving_status_poll_s=0.2, tfserving_deadline_margin_ms=50.0,
    ) as gw:  # fmt: skip
        yield gw


@pytest.fixture(scope="module")
def offline() -> object:
    import tensorflow as tf

    return tf.saved_model.load(str(SHIPPED_MODEL / str(find_versions(SHIPPED_MODEL)[-1])))


def shipped_extra_outputs() -> tuple[str, ...]:
    """``known_score`` when the shipped model exports it (issue 18), else nothing."""
    from tensorflow.core.protobuf import meta_graph_pb2

    from doodle import contract

    sig = meta_graph_pb2.SignatureDef.FromString(shipped_signature_defs()[contract.SIGNATURE_NAME])
    return (contract.KNOWN_SCORE,) if contract.KNOWN_SCORE in sig.outputs else ()


def offline_probs(loaded: object, images: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    return loaded.signatures["serving_default"](image=tf.constant(images))["probabilities"].numpy()  # type: ignore[attr-defined]


def predict_request(images: np.ndarray, **spec: object) -> predict_pb2.PredictRequest:
    req = predict_pb2.PredictRequest()
    req.model_spec.name = str(spec.get("name", "quickdraw"))
    if "version" in spec:
        req.model_spec.version.value = int(spec["version"])  # type: ignore[call-overload]
    if "label" in spec:
        req.model_spec.version_label = str(spec["label"])
    req.model_spec.signature_name = str(spec.get("signature", "serving_default"))
    # from_numpy gives service.protos.tfs's TensorProto, not TensorFlow's: the two meet as bytes
    req.inputs["image"].ParseFromString(from_numpy(images).SerializeToString())
    return req


def code_of(exc: grpc.RpcError) -> grpc.StatusCode:
    return exc.code()  # type: ignore[attr-defined,no-any-return]


# --- the stand-in itself behaves as TF Serving ---------------------------------------------------------------


def test_standin_honours_model_spec_and_answers_with_tf_serving_codes(standin: TFServingStandIn) -> None:
    images = sample_bitmaps(3)
    with grpc.insecure_channel(standin.target) as ch:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        for spec, version in (({}, 2), ({"version": 1}, 1), ({"label": "stable"}, 1), ({"label": "canary"}, 2)):
            resp = stub.Predict(predict_request(images, **spec), timeout=30)
            assert resp.model_spec.version.value == version, spec
            assert to_numpy(resp.outputs["probabilities"]).shape == (3, 29)
        cases = [
            (predict_request(images, name="nope"), grpc.StatusCode.NOT_FOUND),
            (predict_request(images, version=9), grpc.StatusCode.NOT_FOUND),
            (predict_request(images, label="beta"), grpc.StatusCode.INVALID_ARGUMENT),
            # predict_util.cc: an unknown signature is FAILED_PRECONDITION (was wrongly INVALID_ARGUMENT here)
            (predict_request(images, signature="nope"), grpc.StatusCode.FAILED_PRECONDITION),
            (predict_request(images.astype(np.float32)), grpc.StatusCode.INVALID_ARGUMENT),
            (predict_request(images.reshape(3, 28, 28)), grpc.StatusCode.INVALID_ARGUMENT),
            (predict_request(images.reshape(3, 14, 56, 1)), grpc.StatusCode.INVALID_ARGUMENT),
        ]
        for req, code in cases:
            with pytest.raises(grpc.RpcError) as err:
                stub.Predict(req, timeout=30)
            assert code_of(err.value) == code, (req.model_spec, err.value)
        only = predict_request(images)
        only.output_filter.append("top_k_labels")
        assert list(stub.Predict(only, timeout=30).outputs) == ["top_k_labels"]
        status = model_service_pb2_grpc.ModelServiceStub(ch).GetModelStatus(
            get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "quickdraw"}), timeout=10
        )
        # 30: AVAILABLE; highest first, as the ServableStateMonitor's VersionMap (std::greater) lists them
        assert [(s.version, s.state) for s in status.model_version_status] == [(2, 30), (1, 30)]


# --- the gateway with --backend tfserving ----------------------------------------------------------------------


def test_gateway_predictions_through_tfserving_equal_the_offline_model(
    gateway: RunningGateway, standin: TFServingStandIn, offline: object
) -> None:
    images = sample_bitmaps(64)
    want = offline_probs(offline, images)
    before = len(standin.seen)
    with QuickDrawClient(gateway.target, timeout_s=30) as client:
        resp = client.classify_request(
            pb.ClassifyRequest(drawings=[pb.Drawing(bitmap=pb.Bitmap(pixels=im.tobytes())) for im in images],
                               top_k=29)
        )  # fmt: skip
        got = np.zeros_like(want)
        labels = client.model_info().labels
        for i, p in enumerate(resp.predictions):
            for s in p.top:
                got[i, s.index] = s.score
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert resp.model_version == 2
        # 29 classes wanted: TF Serving's top-k has 5 (and the out-of-class score when the model has one)
        assert standin.seen[-1].outputs == ("probabilities", *shipped_extra_outputs())
        # top_k 3: the batch asks TF Serving for its top-k outputs alone; the answers are the model's best 3
        seen = len(standin.seen)
        top3 = client.classify_request(
            pb.ClassifyRequest(drawings=[pb.Drawing(bitmap=pb.Bitmap(pixels=im.tobytes())) for im in images],
                               top_k=3)
        )  # fmt: skip
        assert {s.outputs for s in standin.seen[seen:]} == {("top_k_scores", "top_k_indices", *shipped_extra_outputs())}
        want_top = np.argsort(-want, axis=1, kind="stable")[:, :3]
        for i, p in enumerate(top3.predictions):
            assert [s.index for s in p.top] == want_top[i].tolist()
            assert [s.label for s in p.top] == [labels[j] for j in want_top[i]]
            np.testing.assert_allclose([s.score for s in p.top], want[i, want_top[i]], atol=1e-5)
        # strokes, rendered by the gateway, classified by TF Serving: most of the first 25 cats are cats
        cats = [d.google_strokes() for d in read_ndjson(SAMPLE / "simplified" / "cat.ndjson", limit=25)]
        top1 = [r.top[0][0] for r in client.classify(cats, top_k=3)]
        assert Counter(top1)["cat"] >= 18, Counter(top1)
    assert len(labels) == 29
    assert len(standin.seen) > before


def test_version_selection_reaches_the_version_asked_for(gateway: RunningGateway, standin: TFServingStandIn) -> None:
    image = sample_bitmaps(1)[0]
    with QuickDrawClient(gateway.target, timeout_s=30) as client:
        assert list(client.model_info().versions) == [1, 2]
        for version in (1, 2):
            standin.seen.clear()
            resp = client.classify_request(
                pb.ClassifyRequest(drawings=[pb.Drawing(bitmap=pb.Bitmap(pixels=image.tobytes()))],
                                   model=pb.ModelSpec(version=version))
            )
            assert resp.model_version == version
            assert [s.version for s in standin.seen] == [version]
            assert standin.seen[0].signature == "serving_default" and standin.seen[0].model == "quickdraw"
        with pytest.raises(grpc.RpcError) as err:
            client.classify_request(
                pb.ClassifyRequest(drawings=[pb.Drawing(bitmap=pb.Bitmap(pixels=image.tobytes()))],
                                   model=pb.ModelSpec(version=3))
            )
        assert code_of(err.value) == grpc.StatusCode.NOT_FOUND


def test_version_label_routes_calls_without_a_version(standin: TFServingStandIn, model_base: Path) -> None:
    """--tfserving-version-label stable: calls naming no version go where TF Serving's label points, and follow it."""
    image = sample_bitmaps(1)[0]
    req = pb.ClassifyRequest(drawings=[pb.Drawing(bitmap=pb.Bitmap(pixels=image.tobytes()))])
    try:
        with RunningGateway(backend="tfserving", tfserving_target=standin.target, model_dir=model_base,
                            tfserving_version_label="stable", tfserving_status_poll_s=0.2, warmup=False) as gw, \
                QuickDrawClient(gw.target, timeout_s=10) as client:  # fmt: skip
            assert client.model_info().default_version == 1  # stable -> 1, though 2 is the highest
            standin.seen.clear()
            assert client.classify_request(req).model_version == 1
            # sent by label, not by number: each replica resolves its own label (they may disagree for a while)
            assert [(s.version, s.version_label) for s in standin.seen] == [(None, "stable")]
            with grpc.insecure_channel(gw.target) as ch:  # the label works on the gateway's TF Serving API too
                stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
                labelled = stub.Predict(predict_request(image[None], label="stable"), timeout=10)
                assert labelled.model_spec.version.value == 1
                with pytest.raises(grpc.RpcError) as err:
                    stub.Predict(predict_request(image[None], label="canary"), timeout=10)
                assert code_of(err.value) == grpc.StatusCode.INVALID_ARGUMENT
            standin.version_labels["stable"] = 2  # the label moves, as after a canary is promoted
            end = time.monotonic() + 5
            while client.model_info().default_version != 2:
                assert time.monotonic() < end, "the gateway did not follow the label"
                time.sleep(0.05)
            standin.seen.clear()
            assert client.classify_request(req).model_version == 2
            assert [(s.version, s.version_label) for s in standin.seen] == [(None, "stable")]
    finally:
        standin.version_labels["stable"] = 1


def test_tfserving_sees_a_deadline_no_later_than_the_callers(
    gateway: RunningGateway, standin: TFServingStandIn
) -> None:
    image = sample_bitmaps(1)[0]
    req = pb.ClassifyRequest(drawings=[pb.Drawing(bitmap=pb.Bitmap(pixels=image.tobytes()))])
    with grpc.insecure_channel(gateway.target) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        for timeout in (2.0, 7.5):
            standin.seen.clear()
            caller_deadline = time.monotonic() + timeout
            stub.Classify(req, timeout=timeout)
            (seen,) = standin.seen
            assert seen.deadline_s is not None
            assert seen.deadline_s <= caller_deadline, (seen.deadline_s - caller_deadline)
            assert seen.deadline_s > caller_deadline - 0.5  # the caller's deadline, not a much shorter one
        # a slow backend: the caller gets DEADLINE_EXCEEDED at its own deadline, not the backend timeout's
        standin.delay_s = 1.0
        try:
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                stub.Classify(req, timeout=0.3)
            assert code_of(err.value) == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - t0 < 0.6
        finally:
            standin.delay_s = 0.0
        time.sleep(1.0)  # let the slow call drain from the stand-in


def test_backend_stopped_mid_load_fails_fast_then_recovers_without_restarting_the_gateway(
    gateway: RunningGateway, standin: TFServingStandIn
) -> None:
    """Load from 8 callers; the stand-in stops, calls get UNAVAILABLE quickly; it restarts, calls succeed."""
    images = sample_bitmaps(32)
    results: list[tuple[float, float, grpc.StatusCode]] = []  # (sent, took, code)
    lock = threading.Lock()
    stop_at = time.monotonic() + 6.0
    deadline_s = 5.0

    async def caller(i: int) -> None:
        async with grpc.aio.insecure_channel(gateway.target) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            k = i
            while time.monotonic() < stop_at:
                req = pb.ClassifyRequest(drawings=[pb.Drawing(bitmap=pb.Bitmap(pixels=images[k % 32].tobytes()))])
                t0 = time.monotonic()
                try:
                    await stub.Classify(req, timeout=deadline_s)
                    code = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as exc:
                    code = exc.code()
                with lock:
                    results.append((t0, time.monotonic() - t0, code))
                k += 8
                await asyncio.sleep(0.01)

    async def load() -> None:
        await asyncio.gather(*(caller(i) for i in range(8)))

    runner = threading.Thread(target=asyncio.run, args=(load(),))
    runner.start()
    time.sleep(1.5)
    down_at = time.monotonic()
    standin.stop()
    time.sleep(2.0)
    up_at = time.monotonic()
    standin.start()
    runner.join(timeout=30)
    assert not runner.is_alive(), "a caller hung"

    codes = Counter(code for _, _, code in results)
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
    before = [r for r in results if r[0] + r[1] < down_at]
    while_down = [r for r in results if r[0] > down_at + 0.3 and r[0] + r[1] < up_at]
    after = [r for r in results if r[0] > up_at + 1.5]
    assert before and all(c == grpc.StatusCode.OK for _, _, c in before)
    assert while_down, "no calls were made while the backend was down"
    assert all(c == grpc.StatusCode.UNAVAILABLE for _, _, c in while_down), Counter(c for _, _, c in while_down)
    assert max(took for _, took, _ in while_down) < 1.0, "calls did not fail fast while the backend was down"
    assert after and all(c == grpc.StatusCode.OK for _, _, c in after), Counter(c for _, _, c in after)
    assert max(took for _, took, _ in results) < deadline_s, "a call outlived its deadline"


def test_readiness_follows_tfserving_model_status(gateway: RunningGateway, standin: TFServingStandIn) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    def health() -> int:
        with grpc.insecure_channel(gateway.target) as ch:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status

    def wait_for(status: int) -> None:
        end = time.monotonic() + 5
        while health() != status:
            assert time.monotonic() < end, f"health did not become {status}"
            time.sleep(0.05)

    wait_for(health_pb2.HealthCheckResponse.SERVING)
    standin.stop()
    try:
        wait_for(health_pb2.HealthCheckResponse.NOT_SERVING)
        assert gateway.scrape()["quickdraw_ready"] == 0
        with grpc.insecure_channel(gateway.target) as ch:  # alive, only not ready: no restart wanted
            live = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=5)
        assert live.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        standin.start()
    wait_for(health_pb2.HealthCheckResponse.SERVING)
    assert gateway.scrape()["quickdraw_ready"] == 1


def test_a_failing_backend_fails_its_calls_with_a_clear_status_then_recovers(
    gateway: RunningGateway, standin: TFServingStandIn
) -> None:
    image = sample_bitmaps(1)[0]
    req = pb.ClassifyRequest(drawings=[pb.Drawing(bitmap=pb.Bitmap(pixels=image.tobytes()))])
    with grpc.insecure_channel(gateway.target) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        standin.fail_code = grpc.StatusCode.FAILED_PRECONDITION
        try:
            with pytest.raises(grpc.RpcError) as err:
                stub.Classify(req, timeout=5)
            assert code_of(err.value) == grpc.StatusCode.INTERNAL
            assert "TF Serving failed" in err.value.details() and "FAILED_PRECONDITION" in err.value.details()  # type: ignore[attr-defined]
        finally:
            standin.fail_code = None
        assert stub.Classify(req, timeout=5).predictions


def test_round_robin_spreads_calls_over_every_replica(model_base: Path) -> None:
    """Per-request balancing: with two TF Serving replicas behind one target, both get calls."""
    with TFServingStandIn(model_base) as a, TFServingStandIn(model_base) as b, RunningGateway(
        backend="tfserving", tfserving_target=f"ipv4:{a.target},{b.target}", model_dir=model_base, warmup=False
    ) as gw, grpc.insecure_channel(gw.target) as ch:  # fmt: skip
        stub = pb_grpc.ClassifierStub(ch)
        image = sample_bitmaps(1)[0]
        for _ in range(20):  # one at a time: every call is its own batch, on one connection from the client
            stub.Classify(pb.ClassifyRequest(drawings=[pb.Drawing(bitmap=pb.Bitmap(pixels=image.tobytes()))]),
                          timeout=10)  # fmt: skip
        assert len(a.seen) >= 5 and len(b.seen) >= 5, (len(a.seen), len(b.seen))


# --- TF Serving's API on the gateway ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded() -> Iterator[RunningGateway]:
    with RunningGateway(max_batch_delay_ms=2.0) as gw:
        yield gw


@pytest.mark.parametrize("backend", ["embedded", "tfserving"])
def test_tf_serving_client_pointed_at_the_gateway_gets_the_offline_probabilities(
    backend: str, request: pytest.FixtureRequest, offline: object
) -> None:
    embedded: RunningGateway = request.getfixturevalue("embedded" if backend == "embedded" else "gateway")
    images = sample_bitmaps(1000)
    want = offline_probs(offline, images)
    with grpc.insecure_channel(embedded.target) as ch:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        got = []
        for chunk in np.array_split(images, 8):  # 8 calls of 125: several batches, concurrent-free
            resp = stub.Predict(predict_request(chunk), timeout=60)
            got.append(to_numpy(resp.outputs["probabilities"]))
            assert resp.model_spec.name == "quickdraw"
            assert resp.model_spec.version.value == embedded.app._gateway.model.default_version  # type: ignore[union-attr]
        np.testing.assert_allclose(np.concatenate(got), want, atol=1e-5)
        # the other outputs of the signature, and output_filter
        req = predict_request(images[:4])
        resp = stub.Predict(req, timeout=30)
        assert sorted(resp.outputs) == sorted(["probabilities", "top_k_indices", "top_k_labels", "top_k_scores",
                                               *shipped_extra_outputs()])
        offline_all = offline.signatures["serving_default"](image=__import__("tensorflow").constant(images[:4]))  # type: ignore[attr-defined]
        np.testing.assert_array_equal(to_numpy(resp.outputs["top_k_indices"]), offline_all["top_k_indices"].numpy())
        assert list(resp.outputs["top_k_labels"].string_val) == list(offline_all["top_k_labels"].numpy().reshape(-1))
        req.output_filter.append("probabilities")
        assert list(stub.Predict(req, timeout=30).outputs) == ["probabilities"]
    metrics = embedded.scrape()
    assert metrics['quickdraw_request_duration_seconds_count{code="OK",method="Predict"}'] >= 10


def test_tf_serving_api_on_the_gateway_rejects_like_tf_serving_with_field_details(embedded: RunningGateway) -> None:
    images = sample_bitmaps(2)
    bad = grpc.StatusCode.INVALID_ARGUMENT
    cases = [
        (predict_request(images, name="nope"), grpc.StatusCode.NOT_FOUND, None),
        (predict_request(images, version=7), grpc.StatusCode.NOT_FOUND, None),
        (predict_request(images, label="stable"), bad, "model_spec.version_label"),
        (predict_request(images, signature="x"), grpc.StatusCode.FAILED_PRECONDITION, "model_spec.signature_name"),
        (predict_request(images.astype(np.float32)), bad, "inputs[image].dtype"),
        (predict_request(images.reshape(2, 28, 28)), bad, "inputs[image].tensor_shape"),
        (predict_request(np.zeros((300, 28, 28, 1), np.uint8)), bad, "inputs[image].tensor_shape.dim[0]"),
    ]
    bad_content = predict_request(images)
    bad_content.inputs["image"].tensor_content = b"\x00" * 10
    cases.append((bad_content, bad, "inputs[image].tensor_content"))
    extra = predict_request(images)
    extra.inputs["other"].ParseFromString(from_numpy(images).SerializeToString())
    cases.append((extra, bad, "inputs"))
    with grpc.insecure_channel(embedded.target) as ch:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        for req, code, field in cases:
            with pytest.raises(grpc.RpcError) as err:
                stub.Predict(req, timeout=30)
            assert code_of(err.value) == code, (field, err.value)
            if field is not None:
                status = rpc_status.from_call(err.value)  # type: ignore[arg-type]
                assert status is not None and status.code == code.value[0]
                detail = error_details_pb2.BadRequest()
                assert status.details[0].Unpack(detail)
                assert [v.field for v in detail.field_violations] == [field]
                assert detail.field_violations[0].description


# --- the same mistakes, the same answers as TF Serving ----------------------------------------------------------
# Each expected code and message is TF Serving's (2.21) for that mistake, from the source file named in its case:
# tensorflow_serving/servables/tensorflow/{predict_impl,predict_util,get_model_metadata_impl}.cc,
# tensorflow_serving/model_servers/get_model_status_impl.cc, and TensorFlow's tensorflow/cc/saved_model/util.cc
# (GetInputValues) and tensorflow/core/framework/function.cc (FunctionCallFrame::SetArgs, Session::Run's feeds).
# service/frontends/tfserving/grpc_api.py's docstring lists the same.



def _signature_outputs() -> str:
    """The shipped signature's output keys as TF Serving lists them: a std::set<string>, joined."""
    from tensorflow.core.protobuf import meta_graph_pb2

    sig = meta_graph_pb2.SignatureDef.FromString(shipped_signature_defs()["serving_default"])
    return "{" + ",".join(sorted(sig.outputs)) + "}"


def shipped_signature_defs() -> dict[str, bytes]:
    """Every SignatureDef of the shipped SavedModel's serving meta graph, serialized (deterministically)."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((SHIPPED_MODEL / str(find_versions(SHIPPED_MODEL)[-1]) / "saved_model.pb").read_bytes())
    (graph,) = [g for g in proto.meta_graphs if "serve" in g.meta_info_def.tags]
    return {name: sig.SerializeToString(deterministic=True) for name, sig in graph.signature_def.items()}


def _feed_name() -> str:
    from tensorflow.core.protobuf import meta_graph_pb2

    return meta_graph_pb2.SignatureDef.FromString(shipped_signature_defs()["serving_default"]).inputs["image"].name


@functools.cache
def _predict_mistakes() -> dict[str, tuple[str, object, grpc.StatusCode, str]]:
    """Each mistake: (source file, the request, TF Serving's code, TF Serving's message)."""
    images = sample_bitmaps(2)
    no_spec = predict_request(images)
    no_spec.ClearField("model_spec")
    extra = predict_request(images)
    extra.inputs["other"].CopyFrom(extra.inputs["image"])
    none = predict_request(images)
    del none.inputs["image"]
    renamed = predict_request(images)
    renamed.inputs["picture"].CopyFrom(renamed.inputs["image"])
    del renamed.inputs["image"]
    unknown_out = predict_request(images)
    unknown_out.output_filter.extend(["probabilities", "logits"])
    twice = predict_request(images)
    twice.output_filter.extend(["top_k_scores", "probabilities", "top_k_scores"])
    invalid = predict_request(images)
    invalid.inputs["image"].dtype = 0  # DT_INVALID
    short = predict_request(images)
    short.inputs["image"].tensor_content = b"\x00" * 10
    bad = grpc.StatusCode.INVALID_ARGUMENT
    return {
        "no_model_spec": ("predict_impl.cc", no_spec, bad, "Missing ModelSpec"),
        "unknown_signature": ("predict_util.cc", predict_request(images, signature="nope"),
                              grpc.StatusCode.FAILED_PRECONDITION, 'Serving signature key "nope" not found.'),
        "extra_input": ("predict_util.cc", extra, bad, "input size does not match signature: 2!=1 "
                        "len({image,other}) != len({image}). Sent extra: {other}. Missing but required: {}."),
        "no_input": ("predict_util.cc", none, bad, "input size does not match signature: 0!=1 len({}) != "
                     "len({image}). Sent extra: {}. Missing but required: {image}."),
        "renamed_input": ("saved_model/util.cc", renamed, bad, f"Signature input alias: image(feed name: "
                          f"{_feed_name()}) not found in request and no default value provided. Inputs expected to "
                          "be in the request {picture}, or default input alias set: "),
        "dtype_invalid": ("saved_model/util.cc", invalid, bad, "tensor parsing error: image"),
        "content_short": ("saved_model/util.cc", short, bad, "tensor parsing error: image"),
        "unknown_output": ("predict_util.cc", unknown_out, bad, "output tensor alias not found in signature: logits "
                           f"Outputs expected to be in the set {_signature_outputs()}."),
        "duplicate_output": ("predict_util.cc", twice, bad, "duplicate output tensor alias: top_k_scores"),
        "float_input": ("framework/function.cc", predict_request(images.astype(np.float32)), bad,
                        "Expects arg[0] to be uint8 but float is provided"),
        "int32_input": ("framework/function.cc", predict_request(images.astype(np.int32)), bad,
                        "Expects arg[0] to be uint8 but int32 is provided"),
    }  # fmt: skip


PREDICT_MISTAKES = ["no_model_spec", "unknown_signature", "extra_input", "no_input", "renamed_input",
                    "dtype_invalid", "content_short", "unknown_output", "duplicate_output", "float_input",
                    "int32_input"]  # fmt: skip


@pytest.fixture(params=["gateway", "standin"])
def tfs_target(request: pytest.FixtureRequest) -> tuple[str, str]:
    """Who answers TF Serving's API, and where: the gateway (embedded backend), and the stand-in for TF Serving."""
    return request.param, str(request.getfixturevalue("embedded" if request.param == "gateway" else "standin").target)


def _rejection(call: object, request: object) -> tuple[grpc.StatusCode, str, object]:
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=30)  # type: ignore[operator]
    return code_of(err.value), err.value.details(), rpc_status.from_call(err.value)  # type: ignore[attr-defined,arg-type]


@pytest.mark.parametrize("mistake", PREDICT_MISTAKES)
def test_predict_mistakes_get_tf_servings_code_and_message(tfs_target: tuple[str, str], mistake: str) -> None:
    assert sorted(_predict_mistakes()) == sorted(PREDICT_MISTAKES)
    source, request, code, message = _predict_mistakes()[mistake]
    who, target = tfs_target
    with grpc.insecure_channel(target) as ch:
        got_code, got_message, status = _rejection(prediction_service_pb2_grpc.PredictionServiceStub(ch).Predict,
                                                   request)  # fmt: skip
    assert (got_code, got_message) == (code, message), source
    if who != "gateway":
        return
    # the field-level details the gateway adds to TF Serving's answer
    detail = error_details_pb2.BadRequest()
    assert status is not None and status.details and status.details[0].Unpack(detail)  # type: ignore[attr-defined]
    assert detail.field_violations and all(v.field and v.description for v in detail.field_violations)


def _metadata_request(**fields: object) -> get_model_metadata_pb2.GetModelMetadataRequest:
    return get_model_metadata_pb2.GetModelMetadataRequest(**fields)  # type: ignore[arg-type]


# (what is wrong, the request, TF Serving's code, its message; None: the gateway's own NOT_FOUND message). Each
# request is also wrong in the ways TF Serving checks later (an unknown model), so the order is tested too.
METADATA_MISTAKES = [
    ("no_model_spec", _metadata_request(), grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec"),
    ("no_metadata_field", _metadata_request(model_spec={"name": "nope"}), grpc.StatusCode.INVALID_ARGUMENT,
     "GetModelMetadataRequest must specify at least one metadata_field"),
    ("unsupported_field", _metadata_request(model_spec={"name": "nope"}, metadata_field=["signature_defs"]),
     grpc.StatusCode.INVALID_ARGUMENT, "Metadata field signature_defs is not supported"),
    ("one_unsupported_field", _metadata_request(model_spec={"name": "quickdraw"},
                                                metadata_field=["signature_def", "labels"]),
     grpc.StatusCode.INVALID_ARGUMENT, "Metadata field labels is not supported"),
    ("unknown_model", _metadata_request(model_spec={"name": "nope"}, metadata_field=["signature_def"]),
     grpc.StatusCode.NOT_FOUND, None),
    ("unknown_version", _metadata_request(model_spec={"name": "quickdraw", "version": {"value": 99}},
                                          metadata_field=["signature_def"]), grpc.StatusCode.NOT_FOUND, None),
]  # fmt: skip


@pytest.mark.parametrize(("request_", "code", "message"), [m[1:] for m in METADATA_MISTAKES],
                         ids=[m[0] for m in METADATA_MISTAKES])  # fmt: skip
def test_get_model_metadata_mistakes_in_tf_servings_order(
    tfs_target: tuple[str, str], request_: object, code: grpc.StatusCode, message: str | None
) -> None:
    """get_model_metadata_impl.cc: model_spec, then metadata_field (empty, unsupported), then the model."""
    with grpc.insecure_channel(tfs_target[1]) as ch:
        got_code, got_message, _ = _rejection(prediction_service_pb2_grpc.PredictionServiceStub(ch).GetModelMetadata,
                                              request_)  # fmt: skip
    assert got_code == code
    if message is not None:
        assert got_message == message


def test_get_model_status_without_model_spec_is_refused_as_tf_serving_does(tfs_target: tuple[str, str]) -> None:
    """get_model_status_impl.cc: INVALID_ARGUMENT "Missing ModelSpec"."""
    with grpc.insecure_channel(tfs_target[1]) as ch:
        got = _rejection(model_service_pb2_grpc.ModelServiceStub(ch).GetModelStatus,
                         get_model_status_pb2.GetModelStatusRequest())  # fmt: skip
    assert got[:2] == (grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")


def test_get_model_metadata_is_unavailable_until_the_backend_has_signature_defs(
    embedded: RunningGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No SignatureDefs from the backend yet: UNAVAILABLE. (Every backend has ``signature_defs``: the Backend
    Protocol is complete, so the gateway never probes for it.)"""
    from service.backends.embedded import EmbeddedBackend

    req = _metadata_request(model_spec={"name": "quickdraw"}, metadata_field=["signature_def"])
    with grpc.insecure_channel(embedded.target) as ch:
        call = prediction_service_pb2_grpc.PredictionServiceStub(ch).GetModelMetadata
        monkeypatch.setattr(EmbeddedBackend, "signature_defs", property(lambda self: None))
        unavailable = (grpc.StatusCode.UNAVAILABLE, "the model's SignatureDefs are not known yet; retry shortly")
        assert _rejection(call, req)[:2] == unavailable
        monkeypatch.undo()
        assert call(req, timeout=10).metadata["signature_def"].type_url  # answered again


def test_model_status_and_metadata_on_the_gateway(embedded: RunningGateway) -> None:
    with grpc.insecure_channel(embedded.target) as ch:
        status = model_service_pb2_grpc.ModelServiceStub(ch).GetModelStatus(
            get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "quickdraw"}), timeout=10
        )
        assert [(s.version, s.state) for s in status.model_version_status] == [
            (1, get_model_status_pb2.ModelVersionStatus.AVAILABLE)
        ]
        meta = prediction_service_pb2_grpc.PredictionServiceStub(ch).GetModelMetadata(
            get_model_metadata_pb2.GetModelMetadataRequest(model_spec={"name": "quickdraw"},
                                                           metadata_field=["signature_def"]), timeout=10
        )  # fmt: skip
    # as TF Serving answers (get_model_metadata_impl.cc): the name and version, no signature name
    assert (meta.model_spec.name, meta.model_spec.version.value, meta.model_spec.signature_name) == ("quickdraw", 1, "")
    assert list(meta.metadata) == ["signature_def"]
    assert meta.metadata["signature_def"].type_url == "type.googleapis.com/tensorflow.serving.SignatureDefMap"
    sigs = get_model_metadata_pb2.SignatureDefMap()
    assert meta.metadata["signature_def"].Unpack(sigs)
    # every signature of the SavedModel, byte for byte (TF Serving copies the meta graph's map, init op included)
    want = shipped_signature_defs()
    assert "__saved_model_init_op" in want
    assert {name: sig.SerializeToString(deterministic=True) for name, sig in sigs.signature_def.items()} == want


def test_metadata_through_the_tfserving_backend_is_tf_servings_own(gateway: RunningGateway) -> None:
    """With the tfserving backend, the gateway's GetModelMetadata answers with the SignatureDefs TF Serving gave
    the backend (not a hand-written one): byte for byte the SavedModel's own."""
    with grpc.insecure_channel(gateway.target) as ch:
        meta = prediction_service_pb2_grpc.PredictionServiceStub(ch).GetModelMetadata(
            get_model_metadata_pb2.GetModelMetadataRequest(model_spec={"name": "quickdraw"},
                                                           metadata_field=["signature_def"]), timeout=10
        )  # fmt: skip
    sigs = get_model_metadata_pb2.SignatureDefMap()
    assert meta.metadata["signature_def"].Unpack(sigs)
    want = shipped_signature_defs()
    assert {name: sig.SerializeToString(deterministic=True) for name, sig in sigs.signature_def.items()} == want
