"""One gateway in front of several TF Serving replicas that disagree for a while, as during every roll-out.

Each replica is a TF Serving stand-in (tests/tfserving_standin.py: the real TF Serving gRPC API over the real
SavedModel) on its own port; the gateway is given both with an ``ipv4:a,b`` target, as a headless Service's
``dns:///`` name resolves in Kubernetes. Versions are added and removed on one replica at a time, as each
replica's own file-system poll does with a shared model volume.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from harness import SHIPPED_MODEL, RunningGateway
from test_tfserving import sample_bitmaps
from tfserving_standin import TFServingStandIn

from quickdraw_client.v1 import classifier_pb2 as pb
from quickdraw_client.v1 import classifier_pb2_grpc as pb_grpc
from service.backends import find_versions
from service.backends.tfserving_replicas import channel_options
from service.client import QuickDrawClient, retry_service_config
from service.settings import Settings

pytestmark = pytest.mark.skipif(
    not find_versions(SHIPPED_MODEL), reason=f"no SavedModel under {SHIPPED_MODEL} (the shipped model is missing)"
)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared model volume: versions 1 and 2 (the shipped model), and 3, whose labels.txt names the same
    classes in another order (same output width: only the labels check can tell)."""
    base = tmp_path_factory.mktemp("volume") / "quickdraw"
    base.mkdir()
    shipped = SHIPPED_MODEL / str(find_versions(SHIPPED_MODEL)[-1])
    for v in (1, 2):
        (base / str(v)).symlink_to(shipped.resolve(), target_is_directory=True)
    shutil.copytree(shipped, base / "3")
    labels = base / "3" / "assets" / "labels.txt"
    lines = labels.read_text().splitlines()
    labels.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")
    return base


@pytest.fixture(scope="module")
def replicas(shared: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TFServingStandIn, ...]]:
    """A serves {1, 2}; B still serves {1} (its poll has not seen version 2 yet)."""
    only12 = tmp_path_factory.mktemp("a") / "quickdraw"
    only12.mkdir()
    for v in (1, 2):
        (only12 / str(v)).symlink_to((shared / str(v)).resolve(), target_is_directory=True)
    with TFServingStandIn(only12) as a, TFServingStandIn(only12) as b:
        b.remove_version(2)
        yield a, b


def classify_request() -> pb.ClassifyRequest:
    image = sample_bitmaps(1)[0]
    return pb.ClassifyRequest(drawings=[pb.Drawing(bitmap=pb.Bitmap(pixels=image.tobytes()))])


def gateway(replicas: tuple[TFServingStandIn, ...], shared: Path, **settings: object) -> RunningGateway:
    values: dict[str, object] = {
        "backend": "tfserving", "tfserving_target": "ipv4:" + ",".join(r.target for r in replicas),
        "model_dir": shared, "warmup": False, "tfserving_status_poll_s": 0.2, **settings,
    }  # fmt: skip
    return RunningGateway(**values)


def test_versionless_calls_never_fail_while_replicas_disagree(
    replicas: tuple[TFServingStandIn, ...], shared: Path
) -> None:
    """Mid roll-out (A {1,2}, B {1}): 200 versionless Classify calls over 10 s all succeed, each naming the version
    that answered; A answers with 2 and B with 1, and neither is ever asked for a version it lacks."""
    a, b = replicas
    a.seen.clear()
    b.seen.clear()
    with gateway(replicas, shared) as gw, grpc.insecure_channel(gw.target) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
        assert list(info.versions) == [1, 2] and info.default_version == 2
        req = classify_request()
        codes: Counter[str] = Counter()
        versions: Counter[int] = Counter()
        start = time.monotonic()
        for i in range(200):
            time.sleep(max(0.0, start + i * 0.05 - time.monotonic()))  # 20 calls/s for 10 s
            try:
                versions[stub.Classify(req, timeout=5).model_version] += 1
                codes["OK"] += 1
            except grpc.RpcError as exc:
                codes[exc.code().name] += 1  # type: ignore[attr-defined]
        print(f"\n200 versionless calls over {time.monotonic() - start:.1f} s: {dict(codes)}; answered by "
              f"{dict(versions)}; A saw {len(a.seen)}, B saw {len(b.seen)}")  # fmt: skip
        assert codes == {"OK": 200}
        assert set(versions) == {1, 2} and min(versions.values()) >= 50  # both replicas answered
        assert all(s.version is None for s in a.seen + b.seen)  # no version pinned: each answers with its own
        metrics = gw.scrape()
        assert metrics['quickdraw_backend_replicas{state="serving"}'] == 2


def test_pinned_calls_reach_a_replica_that_has_the_version(
    replicas: tuple[TFServingStandIn, ...], shared: Path
) -> None:
    """A call naming version 2 goes only to A (B lacks it); once A unloads 2 as well, it gets NOT_FOUND."""
    a, b = replicas
    with gateway(replicas, shared) as gw, grpc.insecure_channel(gw.target) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        req = classify_request()
        req.model.version = 2
        a.seen.clear()
        b.seen.clear()
        for _ in range(20):
            assert stub.Classify(req, timeout=5).model_version == 2
        assert len(a.seen) == 20 and not b.seen
        a.remove_version(2)
        try:
            end = time.monotonic() + 5
            while True:
                with pytest.raises(grpc.RpcError) as err:
                    stub.Classify(req, timeout=5)
                if err.value.code() == grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                    break
                assert time.monotonic() < end, err.value
            assert "version 2" in err.value.details()  # type: ignore[attr-defined]
            req.ClearField("model")
            assert stub.Classify(req, timeout=5).model_version == 1  # versionless calls carry on
        finally:
            a.add_version(2, shared / "2")


def test_not_found_is_retried_on_another_replica(
    replicas: tuple[TFServingStandIn, ...], shared: Path
) -> None:
    """Both replicas list version 2; A unloads it between two status polls (polls 60 s apart here): every call
    pinned to 2 that A answers NOT_FOUND is retried on B, and none fails."""
    a, b = replicas
    b.add_version(2, shared / "2")
    try:
        with gateway(replicas, shared, tfserving_status_poll_s=60.0) as gw, grpc.insecure_channel(gw.target) as ch:
            stub = pb_grpc.ClassifierStub(ch)
            req = classify_request()
            req.model.version = 2
            a.remove_version(2)
            for _ in range(10):
                assert stub.Classify(req, timeout=5).model_version == 2
            retries = gw.scrape().get('quickdraw_backend_retries_total{reason="not_found"}', 0)
            assert 1 <= retries <= 10, retries
    finally:
        b.remove_version(2)
        a.add_version(2, shared / "2")


def test_label_disagreement_is_counted_and_health_stays(
    replicas: tuple[TFServingStandIn, ...], shared: Path
) -> None:
    """The `stable` label moved on A (to 2) but not yet on B (1): calls naming no version follow each replica's
    label, the gateway stays SERVING, and the disagreement is counted."""
    a, b = replicas
    a.version_labels["stable"] = 2
    b.version_labels["stable"] = 1
    try:
        with gateway(replicas, shared, tfserving_version_label="stable") as gw, \
                grpc.insecure_channel(gw.target) as ch:  # fmt: skip
            stub = pb_grpc.ClassifierStub(ch)
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            health = health_pb2_grpc.HealthStub(ch)
            answered = Counter(stub.Classify(classify_request(), timeout=5).model_version for _ in range(20))
            assert answered.keys() == {1, 2}, answered
            time.sleep(0.6)  # a few status polls
            status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            assert gw.scrape()["quickdraw_backend_label_disagreements_total"] >= 1
    finally:
        a.version_labels.clear()
        b.version_labels.clear()


def test_a_version_with_other_labels_is_refused_and_never_answers(
    replicas: tuple[TFServingStandIn, ...], shared: Path
) -> None:
    """Version 3 has the same output width but its labels.txt orders the classes differently: the gateway
    refuses it (log and metric), never lists or routes to it, and A's versionless calls are asked, by number, for
    its highest accepted version instead."""
    a = replicas[0]
    with gateway(replicas, shared) as gw, grpc.insecure_channel(gw.target) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        a.add_version(3, shared / "3")
        try:
            end = time.monotonic() + 5
            while gw.scrape().get("quickdraw_backend_versions_refused_total", 0) < 1:
                assert time.monotonic() < end, "version 3 was not checked"
                time.sleep(0.1)
            info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
            assert list(info.versions) == [1, 2]
            a.seen.clear()
            answered = Counter(stub.Classify(classify_request(), timeout=5).model_version for _ in range(20))
            assert 3 not in answered
            assert all(s.version in (None, 2) for s in a.seen) and 3 not in [s.version for s in a.seen]
            req = classify_request()
            req.model.version = 3
            with pytest.raises(grpc.RpcError) as err:
                stub.Classify(req, timeout=5)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
        finally:
            a.remove_version(3)


def test_an_answer_from_an_unchecked_version_is_never_passed_on(
    replicas: tuple[TFServingStandIn, ...], shared: Path
) -> None:
    """A loads version 3 (other labels) between two polls: its versionless answers come from 3, which the
    gateway has not checked; each is asked again by number, and callers only ever see 1 or 2."""
    a = replicas[0]
    with gateway(replicas, shared, tfserving_status_poll_s=60.0) as gw, grpc.insecure_channel(gw.target) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        a.add_version(3, shared / "3")
        try:
            answered = Counter(stub.Classify(classify_request(), timeout=5).model_version for _ in range(20))
            assert set(answered) <= {1, 2}, answered
            assert gw.scrape().get('quickdraw_backend_retries_total{reason="unchecked_version"}', 0) >= 1
        finally:
            a.remove_version(3)


def test_a_lost_replica_is_retried_on_another(replicas: tuple[TFServingStandIn, ...], shared: Path) -> None:
    """A stops (SIGKILL-like: in-flight calls cut off): versionless calls carry on through B, none fails, and
    the gateway stays SERVING with one replica serving."""
    a = replicas[0]
    with gateway(replicas, shared, tfserving_status_poll_s=60.0) as gw, grpc.insecure_channel(gw.target) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        req = classify_request()
        for _ in range(4):
            stub.Classify(req, timeout=5)
        a.stop()
        try:
            failures = 0
            for _ in range(40):
                try:
                    assert stub.Classify(req, timeout=5).model_version == 1
                except grpc.RpcError:
                    failures += 1
            assert failures == 0
            # readiness: at least one replica serves an accepted version
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            time.sleep(0.5)
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            assert gw.scrape()['quickdraw_backend_replicas{state="serving"}'] == 1
        finally:
            a.start()


def test_tf_serving_queue_full_is_resource_exhausted_and_never_retried(
    replicas: tuple[TFServingStandIn, ...], shared: Path
) -> None:
    """A replica that refuses work as overloaded (RESOURCE_EXHAUSTED): the caller gets RESOURCE_EXHAUSTED (the
    Python client does not retry it), and the gateway sent exactly one attempt per call."""
    a, b = replicas
    with gateway(replicas, shared) as gw, QuickDrawClient(gw.target, timeout_s=5, max_attempts=5) as client:
        a.fail_code = b.fail_code = grpc.StatusCode.RESOURCE_EXHAUSTED
        a.seen.clear()
        b.seen.clear()
        try:
            codes: Counter[str] = Counter()
            lock = threading.Lock()

            def call() -> None:
                try:
                    client.classify_request(classify_request())
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name  # type: ignore[attr-defined]
                with lock:
                    codes[code] += 1

            for _ in range(20):
                call()
            assert codes == {"RESOURCE_EXHAUSTED": 20}
            # one backend attempt per client call: neither the gateway nor the client (5 attempts) retried
            assert len(a.seen) + len(b.seen) == 20
        finally:
            a.fail_code = b.fail_code = None


def test_both_service_configs_carry_retry_throttling() -> None:
    """Client -> gateway and gateway -> TF Serving: gRPC's retryThrottling bounds retries fleet-wide, and
    neither retries RESOURCE_EXHAUSTED; the gateway's Predict has no gRPC retry policy (it retries on another
    replica itself, within the same token-bucket rule)."""
    import json

    client = json.loads(retry_service_config(5))
    backend = json.loads(dict(channel_options(Settings()))["grpc.service_config"])  # type: ignore[arg-type]
    for config in (client, backend):
        assert config["retryThrottling"] == {"maxTokens": 10, "tokenRatio": 0.1}
        for method in config["methodConfig"]:
            assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    retried = [n for m in backend["methodConfig"] for n in m["name"]]
    assert {"service": "tensorflow.serving.PredictionService"} not in retried
    assert {"service": "tensorflow.serving.PredictionService", "method": "GetModelMetadata"} in retried


def test_five_times_tf_serving_capacity_costs_at_most_1_2_attempts_per_call(shared: Path) -> None:
    """Two replicas batching as TF Serving does (one batch thread, 2 batches queued at most, 25 ms sleep a batch
    plus the model: about 50 single-drawing calls/s for both), offered 250 calls/s (5x) open loop through the
    gateway, with the
    Python client's own service config (5 attempts, UNAVAILABLE only, retryThrottling); the gateway's batches are
no larger than TF Serving's max_batch_size, as deploy/ keeps them. Callers get
    RESOURCE_EXHAUSTED for the work TF Serving refuses; every Predict either replica receives is counted
    (``:tensorflow:serving:request_count``, all statuses), and the backend attempts per client call are printed
    and at most 1.2."""
    import asyncio

    from google.protobuf import text_format

    from quickdraw.tfserving_schema import batching_parameters_pb2

    params = batching_parameters_pb2.BatchingParameters()
    text_format.Parse("max_batch_size { value: 1 } batch_timeout_micros { value: 0 } "
                      "max_enqueued_batches { value: 2 } num_batch_threads { value: 1 }", params)  # fmt: skip
    one = shared.parent / "only1"
    one.mkdir(exist_ok=True)
    if not (one / "1").exists():
        (one / "1").symlink_to((shared / "1").resolve(), target_is_directory=True)
    rate, seconds = 250, 5.0  # ~5x: the two replicas answer ~50 calls/s here (25 ms sleep + the model, per call)

    def attempts(s: TFServingStandIn) -> int:
        return sum(s.metrics.request_count.cells.values())

    with TFServingStandIn(one, batching_parameters=params, workers=32, enable_model_warmup=False) as a, \
            TFServingStandIn(one, batching_parameters=params, workers=32, enable_model_warmup=False) as b, \
            gateway((a, b), shared, max_concurrent_batches=64, max_batch_size=1) as gw:  # fmt: skip
        a.delay_s = b.delay_s = 0.025
        before = attempts(a) + attempts(b)
        image = sample_bitmaps(1)[0].tobytes()
        codes: Counter[str] = Counter()

        async def load() -> None:
            options = [("grpc.service_config", retry_service_config(5)), ("grpc.enable_retries", 1)]
            async with grpc.aio.insecure_channel(gw.target, options=options) as ch:
                stub = pb_grpc.ClassifierStub(ch)
                req = pb.ClassifyRequest(drawings=[pb.Drawing(bitmap=pb.Bitmap(pixels=image))])

                async def one_call() -> None:
                    try:
                        await stub.Classify(req, timeout=5)
                        codes["OK"] += 1
                    except grpc.aio.AioRpcError as exc:
                        codes[exc.code().name] += 1

                loop = asyncio.get_running_loop()
                start, tasks = loop.time(), []
                for i in range(int(rate * seconds)):
                    await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
                    tasks.append(asyncio.ensure_future(one_call()))
                await asyncio.gather(*tasks)

        asyncio.run(load())
        calls = sum(codes.values())
        sent = attempts(a) + attempts(b) - before
        ok = codes["OK"]
        print(f"\n{calls} calls at {rate}/s: {dict(codes)}; "
              f"backend attempts {sent}, {sent / calls:.3f} per client call; TF Serving answered "
              f"{ok / seconds:.0f} calls/s")  # fmt: skip
        assert codes["RESOURCE_EXHAUSTED"] > calls / 2  # most of the excess is refused, not queued or lost
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
        assert sent / calls <= 1.2


def test_tf_serving_api_on_the_gateway_answers_with_the_version_that_answered(
    replicas: tuple[TFServingStandIn, ...], shared: Path
) -> None:
    """TF Serving's own PredictionService on the gateway, mid roll-out: a Predict naming no version succeeds on
    both replicas and its model_spec names the version that produced it (2 from A, 1 from B)."""
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from service.protos.tensors import from_numpy

    with gateway(replicas, shared) as gw, grpc.insecure_channel(gw.target) as ch:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        req = predict_pb2.PredictRequest()
        req.model_spec.name = "quickdraw"
        req.inputs["image"].ParseFromString(from_numpy(sample_bitmaps(1)).SerializeToString())
        answered = Counter(stub.Predict(req, timeout=5).model_spec.version.value for _ in range(20))
        assert answered == {1: 10, 2: 10}, answered
