"""The Open Inference Protocol (KServe v2) on the gateway, through clients nobody here wrote: ``tritonclient``'s gRPC
and HTTP clients (PyPI), against real gateways on the embedded backend and on the tfserving backend (the TF
Serving stand-in), checked against the offline SavedModel.

Also: the classification extension against the custom API's top-3, Triton's error codes through tritonclient,
the other input forms (PNG, strokes JSON), Triton's ModelStreamInfer, the HTTP side's JSON and binary data, and
that ``make protos`` reproduces the committed descriptor set. 57-75 s on 2 shared cores (most of it starting two
gateways, TensorFlow and the stand-in).
"""

from __future__ import annotations

import io
import json
import queue
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from harness import SHIPPED_MODEL, RunningGateway
from PIL import Image

from doodle.formats import open_bitmaps
from quickdraw_client.v1 import classifier_pb2 as pb
from quickdraw_client.v1 import classifier_pb2_grpc as pb_grpc
from service.backends import find_versions

tritongrpc = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc,http] is in the dev extra")
tritonhttp = pytest.importorskip("tritonclient.http", reason="tritonclient[grpc,http] is in the dev extra")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.skipif(
    not find_versions(SHIPPED_MODEL), reason=f"no SavedModel under {SHIPPED_MODEL} (the shipped model is missing)"
)
ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "quickdraw"
MODEL = "quickdraw"


def sample_bitmaps(n: int) -> np.ndarray:
    """``n`` real bitmaps, round-robin over the sample classes."""
    files = sorted((SAMPLE / "numpy_bitmap").glob("*.npy"))
    if not files:
        pytest.skip(f"Quick, Draw! sample data not found at {SAMPLE}")
    per = -(-n // len(files))
    rows = np.concatenate([np.asarray(open_bitmaps(f)[:per]) for f in files])[:n]
    return rows.reshape(-1, 28, 28, 1).astype(np.uint8)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return sample_bitmaps(1000)


@pytest.fixture(scope="module")
def offline(images: np.ndarray) -> np.ndarray:
    """The offline SavedModel's probabilities for the 1,000 sample bitmaps."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(SHIPPED_MODEL / str(find_versions(SHIPPED_MODEL)[-1])))
    return loaded.signatures["serving_default"](image=tf.constant(images))["probabilities"].numpy()


@pytest.fixture(scope="module")
def embedded() -> Iterator[RunningGateway]:
    with RunningGateway(max_batch_delay_ms=1.0, max_drawings_per_request=64) as gw:
        yield gw


@pytest.fixture(scope="module")
def tfserving(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    from tfserving_standin import TFServingStandIn

    base = tmp_path_factory.mktemp("oip-models") / MODEL
    base.mkdir()
    shipped = SHIPPED_MODEL / str(find_versions(SHIPPED_MODEL)[-1])
    for v in (1, 2):
        (base / str(v)).symlink_to(shipped.resolve(), target_is_directory=True)
    with (
        TFServingStandIn(base) as standin,
        RunningGateway(backend="tfserving", tfserving_target=standin.target, model_dir=base, max_batch_delay_ms=1.0,
                       max_drawings_per_request=64, tfserving_status_poll_s=0.2) as gw,
    ):  # fmt: skip
        yield gw


@pytest.fixture(params=["embedded", "tfserving"])
def gateway(request: pytest.FixtureRequest) -> RunningGateway:
    return request.getfixturevalue(request.param)


def grpc_client(gw: RunningGateway) -> tritongrpc.InferenceServerClient:
    return tritongrpc.InferenceServerClient(gw.target)


def http_client(gw: RunningGateway) -> tritonhttp.InferenceServerClient:
    return tritonhttp.InferenceServerClient(f"127.0.0.1:{gw.app.http_port}", connection_timeout=30, network_timeout=60)


def infer_probs(client: object, module: object, batch: np.ndarray, **kwargs: object) -> tuple[np.ndarray, object]:
    inp = module.InferInput("image", list(batch.shape), "UINT8")  # type: ignore[attr-defined]
    inp.set_data_from_numpy(batch)
    result = client.infer(MODEL, [inp], **kwargs)  # type: ignore[attr-defined]
    return result.as_numpy("probabilities"), result


# --- acceptance: 1,000 bitmaps in batches of 1 and 64, both clients, both backends ------------------------------


@pytest.mark.parametrize("client_kind", ["grpc", "http"])
def test_tritonclient_gets_the_offline_probabilities(
    gateway: RunningGateway, client_kind: str, images: np.ndarray, offline: np.ndarray
) -> None:
    module = tritongrpc if client_kind == "grpc" else tritonhttp
    client = grpc_client(gateway) if client_kind == "grpc" else http_client(gateway)
    default = gateway.app._gateway.model.default_version  # type: ignore[union-attr]
    for size in (1, 64):
        got = []
        for start in range(0, len(images), size):
            probs, result = infer_probs(client, module, images[start : start + size])
            got.append(probs)
        assert result.get_response()  # type: ignore[attr-defined]
        np.testing.assert_allclose(np.concatenate(got), offline, atol=1e-5, err_msg=f"batches of {size}")
        response = result.get_response()  # type: ignore[attr-defined]
        version = response.model_version if client_kind == "grpc" else response["model_version"]
        assert version == str(default)
    client.close()
    metrics = gateway.scrape()
    method = "ModelInfer" if client_kind == "grpc" else "http:ModelInfer"
    assert metrics[f'quickdraw_request_duration_seconds_count{{code="OK",method="{method}"}}'] >= 1016


def test_typed_contents_and_json_data_equal_raw(embedded: RunningGateway, images: np.ndarray,
                                                offline: np.ndarray) -> None:  # fmt: skip
    """tritonclient.grpc sends raw_input_contents; a hand-made request with ``uint_contents``, and the HTTP client's
    JSON ``data`` (binary_data=False), give the same answer."""
    from service.protos import oip

    batch = images[:5]
    req = oip.ModelInferRequest(model_name=MODEL)
    t = req.inputs.add(name="image", datatype="UINT8", shape=[5, 28, 28, 1])
    t.contents.uint_contents.extend(batch.reshape(-1).tolist())
    with grpc.insecure_channel(embedded.target) as ch:
        resp = oip.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=30)
    # probabilities first; known_score too when the model exports it (issue 18)
    assert resp.outputs[0].name == "probabilities" and list(resp.outputs[0].shape) == [5, 29]
    assert [o.name for o in resp.outputs][1:] in ([], ["known_score"])
    np.testing.assert_allclose(np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(5, 29), offline[:5],
                               atol=1e-5)  # fmt: skip
    client = http_client(embedded)
    inp = tritonhttp.InferInput("image", [5, 28, 28, 1], "UINT8")
    inp.set_data_from_numpy(batch, binary_data=False)
    out = tritonhttp.InferRequestedOutput("probabilities", binary_data=False)
    result = client.infer(MODEL, [inp], outputs=[out])
    assert "data" in result.get_response()["outputs"][0]
    np.testing.assert_allclose(result.as_numpy("probabilities"), offline[:5], atol=1e-5)


# --- the classification extension ------------------------------------------------------------------------------


def test_classification_top3_matches_the_custom_apis_top3(gateway: RunningGateway, images: np.ndarray) -> None:
    batch = images[:64]
    with grpc.insecure_channel(gateway.target) as ch:
        drawings = [pb.Drawing(bitmap=pb.Bitmap(pixels=b.tobytes())) for b in batch]
        custom = pb_grpc.ClassifierStub(ch).Classify(pb.ClassifyRequest(drawings=drawings, top_k=3), timeout=30)
    want = [[(p.index, p.label) for p in pred.top] for pred in custom.predictions]
    for module, client in ((tritongrpc, grpc_client(gateway)), (tritonhttp, http_client(gateway))):
        inp = module.InferInput("image", list(batch.shape), "UINT8")
        inp.set_data_from_numpy(batch)
        result = client.infer(MODEL, [inp], outputs=[module.InferRequestedOutput("probabilities", class_count=3)])
        got = result.as_numpy("probabilities")
        assert got.shape == (64, 3)
        parsed = [[e.decode().split(":") for e in row] for row in got]
        assert [[(int(i), label) for _, i, label in row] for row in parsed] == want, module.__name__
        scores = [[p.score for p in pred.top] for pred in custom.predictions]
        np.testing.assert_allclose([[float(s) for s, _, _ in row] for row in parsed], scores, atol=1e-6)


# --- errors through tritonclient -------------------------------------------------------------------------------


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image.reshape(28, 28)).save(buf, format="PNG")
    return buf.getvalue()


ERRORS = {  # mistake: (gRPC code, HTTP status, words of the message)
    "wrong shape": ("INVALID_ARGUMENT", "400", "unexpected shape for input 'image' for model 'quickdraw'. "
                                              "Expected [-1,28,28,1], got [2,28,28]"),
    "wrong datatype": ("INVALID_ARGUMENT", "400", "inference input 'image' data-type is 'FP32', but model "
                                                  "'quickdraw' expects 'UINT8'"),
    "unknown input": ("INVALID_ARGUMENT", "400", "unexpected inference input 'pixels' for model 'quickdraw'"),
    "unknown model": ("NOT_FOUND", "404", "Request for unknown model: 'sketches' is not found"),
    "unknown version": ("NOT_FOUND", "404", "Request for unknown model: 'quickdraw' version 9 is not found"),
    "over-limit batch": ("INVALID_ARGUMENT", "400", "inference request batch-size must be <= 64 for 'quickdraw'"),
    "undecodable image": ("INVALID_ARGUMENT", "400", "inputs[encoded_image][1]"),
    "unknown output": ("INVALID_ARGUMENT", "400", "unexpected inference output 'logits' for model 'quickdraw'"),
}  # fmt: skip


def _mistake(module: object, mistake: str, images: np.ndarray) -> tuple[str, list[object], dict[str, object]]:
    m = module
    model, kwargs, outputs = MODEL, {}, None
    if mistake == "wrong shape":
        inp = m.InferInput("image", [2, 28, 28], "UINT8")  # type: ignore[attr-defined]
        inp.set_data_from_numpy(images[:2].reshape(2, 28, 28))
    elif mistake == "wrong datatype":
        inp = m.InferInput("image", [2, 28, 28, 1], "FP32")  # type: ignore[attr-defined]
        inp.set_data_from_numpy(images[:2].astype(np.float32))
    elif mistake == "over-limit batch":
        inp = m.InferInput("image", [65, 28, 28, 1], "UINT8")  # type: ignore[attr-defined]
        inp.set_data_from_numpy(images[:65])
    elif mistake == "undecodable image":
        inp = m.InferInput("encoded_image", [2], "BYTES")  # type: ignore[attr-defined]
        inp.set_data_from_numpy(np.array([_png(images[0]), b"\x89PNG\r\n\x1a\n not a png"], dtype=object))
    else:
        name = "pixels" if mistake == "unknown input" else "image"
        inp = m.InferInput(name, [2, 28, 28, 1], "UINT8")  # type: ignore[attr-defined]
        inp.set_data_from_numpy(images[:2])
        model = "sketches" if mistake == "unknown model" else MODEL
        if mistake == "unknown version":
            kwargs["model_version"] = "9"
        if mistake == "unknown output":
            outputs = [m.InferRequestedOutput("logits")]  # type: ignore[attr-defined]
    if outputs is not None:
        kwargs["outputs"] = outputs
    return model, [inp], kwargs


@pytest.mark.parametrize("mistake", list(ERRORS))
def test_errors_reach_tritonclient_with_the_protocols_code(embedded: RunningGateway, images: np.ndarray,
                                                           mistake: str) -> None:  # fmt: skip
    code, http_status, words = ERRORS[mistake]
    for module, client, want in ((tritongrpc, grpc_client(embedded), f"StatusCode.{code}"),
                                 (tritonhttp, http_client(embedded), http_status)):  # fmt: skip
        model, inputs, kwargs = _mistake(module, mistake, images)
        with pytest.raises(InferenceServerException) as err:
            client.infer(model, inputs, **kwargs)
        assert err.value.status() == want, (module.__name__, err.value)
        assert words in err.value.message(), (module.__name__, err.value.message())
    # field-level details, as the other APIs give (through a plain gRPC call: tritonclient keeps only the message)
    if mistake == "wrong datatype":
        from google.rpc import error_details_pb2
        from grpc_status import rpc_status

        from service.protos import oip

        req = oip.ModelInferRequest(model_name=MODEL)
        req.inputs.add(name="image", datatype="FP32", shape=[1, 28, 28, 1])
        req.raw_input_contents.append(np.zeros(784, np.float32).tobytes())
        with grpc.insecure_channel(embedded.target) as ch, pytest.raises(grpc.RpcError) as rpc_err:
            oip.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=10)
        status = rpc_status.from_call(rpc_err.value)
        assert status is not None
        detail = error_details_pb2.BadRequest()
        status.details[0].Unpack(detail)
        assert detail.field_violations[0].field == "inputs[image].datatype"


# --- health, metadata, versions --------------------------------------------------------------------------------


def test_health_and_metadata_through_tritonclient(gateway: RunningGateway) -> None:
    model = gateway.app._gateway.model  # type: ignore[union-attr]
    for client in (grpc_client(gateway), http_client(gateway)):
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(MODEL)
        assert client.is_model_ready(MODEL, str(model.versions[0]))
        assert not client.is_model_ready(MODEL, "99")
        server = client.get_server_metadata()
        meta = client.get_model_metadata(MODEL)
        if isinstance(server, dict):  # HTTP: JSON
            extensions, versions = server["extensions"], meta["versions"]
            inputs, outputs = meta["inputs"], meta["outputs"]
            pairs = [(t["name"], t["datatype"], list(t["shape"])) for t in inputs]
            out = [(t["name"], t["datatype"], list(t["shape"])) for t in outputs]
        else:
            extensions, versions = list(server.extensions), list(meta.versions)
            pairs = [(t.name, t.datatype, list(t.shape)) for t in meta.inputs]
            out = [(t.name, t.datatype, list(t.shape)) for t in meta.outputs]
        assert "classification" in extensions
        assert versions == [str(v) for v in model.versions]
        want = [("image", "UINT8", [-1, 28, 28, 1]), ("encoded_image", "BYTES", [-1]), ("strokes", "BYTES", [-1])]
        assert pairs == want
        assert out[0] == ("probabilities", "FP32", [-1, len(model.labels)])


def test_versions_map_to_model_version(tfserving: RunningGateway, images: np.ndarray) -> None:
    client = grpc_client(tfserving)
    for version in ("1", "2"):
        _, result = infer_probs(client, tritongrpc, images[:2], model_version=version)
        assert result.get_response().model_version == version
    _, result = infer_probs(client, tritongrpc, images[:2])  # the backend's choice: the version that answered
    assert result.get_response().model_version == "2"


@pytest.mark.parametrize("text", ["\u0661", "+1", "1_0", " 1", "1.0", "9" * 20], ids=["arabic-indic", "plus",
                                                                                    "underscore", "space", "float",
                                                                                    "over-int64"])  # fmt: skip
def test_a_version_is_ascii_digits_and_nothing_else(tfserving: RunningGateway, images: np.ndarray, text: str) -> None:
    """One version parser (service/core/versions.py): Python's int() reads '\u0661' and '+1' as 1 and '1_0' as 10;
    the gateway refuses them as Triton's words say, over gRPC, naming model_version."""
    with pytest.raises(InferenceServerException, match="version should be an integral value"):
        infer_probs(grpc_client(tfserving), tritongrpc, images[:1], model_version=text)


@pytest.mark.parametrize("client_kind", ["grpc", "http"])
def test_an_output_asked_for_twice_is_refused(tfserving: RunningGateway, images: np.ndarray, client_kind: str) -> None:
    """Outputs are not built twice: the same output listed twice (1,000 times once made a 156 MB answer from a
    266 KB request) is INVALID_ARGUMENT before any work, in Triton's words, over gRPC and HTTP."""
    module = tritongrpc if client_kind == "grpc" else tritonhttp
    client = grpc_client(tfserving) if client_kind == "grpc" else http_client(tfserving)
    inp = module.InferInput("image", [2, 28, 28, 1], "UINT8")
    inp.set_data_from_numpy(images[:2])
    twice = [module.InferRequestedOutput("probabilities"), module.InferRequestedOutput("probabilities")]
    with pytest.raises(InferenceServerException, match="output 'probabilities' already exists in request"):
        client.infer(MODEL, [inp], outputs=twice)


# --- the other input forms, the stream, binary HTTP ------------------------------------------------------------


def test_png_and_strokes_inputs_classify_as_the_custom_api(embedded: RunningGateway, images: np.ndarray) -> None:
    pngs = [_png(img) for img in images[:3]]
    strokes = [{"strokes": [{"x": [10, 200, 120], "y": [20, 30, 220]}, {"x": [50, 60], "y": [200, 10]}]},
               {"strokes": [{"x": [5, 250], "y": [128, 128]}], "coordinates": "SIMPLIFIED"}]  # fmt: skip
    with grpc.insecure_channel(embedded.target) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        want_png = stub.Classify(pb.ClassifyRequest(drawings=[pb.Drawing(image=pb.EncodedImage(data=p)) for p in pngs],
                                                    top_k=3), timeout=30)  # fmt: skip
        from google.protobuf import json_format

        want_strokes = stub.Classify(
            pb.ClassifyRequest(drawings=[pb.Drawing(strokes=json_format.ParseDict(s, pb.Strokes())) for s in strokes],
                               top_k=3), timeout=30)  # fmt: skip
    for module, client in ((tritongrpc, grpc_client(embedded)), (tritonhttp, http_client(embedded))):
        for name, values, want in (("encoded_image", pngs, want_png),
                                   ("strokes", [json.dumps(s).encode() for s in strokes], want_strokes)):  # fmt: skip
            inp = module.InferInput(name, [len(values)], "BYTES")
            inp.set_data_from_numpy(np.array(values, dtype=object))
            result = client.infer(MODEL, [inp], outputs=[module.InferRequestedOutput("probabilities", class_count=3)])
            got = [[int(e.decode().split(":")[1]) for e in row] for row in result.as_numpy("probabilities")]
            assert got == [[p.index for p in pred.top] for pred in want.predictions], (module.__name__, name)


def test_model_stream_infer_answers_each_request(embedded: RunningGateway, images: np.ndarray,
                                                 offline: np.ndarray) -> None:  # fmt: skip
    answers: queue.Queue[tuple[object, object]] = queue.Queue()
    client = grpc_client(embedded)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    for i in range(20):
        inp = tritongrpc.InferInput("image", [1, 28, 28, 1], "UINT8")
        inp.set_data_from_numpy(images[i : i + 1])
        client.async_stream_infer(MODEL, [inp], request_id=str(i))
    bad = tritongrpc.InferInput("image", [1, 28, 28, 1], "FP32")
    bad.set_data_from_numpy(images[:1].astype(np.float32))
    client.async_stream_infer(MODEL, [bad], request_id="bad")
    got: dict[str, np.ndarray] = {}
    errors = []
    for _ in range(21):
        result, error = answers.get(timeout=30)
        if error is not None:
            errors.append(error)
        else:
            got[result.get_response().id] = result.as_numpy("probabilities")  # type: ignore[attr-defined]
    client.stop_stream()
    assert len(errors) == 1 and "data-type is 'FP32'" in str(errors[0])
    np.testing.assert_allclose(np.concatenate([got[str(i)] for i in range(20)]), offline[:20], atol=1e-5)
    assert embedded.scrape()['quickdraw_request_duration_seconds_count{code="OK",method="ModelStreamInfer"}'] >= 20


def test_http_v2_routes_and_binary_data(embedded: RunningGateway, images: np.ndarray, offline: np.ndarray) -> None:
    import urllib.error
    import urllib.request

    base = f"http://127.0.0.1:{embedded.app.http_port}/v2"
    version = embedded.app._gateway.model.default_version  # type: ignore[union-attr]
    for path, status in (("/health/live", 200), ("/health/ready", 200), ("/models/quickdraw/ready", 200),
                         (f"/models/quickdraw/versions/{version}", 200), ("/models/nope", 404),
                         ("/models/quickdraw/versions/9/ready", 404)):  # fmt: skip
        try:
            code = urllib.request.urlopen(base + path, timeout=10).status
        except urllib.error.HTTPError as exc:
            code = exc.code
            assert "error" in json.loads(exc.read())
        assert code == status, path
    header = json.dumps({"inputs": [{"name": "image", "shape": [2, 28, 28, 1], "datatype": "UINT8",
                                     "parameters": {"binary_data_size": 2 * 784}}],
                         "outputs": [{"name": "probabilities",
                                      "parameters": {"binary_data": True}}]}).encode()  # fmt: skip
    url = f"{base}/models/quickdraw/versions/{version}/infer"
    req = urllib.request.Request(url, data=header + images[:2].tobytes(),
                                 headers={"Inference-Header-Content-Length": str(len(header)),
                                          "Content-Type": "application/octet-stream"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as resp:
        body = resp.read()
        n = int(resp.headers["Inference-Header-Content-Length"])
    doc = json.loads(body[:n])
    assert doc["model_version"] == str(version)
    assert doc["outputs"][0]["parameters"]["binary_data_size"] == 2 * 29 * 4
    np.testing.assert_allclose(np.frombuffer(body[n:], "<f4").reshape(2, 29), offline[:2], atol=1e-5)


def test_make_protos_reproduces_the_descriptor_set(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rel = Path("service") / "protos" / "oip" / "oip.binpb"
    assert (tmp_path / rel).read_bytes() == (ROOT / rel).read_bytes(), f"{rel} is stale: run `make protos`"


# --- Triton's model configuration and statistics extensions; JSON errors on every route ------------------------


def _stats_totals(stats: object) -> dict[str, int]:
    """Sums over every version of a ModelStatistics answer (gRPC message or HTTP JSON), as plain ints."""
    if not isinstance(stats, dict):
        from google.protobuf import json_format

        stats = json_format.MessageToDict(stats, preserving_proto_field_name=True)
    totals = {"inference_count": 0, "execution_count": 0, "success": 0, "fail": 0, "success_ns": 0, "phases_ns": 0,
              "batch_2": 0}  # fmt: skip
    for s in stats["model_stats"]:  # type: ignore[index]
        totals["inference_count"] += int(s.get("inference_count", 0))
        totals["execution_count"] += int(s.get("execution_count", 0))
        inf = s.get("inference_stats", {})
        totals["success"] += int(inf.get("success", {}).get("count", 0))
        totals["fail"] += int(inf.get("fail", {}).get("count", 0))
        totals["success_ns"] += int(inf.get("success", {}).get("ns", 0))
        totals["phases_ns"] += sum(int(inf.get(p, {}).get("ns", 0)) for p in ("compute_input", "compute_infer",
                                                                                "compute_output"))  # fmt: skip
        totals["batch_2"] += sum(int(b.get("compute_infer", {}).get("count", 0)) for b in s.get("batch_stats", [])
                                 if int(b["batch_size"]) == 2)  # fmt: skip
    return totals


@pytest.fixture(scope="module")
def served() -> Iterator[object]:
    """A ``quickdraw serve`` process (embedded backend, the shipped model, free ports; ~5 s to start)."""
    from faults import gateway

    with gateway("--backend", "embedded", "--model-dir", str(SHIPPED_MODEL), "--max-drawings-per-request", "64") as gw:
        yield gw


def test_model_config_and_statistics_through_tritonclient(served: object, images: np.ndarray) -> None:
    """Against a ``quickdraw serve`` process, tritonclient's get_model_config and get_inference_statistics answer
    over gRPC and HTTP (what perf_analyzer and Model Analyzer ask first), and the statistics count what the gateway
    did: 3 gRPC calls of 2 drawings, one HTTP call of 4, and one refused call (a wrong shape) move the counts by
    exactly that."""
    from tritonclient.grpc import model_config_pb2

    g = tritongrpc.InferenceServerClient(served.target)  # type: ignore[attr-defined]
    h = tritonhttp.InferenceServerClient(f"127.0.0.1:{served.http_port}", connection_timeout=30,  # type: ignore[attr-defined]
                                         network_timeout=60)  # fmt: skip
    meta = h.get_model_metadata(MODEL)
    versions, labels = [int(v) for v in meta["versions"]], meta["outputs"][0]["shape"][1]
    config = g.get_model_config(MODEL).config
    assert (config.name, config.max_batch_size, config.platform) == (MODEL, 64, "tensorflow_savedmodel")
    assert [(i.name, i.data_type, list(i.dims), i.optional) for i in config.input] == [
        ("image", model_config_pb2.TYPE_UINT8, [28, 28, 1], False),
        ("encoded_image", model_config_pb2.TYPE_STRING, [1], True),
        ("strokes", model_config_pb2.TYPE_STRING, [1], True)]  # fmt: skip
    assert (config.output[0].name, list(config.output[0].dims)) == ("probabilities", [labels])
    assert config.HasField("dynamic_batching")
    assert list(config.version_policy.specific.versions) == versions
    default = int(config.parameters["default_version"].string_value)
    as_json = h.get_model_config(MODEL, str(default))
    assert as_json["max_batch_size"] == 64 and as_json["input"][0]["data_type"] == "TYPE_UINT8"
    assert as_json["input"][0]["dims"] == [28, 28, 1]
    for client in (g, h):
        with pytest.raises(InferenceServerException, match="unknown model"):
            client.get_model_config("nope")
        with pytest.raises(InferenceServerException, match="unknown model"):
            client.get_inference_statistics("nope")

    before_g, before_h = _stats_totals(g.get_inference_statistics(MODEL)), _stats_totals(h.get_inference_statistics())
    assert before_g == before_h, "both protocols report the same counts"
    for i in range(3):
        infer_probs(g, tritongrpc, images[2 * i : 2 * i + 2])
    infer_probs(h, tritonhttp, images[:4])
    wrong = tritongrpc.InferInput("image", [1, 28, 28], "UINT8")
    wrong.set_data_from_numpy(images[:1, :, :, 0])
    with pytest.raises(InferenceServerException, match="unexpected shape"):
        g.infer(MODEL, [wrong])
    after_g = _stats_totals(g.get_inference_statistics(MODEL))
    after_h = _stats_totals(h.get_inference_statistics(MODEL))
    assert after_g == after_h
    delta = {k: after_g[k] - before_g[k] for k in after_g}
    print(f"\nstatistics moved by {delta}")
    assert (delta["inference_count"], delta["execution_count"], delta["success"], delta["fail"]) == (10, 4, 4, 1)
    assert delta["batch_2"] == 3
    assert 0 < delta["phases_ns"] <= delta["success_ns"], "the phases are parts of each successful call"
    per_version = h.get_inference_statistics(MODEL, str(default))["model_stats"]
    assert [s["version"] for s in per_version] == [str(default)]
    assert per_version[0]["last_inference"] > 1_600_000_000_000  # ms since the epoch


def test_unknown_routes_answer_json_errors(embedded: RunningGateway) -> None:
    """Every unknown route (and a wrong method) answers JSON, never aiohttp's text/plain: under /v2 in the same
    error object as the protocol's other errors, elsewhere in /v1's."""
    import urllib.error
    import urllib.request

    base = f"http://127.0.0.1:{embedded.app.http_port}"

    def refused(path: str, method: str = "GET") -> tuple[int, str, dict[str, object]]:
        req = urllib.request.Request(base + path, method=method, data=b"{}" if method == "POST" else None)
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=10)
        return info.value.code, info.value.headers["Content-Type"], json.loads(info.value.read())

    _, kind, known = refused("/v2/models/nope")  # the protocol's own error: the shape to match
    assert kind.startswith("application/json")
    for path, method, status in (("/v2/nope", "GET", 404), ("/v2/models/quickdraw/nope", "GET", 404),
                                 ("/v2/models/quickdraw/versions/1/infer/x", "POST", 404),
                                 ("/v2/health/live", "POST", 405)):  # fmt: skip
        code, kind, body = refused(path, method)
        assert code == status and kind.startswith("application/json"), (path, code, kind)
        assert set(body) == set(known) and isinstance(body["error"], str) and path in body["error"], body
    code, kind, body = refused("/no/such/route")
    assert code == 404 and kind.startswith("application/json") and body["error"]["status"] == "NOT_FOUND"  # type: ignore[index]


def _bad_infer(field: str) -> bytes:
    """A small ModelInferRequest over one of the limits ``check_infer`` counts on the wire."""
    from service.protos import oip

    req = oip.ModelInferRequest(model_name=MODEL)
    if field == "inputs":
        for i in range(17):
            req.inputs.add(name=f"x{i}", datatype="UINT8", shape=[1])
    elif field == "outputs":
        req.inputs.add(name="image", datatype="UINT8", shape=[1, 28, 28, 1])
        for i in range(17):
            req.outputs.add(name=f"y{i}")
    elif field == "raw_input_contents":
        req.inputs.add(name="image", datatype="UINT8", shape=[1, 28, 28, 1])
        req.raw_input_contents.extend([b""] * 17)
    elif field == "shape":
        req.inputs.add(name="image", datatype="UINT8", shape=[-1] * 17)  # 10 bytes a dim: over check_infer's 160
    else:  # 513 empty elements: over SCAN_FACTOR x max_drawings_per_request (256)
        req.inputs.add(name="strokes", datatype="BYTES", shape=[513]).contents.bytes_contents.extend([b""] * 513)
    return req.SerializeToString()


@pytest.mark.parametrize("field", ["inputs", "outputs", "raw_input_contents", "shape", "bytes_contents"])
def test_a_small_request_counted_after_parsing_gets_the_wire_counts_error(field: str) -> None:
    """A ModelInferRequest of at most ``wire.PARSE_FIRST_BYTES`` is parsed before it is counted (its parse is bounded
    by its size); ``to_call`` then refuses what ``check_infer`` refuses on the wire of a larger one, in the same
    words."""
    from service.core.errors import InvalidArgument
    from service.frontends.oip.grpc_api import check_infer, to_call
    from service.preprocess import wire
    from service.protos import oip

    raw = _bad_infer(field)
    assert len(raw) <= wire.PARSE_FIRST_BYTES
    with pytest.raises(InvalidArgument) as on_wire:
        check_infer(raw, 256)
    with pytest.raises(InvalidArgument) as parsed:
        to_call(oip.ModelInferRequest.FromString(raw), 256)
    assert parsed.value.violations == on_wire.value.violations
    assert "over the limit" in parsed.value.violations[0].description


def _surface(ood: bool) -> Any:
    """An OIP ``Surface`` over a data plane of a 29-class model (no backend called: conversion only)."""
    from service.backends import ModelDescription, OutOfClassInfo
    from service.core.metrics import Metrics
    from service.dataplane.batching import Batcher, BatcherConfig
    from service.dataplane.pipeline import DataPlane
    from service.frontends.oip.core import Surface
    from service.preprocess.validation import Limits

    async def never(*_: Any, **__: Any) -> Any:
        raise AssertionError("conversion only")

    labels = tuple(f"c{i}" for i in range(29))
    model = ModelDescription(MODEL, (1, 2), labels, out_of_class={2: OutOfClassInfo(1.5)} if ood else {})
    metrics = Metrics()
    plane = DataPlane(model, Batcher(never, BatcherConfig(), metrics, "none"), Limits(num_classes=29), metrics, "none")
    surface = Surface(metrics)
    surface.attach(plane)
    return surface


def _infer(n: int = 1, outputs: Sequence[str] = ("probabilities",), version: str = "", size: int | None = None,
           shape: Sequence[int] | None = None, **extra: Any) -> Any:  # fmt: skip
    from service.protos import oip

    req = oip.ModelInferRequest(model_name=extra.pop("model", MODEL), model_version=version, id=extra.pop("id", ""))
    t = req.inputs.add(name=extra.pop("input", "image"), datatype=extra.pop("datatype", "UINT8"),
                       shape=list(shape or (n, 28, 28, 1)))  # fmt: skip
    for name in outputs:
        req.outputs.add(name=name)
    if extra.pop("classification", None):
        req.outputs[0].parameters["classification"].int64_param = 3
    if extra.pop("parameter", None):
        t.parameters["x"].bool_param = True
    req.raw_input_contents.append(bytes(i * 7 % 256 for i in range(784 * n)) if size is None else bytes(size))
    return req


@pytest.mark.parametrize("ood", [True, False])
def test_the_fast_image_converter_converts_as_the_general_one(ood: bool) -> None:
    """``fast_convert`` (the commonest ModelInferRequest, without an ``InferCall``) gives what ``to_call`` and
    ``Surface.convert`` give, for what it takes, and leaves everything else to them (None), errors included."""
    from service.core.errors import ServiceError
    from service.frontends.oip.grpc_api import fast_convert, to_call

    surface = _surface(ood)
    both = ("probabilities", "known_score") if ood else ("probabilities",)
    taken = [_infer(), _infer(3, ()), _infer(2, both), _infer(1, both[::-1]), _infer(version="2", id="r-1"),
             _infer(256), _infer(1, ("probabilities",), "1"), _infer(version="3")]  # fmt: skip
    for req in taken:
        fast = fast_convert(req, surface)
        general = surface.convert(to_call(req, 256))
        assert fast is not None, req
        assert np.array_equal(fast.drawings, general.drawings) and fast.drawings.shape == general.drawings.shape
        assert (fast.version, fast.top_k, fast.answer_bytes, fast.extra) == (
            general.version, general.top_k, general.answer_bytes, general.extra)
        assert fast.unknown_version(7).message == general.unknown_version(7).message
    left = [_infer(outputs=("probabilities", "probabilities")), _infer(outputs=("nope",)), _infer(size=783),
            _infer(shape=(1, 28, 28)), _infer(shape=(1, 784, 1, 1)), _infer(257), _infer(0, size=0),
            _infer(classification=True), _infer(parameter=True), _infer(input="strokes"), _infer(datatype="FP32")]
    if not ood:
        left.append(_infer(outputs=("known_score",)))
    for req in left:
        assert fast_convert(req, surface) is None, req
    for req in (_infer(version="x"), _infer(version="+1"), _infer(model="other")):
        with pytest.raises(ServiceError) as fast_error:
            fast_convert(req, surface)
        with pytest.raises(ServiceError) as general_error:
            surface.convert(to_call(req, 256))
        assert (fast_error.value.code, fast_error.value.message) == (general_error.value.code,
                                                                     general_error.value.message)


def test_a_small_classify_request_is_counted_as_a_large_one_is() -> None:
    """The other door parsed first when small: a ClassifyRequest of at most ``wire.PARSE_FIRST_BYTES`` that is more
    than bitmaps still has its strokes counted on the wire before validation, with the error a large one gets."""
    from service.core.errors import InvalidArgument
    from service.frontends.grpc.classifier import convert_classify
    from service.preprocess import wire

    plane = _surface(False).plane
    strokes = pb.Strokes(strokes=[pb.Stroke() for _ in range(600)])  # over 2 x max_strokes (256)
    small = pb.ClassifyRequest(drawings=[pb.Drawing(strokes=strokes)]).SerializeToString()
    padding = pb.Drawing(image=pb.EncodedImage(data=bytes(20_000)))
    large = pb.ClassifyRequest(drawings=[pb.Drawing(strokes=strokes), padding])
    assert len(small) <= wire.PARSE_FIRST_BYTES < len(large.SerializeToString())
    errors = []
    for raw in (small, large.SerializeToString()):
        with pytest.raises(InvalidArgument) as refused:
            convert_classify(plane, raw, wire.top_level(raw, 256))
        errors.append(refused.value.violations)
    assert errors[0] == errors[1] and "max_strokes" in errors[0][0].description
    bitmaps = pb.ClassifyRequest(drawings=[pb.Drawing(bitmap=pb.Bitmap(pixels=bytes(784)))] * 3).SerializeToString()
    assert convert_classify(plane, bitmaps, wire.top_level(bitmaps, 256)).drawings.shape == (3, 28, 28, 1)


@pytest.mark.parametrize("field", ["inputs", "output_filter", "dims"])
def test_a_small_predict_request_counted_after_parsing_gets_the_wire_counts_error(field: str) -> None:
    """TF Serving's door parses a PredictRequest of at most ``wire.PARSE_FIRST_BYTES`` first, as OIP and Classify do;
    ``count_parsed`` refuses what ``wire.check_predict`` refuses on the wire, in the same words."""
    from service.core.errors import InvalidArgument
    from service.frontends.tfserving.grpc_api import count_parsed
    from service.preprocess import wire
    from service.protos import tfs

    req = tfs.PredictRequest()
    req.model_spec.name = MODEL
    if field == "inputs":
        for i in range(17):
            req.inputs[f"x{i}"].dtype = tfs.DT_UINT8
    elif field == "output_filter":
        req.output_filter.extend(f"y{i}" for i in range(17))
    else:
        for _ in range(17):
            req.inputs["image"].tensor_shape.dim.add(size=1)
    raw = req.SerializeToString()
    assert len(raw) <= wire.PARSE_FIRST_BYTES
    with pytest.raises(InvalidArgument) as on_wire:
        wire.check_predict(raw)
    with pytest.raises(InvalidArgument) as parsed:
        count_parsed(tfs.PredictRequest.FromString(raw))
    assert parsed.value.violations == on_wire.value.violations
