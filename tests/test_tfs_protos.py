"""TF Serving's API without TensorFlow (``service.protos.tfs``): the vendored protos against the 2.21.0 wheels.

- Serving with ``--backend tfserving`` imports no TensorFlow: the gateway's modules load in a fresh interpreter
  without a single ``tensorflow*`` module.
- The vendored protos are TF Serving 2.21.0's and TensorFlow 2.21.0's: compiled, every file equals the
  descriptor that the ``tensorflow`` and ``tensorflow-serving-api`` wheels embed (the two service files are
  trimmed: the methods they keep are equal).
- The private classes and TensorFlow's live in one process and read each other's bytes.
- ``service.protos.tensors`` decodes the typed ``*_val`` fields TF Serving may answer with.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from importlib import metadata

import numpy as np
import pytest
from conftest import ROOT
from google.protobuf import descriptor_pb2, descriptor_pool

from service.protos import tfs
from service.protos.tensors import TensorDecodeError, from_numpy, to_numpy

GATEWAY_MODULES = (
    "service.app", "service.backends.tfserving", "service.frontends.tfserving.grpc_api", "service.protos.tensors",
    "service.preprocess.validation",
    "loadtest.engine", "quickdraw.commands.serve", "quickdraw.cli",
)  # fmt: skip


def test_the_gateway_loads_no_tensorflow() -> None:
    code = (
        "import sys, time\n"
        "t0 = time.perf_counter()\n"
        f"for name in {GATEWAY_MODULES!r}: __import__(name)\n"
        "took = time.perf_counter() - t0\n"
        "import json\n"
        "print(json.dumps({'took_s': took, 'tf': sorted(m for m in sys.modules if m.startswith('tensorflow'))}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["tf"] == [], f"TensorFlow was imported: {out['tf']}"
    print(f"gateway modules imported in {out['took_s']:.2f} s without TensorFlow")


def test_no_gateway_module_imports_tensorflow_even_lazily() -> None:
    files = [*(ROOT / "service").rglob("*.py"), *(ROOT / "loadtest").rglob("*.py"),
             ROOT / "quickdraw" / "commands" / "serve.py"]
    allowed = {ROOT / "service" / "backends" / "embedded.py"}  # the embedded backend runs the SavedModel
    bad = []
    for path in sorted(set(files) - allowed):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            bad += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                    if n.split(".")[0] in {"tensorflow", "tensorflow_serving"}]  # fmt: skip
    assert bad == []


def _camel(name: str) -> str:
    """protoc's default json_name for a field name."""
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def _strip_default_json_names(messages: list[descriptor_pb2.DescriptorProto]) -> None:
    """Drop json_name where protoc made it up (the wheels' embedded descriptors omit those)."""
    for m in messages:
        for f in list(m.field) + list(m.extension):
            if f.json_name == _camel(f.name):
                f.ClearField("json_name")
        _strip_default_json_names(list(m.nested_type))


def test_vendored_protos_are_the_2_21_wheels() -> None:
    versions = {d: metadata.version(d) for d in ("tensorflow", "tensorflow-serving-api")}
    if not all(v.startswith("2.21.") for v in versions.values()):
        pytest.skip(f"the vendored protos are 2.21's; installed: {versions}")
    from tensorflow_serving.apis import model_service_pb2, prediction_service_pb2  # noqa: F401

    data = (ROOT / "service" / "protos" / "tfs" / tfs.DESCRIPTOR_SET).read_bytes()
    files = descriptor_pb2.FileDescriptorSet.FromString(data).file
    ours = [f for f in files if not f.name.startswith("google/protobuf/")]
    trimmed = {"tensorflow_serving/apis/prediction_service.proto", "tensorflow_serving/apis/model_service.proto"}
    assert len(ours) == 27 and trimmed <= {f.name for f in ours}, [f.name for f in ours]
    for fd in ours:
        _strip_default_json_names(list(fd.message_type))
        theirs = descriptor_pb2.FileDescriptorProto.FromString(
            descriptor_pool.Default().FindFileByName(fd.name).serialized_pb
        )
        if fd.name in trimmed:  # fewer methods (and imports), each exactly as in the wheel
            [service], [full] = fd.service, theirs.service
            assert service.name == full.name and fd.package == theirs.package
            assert set(fd.dependency) <= set(theirs.dependency)
            upstream = {m.name: m for m in full.method}
            assert service.method and all(m == upstream[m.name] for m in service.method), fd.name
            continue
        assert fd == theirs, f"{fd.name} differs from the one in the wheels: see protos/third_party/tfserving/README.md"


def test_method_paths_are_tf_servings() -> None:
    from tensorflow_serving.apis import model_service_pb2, prediction_service_pb2

    prediction = prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"]
    model = model_service_pb2.DESCRIPTOR.services_by_name["ModelService"]
    assert (prediction.full_name, model.full_name) == (tfs.PREDICTION_SERVICE, tfs.MODEL_SERVICE)
    paths = {f"/{s.full_name}/{m}" for s, m in [(prediction, "Predict"), (prediction, "GetModelMetadata"),
                                                 (model, "GetModelStatus")] if m in s.methods_by_name}  # fmt: skip
    assert paths == {tfs.PREDICT, tfs.GET_MODEL_METADATA, tfs.GET_MODEL_STATUS}
    assert prediction.methods_by_name["Predict"].input_type.full_name == tfs.PredictRequest.DESCRIPTOR.full_name


def test_private_and_tensorflow_classes_round_trip_the_same_bytes() -> None:
    from tensorflow.core.framework import types_pb2
    from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, predict_pb2

    assert tfs.PredictRequest is not predict_pb2.PredictRequest  # two pools, no clash
    assert tfs.DT_UINT8 == types_pb2.DT_UINT8 and tfs.DT_STRING == types_pb2.DT_STRING
    theirs = predict_pb2.PredictRequest(output_filter=["probabilities"])
    theirs.model_spec.name = "quickdraw"
    theirs.model_spec.version.value = 3
    theirs.model_spec.signature_name = "serving_default"
    image = theirs.inputs["image"]
    image.dtype = types_pb2.DT_UINT8
    image.tensor_shape.dim.add(size=1)
    image.tensor_shape.dim.add(size=4)
    image.tensor_content = bytes(range(4))
    labels = theirs.inputs["labels"]
    labels.dtype = types_pb2.DT_STRING
    labels.tensor_shape.dim.add(size=2)
    labels.string_val.extend([b"cat", "ß".encode()])
    theirs.inputs["scores"].float_val.extend([0.25, 0.5])
    theirs.request_options.client_id = b"c"
    wire = theirs.SerializeToString(deterministic=True)

    ours = tfs.PredictRequest.FromString(wire)
    assert ours.SerializeToString(deterministic=True) == wire
    assert predict_pb2.PredictRequest.FromString(ours.SerializeToString()) == theirs
    assert ours.model_spec.version.value == 3 and list(ours.output_filter) == ["probabilities"]
    np.testing.assert_array_equal(to_numpy(ours.inputs["image"]), [[0, 1, 2, 3]])
    np.testing.assert_array_equal(to_numpy(theirs.inputs["image"]), to_numpy(ours.inputs["image"]))
    assert list(to_numpy(ours.inputs["labels"])) == [b"cat", "ß".encode()]
    with pytest.raises(TypeError):  # the classes are not interchangeable as objects, only as bytes
        theirs.inputs["image"].CopyFrom(from_numpy(np.zeros((1, 4), np.uint8)))

    # the response: ours serialized, parsed by TensorFlow's
    resp = tfs.PredictResponse()
    resp.model_spec.name = "quickdraw"
    resp.outputs["probabilities"].CopyFrom(from_numpy(np.array([[0.25, 0.75]], np.float32)))
    back = predict_pb2.PredictResponse.FromString(resp.SerializeToString())
    assert back.SerializeToString(deterministic=True) == resp.SerializeToString(deterministic=True)
    np.testing.assert_array_equal(to_numpy(back.outputs["probabilities"]), [[0.25, 0.75]])

    # metadata: the signature_def map in an Any, packed by one side and unpacked by the other
    meta = get_model_metadata_pb2.GetModelMetadataResponse()
    sigs = get_model_metadata_pb2.SignatureDefMap()
    sig = sigs.signature_def["serving_default"]
    sig.method_name = "tensorflow/serving/predict"
    sig.inputs["image"].dtype = types_pb2.DT_UINT8
    sig.outputs["probabilities"].tensor_shape.dim.add(size=-1)
    meta.metadata["signature_def"].Pack(sigs)
    mine = tfs.GetModelMetadataResponse.FromString(meta.SerializeToString())
    assert mine.metadata["signature_def"].type_url == tfs.SIGNATURE_DEF_MAP_URL
    unpacked = tfs.SignatureDefMap()
    assert mine.metadata["signature_def"].Unpack(unpacked)
    assert unpacked.SerializeToString(deterministic=True) == sigs.SerializeToString(deterministic=True)
    repacked = tfs.GetModelMetadataResponse()
    repacked.metadata["signature_def"].Pack(unpacked)
    assert get_model_metadata_pb2.GetModelMetadataResponse.FromString(repacked.SerializeToString()) == meta

    status = tfs.GetModelStatusResponse()
    status.model_version_status.add(version=1, state=tfs.AVAILABLE).status.error_message = "fine"
    theirs_status = get_model_status_pb2.GetModelStatusResponse.FromString(status.SerializeToString())
    assert theirs_status.model_version_status[0].state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert tfs.GetModelStatusResponse.FromString(theirs_status.SerializeToString()) == status


def _tensor(dtype: int, dims: list[int], **values: object) -> object:
    return tfs.TensorProto(dtype=dtype, tensor_shape={"dim": [{"size": d} for d in dims]}, **values)


@pytest.mark.parametrize(
    ("tensor", "expected"),
    [
        (_tensor(tfs.DT_FLOAT, [2], float_val=[0.5, 1.5]), np.array([0.5, 1.5], np.float32)),
        (_tensor(tfs.DT_DOUBLE, [1, 2], double_val=[0.1, 2.0]), np.array([[0.1, 2.0]], np.float64)),
        (_tensor(tfs.DT_INT32, [3], int_val=[-1, 0, 7]), np.array([-1, 0, 7], np.int32)),
        (_tensor(tfs.DT_UINT8, [2], int_val=[0, 255]), np.array([0, 255], np.uint8)),
        (_tensor(tfs.DT_INT8, [2], int_val=[-128, 127]), np.array([-128, 127], np.int8)),
        (_tensor(tfs.DT_INT16, [1], int_val=[-300]), np.array([-300], np.int16)),
        (_tensor(tfs.DT_INT64, [2], int64_val=[-(2**40), 2**40]), np.array([-(2**40), 2**40], np.int64)),
        (_tensor(tfs.DT_UINT32, [1], uint32_val=[2**32 - 1]), np.array([2**32 - 1], np.uint32)),
        (_tensor(tfs.DT_UINT64, [1], uint64_val=[2**64 - 1]), np.array([2**64 - 1], np.uint64)),
        (_tensor(tfs.DT_BOOL, [2], bool_val=[True, False]), np.array([True, False])),
        (_tensor(tfs.DT_STRING, [2], string_val=[b"cat", b""]), np.array([b"cat", b""], object)),
        (_tensor(tfs.DT_FLOAT, [2, 2], float_val=[3.0]), np.full((2, 2), 3.0, np.float32)),  # broadcast
        (_tensor(tfs.DT_STRING, [2], string_val=[b"x"]), np.array([b"x", b"x"], object)),
    ],
)
def test_to_numpy_reads_the_typed_fields(tensor: object, expected: np.ndarray) -> None:
    got = to_numpy(tensor)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


def test_to_numpy_refuses_typed_values_that_do_not_fit() -> None:
    with pytest.raises(TensorDecodeError, match="int_val"):
        to_numpy(_tensor(tfs.DT_INT32, [3], int_val=[1, 2]))
    with pytest.raises(TensorDecodeError, match="outside"):
        to_numpy(_tensor(tfs.DT_INT8, [1], int_val=[128]))
    with pytest.raises(TensorDecodeError, match="unsupported dtype DT_HALF"):
        to_numpy(_tensor(tfs.DT_HALF, [1], half_val=[1]))
    with pytest.raises(TypeError):  # float64 is read, never sent
        from_numpy(np.zeros(2))
