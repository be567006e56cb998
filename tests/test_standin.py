"""The TF Serving stand-in (tests/tfserving_standin.py) against TF Serving's own source, behaviour by behaviour.

Each test names the TF Serving (or TensorFlow core) source file whose behaviour it checks. The client is
tensorflow-serving-api's stubs over real gRPC; the model is the shipped SavedModel (models/quickdraw/1, with its
assets.extra warm-up records) copied into tmp_path as versions 1, 2 and 3. About 60 s on two busy cores.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="the stand-in runs SavedModels with TensorFlow (extra 'tf')")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from tensorflow_serving.apis import (  # noqa: E402
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.config import model_server_config_pb2  # noqa: E402
from test_tfserving import shipped_extra_outputs  # noqa: E402
from tfserving_standin import ServingError, TFServingStandIn, policy, read_text_proto  # noqa: E402

from quickdraw.tfserving_schema import batching_parameters_pb2, monitoring_config_pb2  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "quickdraw" / "1"
pytestmark = pytest.mark.skipif(not (SHIPPED / "saved_model.pb").exists(), reason=f"no shipped model at {SHIPPED}")
AVAILABLE, END, LOADING = (get_model_status_pb2.ModelVersionStatus.State.Value(s) for s in ("AVAILABLE", "END",
                                                                                          "LOADING"))  # fmt: skip
C = grpc.StatusCode


def versions(base: Path, *numbers: int) -> Path:
    """Copy the shipped version into ``base/<n>`` for each number, atomically (temp dir, then rename)."""
    base.mkdir(parents=True, exist_ok=True)
    for n in numbers:
        tmp = base / f"tmp-export-{n}"
        shutil.copytree(SHIPPED, tmp)
        tmp.rename(base / str(n))
    return base


def request(n: int = 2, *, name: str = "quickdraw", version: int | None = None, label: str | None = None,
            signature: str = "", outputs: tuple[str, ...] = ()) -> predict_pb2.PredictRequest:  # fmt: skip
    req = predict_pb2.PredictRequest()
    req.model_spec.name = name
    if version is not None:
        req.model_spec.version.value = version
    if label is not None:
        req.model_spec.version_label = label
    req.model_spec.signature_name = signature
    req.inputs["image"].CopyFrom(tf.make_tensor_proto(np.full((n, 28, 28, 1), 255, np.uint8)))
    req.output_filter.extend(outputs)
    return req


def failure(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def status(stub: Any, name: str = "quickdraw", **spec: Any) -> list[tuple[int, int]]:
    resp = stub.GetModelStatus(
        get_model_status_pb2.GetModelStatusRequest(model_spec={"name": name, **spec}), timeout=10
    )
    return [(s.version, s.state) for s in resp.model_version_status]


def until(check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return versions(tmp_path_factory.mktemp("three") / "quickdraw", 1, 2, 3)


@pytest.fixture(scope="module")
def served(three: Path) -> Iterator[TFServingStandIn]:
    with TFServingStandIn(three, version_labels={"stable": 2}) as s:
        yield s


@pytest.fixture(scope="module")
def stubs(served: TFServingStandIn) -> Iterator[tuple[Any, Any]]:
    with grpc.insecure_channel(served.target) as ch:
        yield prediction_service_pb2_grpc.PredictionServiceStub(ch), model_service_pb2_grpc.ModelServiceStub(ch)


def test_predict_errors_are_tf_servings(stubs: tuple[Any, Any]) -> None:
    """Predict's refusals, code and message, as predict_impl.cc / predict_util.cc / server_core.cc make them.

    predict_util.cc RunPredict: an unknown signature is FAILED_PRECONDITION 'Serving signature key "x" not found.';
    VerifyRequestInputsSize: INVALID_ARGUMENT 'input size does not match signature: ...'; GetInputValues
    (tensorflow/cc/saved_model/util.cc, TF 2.21): 'Signature input alias: image(feed name: ...) not found in request
    and no default value provided. ...'; PreProcessPrediction:
    unknown and duplicate output_filter aliases; the TF runtime: a wrong dtype 'Expects arg[0] to be uint8 but
    float is provided'; basic_manager.cc: NOT_FOUND 'Servable not found for request: Latest(x)' / 'Specific(x, v)';
    server_core.cc: an empty name and a missing model_spec are INVALID_ARGUMENT; grpc_status_util.cc cuts a message
    at 1024 characters and appends '...TRUNCATED'.
    """
    predict, _ = stubs
    assert failure(lambda: predict.Predict(request(signature="nope"), timeout=30)) == (
        C.FAILED_PRECONDITION, 'Serving signature key "nope" not found.')  # fmt: skip
    extra = request()
    extra.inputs["mask"].CopyFrom(tf.make_tensor_proto(np.zeros(2, np.uint8)))
    code, msg = failure(lambda: predict.Predict(extra, timeout=30))
    assert code == C.INVALID_ARGUMENT
    assert msg == ("input size does not match signature: 2!=1 len({image,mask}) != len({image}). "
                   "Sent extra: {mask}. Missing but required: {}.")  # fmt: skip
    renamed = request()
    renamed.inputs["images"].CopyFrom(renamed.inputs.pop("image"))
    assert failure(lambda: predict.Predict(renamed, timeout=30)) == (
        C.INVALID_ARGUMENT,
        "Signature input alias: image(feed name: serving_default_image:0) not found in request and no default "
        "value provided. Inputs expected to be in the request {images}, or default input alias set: ",
    )
    code, msg = failure(lambda: predict.Predict(request(outputs=("logits",)), timeout=30))
    outputs = ",".join(sorted(["probabilities", "top_k_indices", "top_k_labels", "top_k_scores",
                               *shipped_extra_outputs()]))  # fmt: skip
    assert (code, msg) == (C.INVALID_ARGUMENT, "output tensor alias not found in signature: logits Outputs expected to "
                           f"be in the set {{{outputs}}}.")  # fmt: skip
    assert failure(lambda: predict.Predict(request(outputs=("top_k_labels", "top_k_labels")), timeout=30)) == (
        C.INVALID_ARGUMENT, "duplicate output tensor alias: top_k_labels")  # fmt: skip
    wrong_type = request()
    wrong_type.inputs["image"].CopyFrom(tf.make_tensor_proto(np.zeros((2, 28, 28, 1), np.float32)))
    assert failure(lambda: predict.Predict(wrong_type, timeout=30)) == (
        C.INVALID_ARGUMENT, "Expects arg[0] to be uint8 but float is provided")  # fmt: skip
    wrong_shape = request()
    wrong_shape.inputs["image"].CopyFrom(tf.make_tensor_proto(np.zeros((2, 28, 28), np.uint8)))
    assert failure(lambda: predict.Predict(wrong_shape, timeout=30))[0] == C.INVALID_ARGUMENT
    short = request()
    short.inputs["image"].tensor_content = b"\0" * 100
    assert failure(lambda: predict.Predict(short, timeout=30)) == (C.INVALID_ARGUMENT, "tensor parsing error: image")
    assert failure(lambda: predict.Predict(request(name="nope"), timeout=30)) == (
        C.NOT_FOUND, "Servable not found for request: Latest(nope)")  # fmt: skip
    assert failure(lambda: predict.Predict(request(version=9), timeout=30)) == (
        C.NOT_FOUND, "Servable not found for request: Specific(quickdraw, 9)")  # fmt: skip
    assert failure(lambda: predict.Predict(request(name=""), timeout=30)) == (
        C.INVALID_ARGUMENT, "ModelSpec has no name specified.")  # fmt: skip
    assert failure(lambda: predict.Predict(predict_pb2.PredictRequest(), timeout=30)) == (
        C.INVALID_ARGUMENT, "Missing ModelSpec")  # fmt: skip
    code, msg = failure(lambda: predict.Predict(request(signature="s" * 2000), timeout=30))
    assert code == C.FAILED_PRECONDITION and len(msg) == 1024 + len("...TRUNCATED") and msg.endswith("...TRUNCATED")


def test_predict_answers_in_typed_fields_by_default(served: TFServingStandIn, stubs: tuple[Any, Any]) -> None:
    """Outputs in the typed *_val fields unless --enable_serialization_as_tensor_content.

    predict_util.cc RunPredict passes kAsProtoField (Tensor::AsProtoField: float_val, int_val, string_val);
    server.h enable_serialization_as_tensor_content defaults to false. The response's model_spec carries the
    request's name, the version that answered and the signature name (MakeModelSpec).
    """
    predict, _ = stubs
    resp = predict.Predict(request(3), timeout=30)
    probs = resp.outputs["probabilities"]
    assert not probs.tensor_content and len(probs.float_val) == 3 * 29
    assert [d.size for d in probs.tensor_shape.dim] == [3, 29]
    assert len(resp.outputs["top_k_indices"].int_val) == 15 and len(resp.outputs["top_k_labels"].string_val) == 15
    assert np.allclose(tf.make_ndarray(probs).sum(axis=1), 1.0, atol=1e-3)
    assert (resp.model_spec.name, resp.model_spec.version.value, resp.model_spec.signature_name) == (
        "quickdraw", 3, "serving_default")  # fmt: skip
    served.tensor_content = True
    try:
        packed = predict.Predict(request(3), timeout=30).outputs["probabilities"]
    finally:
        served.tensor_content = False
    assert not packed.float_val and len(packed.tensor_content) == 3 * 29 * 4
    assert np.array_equal(tf.make_ndarray(packed), tf.make_ndarray(probs))


def test_metadata_validates_in_tf_servings_order(stubs: tuple[Any, Any]) -> None:
    """GetModelMetadata checks model_spec, then metadata_field, then the model (get_model_metadata_impl.cc).

    GetModelMetadata: no model_spec -> INVALID_ARGUMENT 'Missing ModelSpec'; ValidateGetModelMetadataRequest: no
    field -> 'GetModelMetadataRequest must specify at least one metadata_field', another field -> 'Metadata field
    x is not supported' (even for an unknown model: the request is checked before the servable is looked up);
    then GetServableHandle (NOT_FOUND; labels honoured). It answers the whole signature_def map.
    """
    predict, _ = stubs
    M = get_model_metadata_pb2.GetModelMetadataRequest
    assert failure(lambda: predict.GetModelMetadata(M(metadata_field=["signature_def"]), timeout=10)) == (
        C.INVALID_ARGUMENT, "Missing ModelSpec")  # fmt: skip
    assert failure(lambda: predict.GetModelMetadata(M(model_spec={"name": "nope"}), timeout=10)) == (
        C.INVALID_ARGUMENT, "GetModelMetadataRequest must specify at least one metadata_field")  # fmt: skip
    unknown_field = M(model_spec={"name": "nope"}, metadata_field=["x"])
    assert failure(lambda: predict.GetModelMetadata(unknown_field, timeout=10)) == (
        C.INVALID_ARGUMENT, "Metadata field x is not supported")  # fmt: skip
    unknown_model = M(model_spec={"name": "nope"}, metadata_field=["signature_def"])
    assert failure(lambda: predict.GetModelMetadata(unknown_model, timeout=10)) == (
        C.NOT_FOUND, "Servable not found for request: Latest(nope)")  # fmt: skip
    resp = predict.GetModelMetadata(M(model_spec={"name": "quickdraw", "version_label": "stable"},
                                      metadata_field=["signature_def"]), timeout=10)  # fmt: skip
    sigs = get_model_metadata_pb2.SignatureDefMap()
    resp.metadata["signature_def"].Unpack(sigs)
    assert resp.model_spec.version.value == 2
    assert set(sigs.signature_def) == {"serving_default", "__saved_model_init_op"}


def test_version_labels_per_method(served: TFServingStandIn, stubs: tuple[Any, Any]) -> None:
    """version_label: Predict and GetModelMetadata resolve it; GetModelStatus ignores it.

    server_core.cc ServableRequestFromModelSpec/GetModelVersionForLabel: a known label is Specific(name, v); an
    unknown one INVALID_ARGUMENT 'Unrecognized servable version label: x'. get_model_status_impl.cc looks only at
    model_spec.version: with a label (and no version) it lists every version, highest first.
    """
    predict, models = stubs
    assert predict.Predict(request(label="stable"), timeout=30).model_spec.version.value == 2
    assert failure(lambda: predict.Predict(request(label="beta"), timeout=30)) == (
        C.INVALID_ARGUMENT, "Unrecognized servable version label: beta")  # fmt: skip
    assert status(models, version_label="beta") == [(3, AVAILABLE), (2, AVAILABLE), (1, AVAILABLE)]
    assert status(models, version={"value": 2}) == [(2, AVAILABLE)]
    assert failure(lambda: status(models, version={"value": 7})) == (
        C.NOT_FOUND,
        "Could not find version 7 of model quickdraw",
    )
    assert failure(lambda: status(models, name="nope")) == (C.NOT_FOUND, "Could not find any versions of model nope")


def test_version_policies_choose_the_served_versions(three: Path) -> None:
    """latest {num_versions}, specific {versions} and all pick the aspired versions.

    file_system_storage_path_source.cc: AspireLatestVersions (the highest num_versions, at least 1),
    AspireSpecificVersions, AspireAllVersions; only aspired versions ever reach the ServableStateMonitor, so
    GetModelStatus lists no others.
    """
    for pol, want in ((policy("latest", 2), [3, 2]), (policy("specific", versions=[1, 3]), [3, 1])):
        with (
            TFServingStandIn(three, version_policy=pol, enable_model_warmup=False) as s,
            grpc.insecure_channel(s.target) as ch,
        ):
            assert status(model_service_pb2_grpc.ModelServiceStub(ch)) == [(v, AVAILABLE) for v in want]


def test_lifecycle_follows_polls_and_preserves_availability(tmp_path: Path) -> None:
    """A new version goes START -> LOADING (warm-up included) -> AVAILABLE; the old one UNLOADING -> END after.

    file_system_storage_path_source.cc polls every file_system_poll_wait_seconds; aspired_versions_manager.cc
    publishes kStart for a new aspired version; availability_preserving_policy.cc unloads the un-aspired version
    only once an aspired one is AVAILABLE; saved_model_warmup.cc replays assets.extra/tf_serving_warmup_requests
    (4 records in the shipped model) while LOADING; servable_state_monitor.h keeps END entries.
    """
    base = versions(tmp_path / "quickdraw", 1)
    with TFServingStandIn(base, version_policy=policy("latest", 1), file_system_poll_wait_seconds=0.2,
                          load_seconds=1.5) as s, grpc.insecure_channel(s.target) as ch:  # fmt: skip
        models = model_service_pb2_grpc.ModelServiceStub(ch)
        predict = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        assert s.warmup_records[("quickdraw", 1)] == 4
        versions(base, 2)
        until(lambda: status(models) == [(2, LOADING), (1, AVAILABLE)])
        assert predict.Predict(request(), timeout=30).model_spec.version.value == 1  # still served while 2 loads
        until(lambda: status(models) == [(2, AVAILABLE), (1, END)])
        assert predict.Predict(request(), timeout=30).model_spec.version.value == 2
        assert failure(lambda: predict.Predict(request(version=1), timeout=30)) == (
            C.NOT_FOUND, "Servable not found for request: Specific(quickdraw, 1)")  # fmt: skip
        seq = [(v, st) for _, v, st, _ in s.transitions]
        assert seq[-5:] == [(2, "START"), (2, "LOADING"), (2, "AVAILABLE"), (1, "UNLOADING"), (1, "END")]
        assert s.warmup_records[("quickdraw", 2)] == 4


def test_failed_warmup_fails_the_load(tmp_path: Path) -> None:
    """A warm-up record that fails makes the load fail: END, with the error as the version's status.

    saved_model_warmup_util.cc RunSavedModelWarmup returns the request's error, which fails the load
    (saved_model_bundle_factory / loader harness -> kEnd with the error); get_model_status_impl.cc puts
    ToStatusProto(health) in ModelVersionStatus.status.
    """
    from tensorflow_serving.apis import prediction_log_pb2

    base = versions(tmp_path / "quickdraw", 1, 2)
    bad = prediction_log_pb2.PredictionLog()
    bad.predict_log.request.CopyFrom(request(signature="nope"))
    with tf.io.TFRecordWriter(str(base / "2" / "assets.extra" / "tf_serving_warmup_requests")) as w:
        w.write(bad.SerializeToString())
    with TFServingStandIn(base) as s, grpc.insecure_channel(s.target) as ch:
        resp = model_service_pb2_grpc.ModelServiceStub(ch).GetModelStatus(
            get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "quickdraw"}), timeout=10)  # fmt: skip
        got = {s.version: (s.state, s.status.error_code, s.status.error_message) for s in resp.model_version_status}
        assert got == {2: (END, C.FAILED_PRECONDITION.value[0], 'Serving signature key "nope" not found.'),
                       1: (AVAILABLE, 0, "")}  # fmt: skip


def test_labels_on_unavailable_versions_are_refused_at_reload(tmp_path: Path) -> None:
    """A config reload that labels a version not AVAILABLE is refused whole, unless the flag allows new labels.

    server_core.cc ReloadConfig calls UpdateModelVersionLabelMap before AddModelsViaModelConfigList: FAILED_PRECONDITION
    'Request to assign label to version 3 of model quickdraw, which is not currently available for inference',
    and the policy change in the same config is not applied either. With
    --allow_version_labels_for_unavailable_models a new label may name such a version (calls with it are then
    NOT_FOUND Specific(quickdraw, 3)), but an existing label may not be moved to one.
    """
    base = versions(tmp_path / "quickdraw", 1, 2, 3)
    REFUSED = "Request to assign label to version 3 of model quickdraw, which is not currently available for inference"
    config = model_server_config_pb2.ModelServerConfig()
    mc = config.model_config_list.config.add(name="quickdraw", base_path=str(base))
    mc.model_version_policy.specific.versions.extend([1, 2])
    for allow in (False, True):
        with TFServingStandIn(model_config=config, allow_version_labels_for_unavailable_models=allow,
                              enable_model_warmup=False) as s, grpc.insecure_channel(s.target) as ch:  # fmt: skip
            predict = prediction_service_pb2_grpc.PredictionServiceStub(ch)
            models = model_service_pb2_grpc.ModelServiceStub(ch)
            labelled = model_server_config_pb2.ModelServerConfig()
            labelled.CopyFrom(config)
            labelled.model_config_list.config[0].version_labels["stable"] = 1
            s.reload_config(labelled)
            assert predict.Predict(request(label="stable"), timeout=30).model_spec.version.value == 1
            canary = model_server_config_pb2.ModelServerConfig()
            canary.CopyFrom(labelled)
            canary.model_config_list.config[0].version_labels["canary"] = 3
            if not allow:
                canary.model_config_list.config[0].model_version_policy.specific.versions.append(3)
                with pytest.raises(ServingError) as err:
                    s.reload_config(canary)
                assert (err.value.code, err.value.message) == (C.FAILED_PRECONDITION, REFUSED)
                assert status(models) == [(2, AVAILABLE), (1, AVAILABLE)]  # the policy change was not applied
                continue
            s.reload_config(canary)  # a new label on a version that is not loaded: allowed
            assert failure(lambda: predict.Predict(request(label="canary"), timeout=30)) == (  # noqa: B023 - called at once
                C.NOT_FOUND, "Servable not found for request: Specific(quickdraw, 3)")  # fmt: skip
            canary.model_config_list.config[0].version_labels["stable"] = 3
            with pytest.raises(ServingError) as err:
                s.reload_config(canary)  # moving an existing label onto it: refused even so
            assert (err.value.code, err.value.message) == (C.FAILED_PRECONDITION, REFUSED)
            assert predict.Predict(request(label="stable"), timeout=30).model_spec.version.value == 1


def test_batching_merges_pads_and_refuses_as_the_scheduler_does(three: Path) -> None:
    """Concurrent Predicts share one model call; a full queue is UNAVAILABLE, a too-big task INVALID_ARGUMENT.

    shared_batch_scheduler.h (TF core) ValidateBatchTaskQueueCapacity: 'Task size 5 is larger than maximum input
    batch size 4' (INVALID_ARGUMENT); a task that does not fit the open batch when max_enqueued_batches batches
    wait is UNAVAILABLE 'The batch scheduling queue to which this task was submitted is full; currently 1 batches
    enqueued and max_enqueued_batches is 1'. batching_session.cc pads a batch up to the next allowed_batch_sizes
    entry; batching_util.h records padding_size / processed_batch_size; bundle_factory_util.h GetQueueOptions
    maps BatchingParameters onto the queue options.
    """
    params = read_text_proto(
        ROOT / "deploy" / "tfserving" / "batching.config", batching_parameters_pb2.BatchingParameters()
    )
    assert params.max_batch_size.value == 256  # the real file parses; the test then uses small numbers
    params = batching_parameters_pb2.BatchingParameters()
    text = "max_batch_size { value: 4 } batch_timeout_micros { value: 0 } max_enqueued_batches { value: 1 } "
    text += "num_batch_threads { value: 1 } allowed_batch_sizes: 2 allowed_batch_sizes: 4"
    from google.protobuf import text_format

    text_format.Parse(text, params)
    with TFServingStandIn(three, batching_parameters=params, workers=16, enable_model_warmup=False) as s, \
            grpc.insecure_channel(s.target) as ch, futures.ThreadPoolExecutor(8) as pool:  # fmt: skip
        predict = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        predict.Predict(request(1), timeout=30)  # the first call traces the function: keep it out of the timing
        runs0 = s.metrics.wrapped_run_count.cells.get((), 0)
        s.delay_s = 1.0
        first = pool.submit(predict.Predict, request(3), timeout=30)  # its batch runs (1 s) ...
        until(lambda: s.metrics.wrapped_run_count.cells[()] == runs0 + 1)
        merged = [pool.submit(predict.Predict, request(1), timeout=30) for _ in range(2)]  # ... these two wait, merged
        until(lambda: s.batcher is not None and s.batcher.enqueued() == 2)
        assert failure(lambda: predict.Predict(request(3), timeout=30)) == (
            C.UNAVAILABLE, "The batch scheduling queue to which this task was submitted is full; currently 1 batches "
            "enqueued and max_enqueued_batches is 1")  # fmt: skip
        assert failure(lambda: predict.Predict(request(5), timeout=30)) == (
            C.INVALID_ARGUMENT, "Task size 5 is larger than maximum input batch size 4")  # fmt: skip
        shapes = [tf.make_ndarray(f.result().outputs["probabilities"]).shape for f in [first, *merged]]
        assert shapes == [(3, 29), (1, 29), (1, 29)]
        assert s.metrics.wrapped_run_count.cells[()] - runs0 == 2  # 3 calls, 2 model runs
        # padding_size per execution batch size: 3 -> 4 (1 row of padding), 2 merged -> 2 (none)
        assert s.metrics.padding_size.cells[("4",)][-1] >= 1 and ("2",) in s.metrics.padding_size.cells
    text_format.Parse("allowed_batch_sizes: 8", params)
    with pytest.raises(ValueError, match="Last entry in allowed_batch_sizes must match max_batch_size"):
        TFServingStandIn(three, batching_parameters=params, enable_model_warmup=False)


def test_process_flags_config_poll_and_prometheus_metrics(tmp_path: Path) -> None:
    """The process takes tensorflow_model_server's flags, re-reads its config file and exports TF's metrics.

    main.cc: --port, --rest_api_port, --model_config_file, --model_config_file_poll_wait_seconds,
    --file_system_poll_wait_seconds, --monitoring_config_file (--flag=value and --flag value). server.cc
    PollFilesystemAndReloadConfig re-reads the ModelServerConfig. http_server.cc serves Prometheus at the
    monitoring config's path; prometheus_exporter.cc names /tensorflow/serving/request_count
    ':tensorflow:serving:request_count'; util.cc RecordModelRequestCount counts every Predict by model_name and
    status (the code's name).
    """
    base = versions(tmp_path / "quickdraw", 1, 2)
    config = tmp_path / "models.config"
    real = (ROOT / "deploy" / "tfserving" / "models.config").read_text()
    config.write_text(real.replace("/models/quickdraw", str(base)))  # latest { num_versions: 2 }
    http_port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "tfserving_standin.py"), "--port=0", "--rest_api_port", str(http_port),
         f"--model_config_file={config}", "--model_config_file_poll_wait_seconds", "0.3",
         "--file_system_poll_wait_seconds=0.3", "--monitoring_config_file",
         str(ROOT / "deploy" / "tfserving" / "monitoring.config"), "--enable_model_warmup=false"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.fullmatch(r"tfserving stand-in: serving quickdraw on (127\.0\.0\.1:\d+)\n", line)
        assert m, line
        with grpc.insecure_channel(m.group(1)) as ch:
            predict = prediction_service_pb2_grpc.PredictionServiceStub(ch)
            models = model_service_pb2_grpc.ModelServiceStub(ch)
            assert status(models) == [(2, AVAILABLE), (1, AVAILABLE)]
            for _ in range(2):
                predict.Predict(request(), timeout=30)
            failure(lambda: predict.Predict(request(signature="nope"), timeout=30))
            failure(lambda: predict.Predict(request(name="other"), timeout=30))
            config.write_text(
                real.replace("/models/quickdraw", str(base)).replace("num_versions: 2", "num_versions: 1")
            )
            until(lambda: status(models) == [(2, AVAILABLE), (1, END)])
        url = f"http://127.0.0.1:{http_port}/monitoring/prometheus/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        assert "# TYPE :tensorflow:serving:request_count counter" in text
        assert ':tensorflow:serving:request_count{model_name="quickdraw",status="OK"} 2\n' in text
        # prometheus-client's parser reads it (and calls counter samples *_total: key counters by family name)
        samples = {(fam.name if fam.type == "counter" else s.name, tuple(sorted(s.labels.items()))): s.value
                   for fam in text_string_to_metric_families(text) for s in fam.samples}  # fmt: skip
        count = ":tensorflow:serving:request_count"
        assert samples[(count, (("model_name", "quickdraw"), ("status", "FAILED_PRECONDITION")))] == 1
        assert samples[(count, (("model_name", "other"), ("status", "NOT_FOUND")))] == 1
        latency = ":tensorflow:serving:request_latency_count"
        assert samples[(latency, (("API", "Predict"), ("entrypoint", "GRPC"), ("model_name", "quickdraw")))] == 2
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10)
        assert err.value.code == 404
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def test_help_names_every_flag() -> None:
    """--help documents the tensorflow_model_server flags (main.cc) and the --standin_ ones."""
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "tfserving_standin.py"), "--help"],
                         capture_output=True, text=True, timeout=120, check=True).stdout  # fmt: skip
    for flag in ("--port", "--rest_api_port", "--model_name", "--model_base_path", "--model_config_file",
                 "--model_config_file_poll_wait_seconds", "--file_system_poll_wait_seconds", "--enable_batching",
                 "--batching_parameters_file", "--monitoring_config_file",
                 "--allow_version_labels_for_unavailable_models", "--standin_load_seconds",
                 "--standin_poll_offset_seconds", "--standin_delay_ms"):  # fmt: skip
        assert re.search(rf"^\s+{flag}\b.*\n?\s+\S", out, re.M), flag
    monitoring = read_text_proto(ROOT / "deploy" / "tfserving" / "monitoring.config",
                                 monitoring_config_pb2.MonitoringConfig())  # fmt: skip
    assert monitoring.prometheus_config.path == "/monitoring/prometheus/metrics"
