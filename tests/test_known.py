"""The out-of-class decision (issue 18) end to end: "I don't know this one" on every API of the gateway.

The models are built from the shipped one (tests/known_models.py, fixtures ``known_model`` and ``old_model`` in
conftest.py): the shipped model plus ``known_score`` (its max softmax probability) and a model card with a
threshold, and the same without either, as exported before issue 18. Against both backends (embedded, and the
tfserving backend in front of the TF Serving stand-in), over real gRPC and HTTP on free ports:

- the known_score each prediction carries is the offline SavedModel's within 1e-5, and known = score >= threshold
  (both the probabilities path and the tfserving backend's top-k-only path; unary, stream, client, CLI);
- GetModelInfo gives the threshold and its operating point; the JSON API passes both on;
- TF Serving's API on the gateway offers ``known_score`` (Predict, GetModelMetadata);
- an old model still serves, its predictions carrying no decision (HasField false, absent in JSON);
- old and new versions side by side (a roll-out): each answer carries a decision only from a version that makes one.

Plus fast checks without TensorFlow: the model card's entry, and the batcher slicing the score per caller.
Runtime: 24 s measured on 2 cores (two models built, six gateways, four stand-ins); about 80 s when the cores
are shared with other test runs.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from time import monotonic as time_now
from time import sleep
from typing import Any

import grpc
import numpy as np
import pytest
from harness import SHIPPED_MODEL, RunningGateway
from known_models import MSP_METHOD, THRESHOLD, offline_outputs

from doodle import contract
from doodle.formats import open_bitmaps
from quickdraw_client.v1 import classifier_pb2 as pb
from quickdraw_client.v1 import classifier_pb2_grpc as pb_grpc
from service.backends import Answered, OutOfClassInfo, find_versions, read_out_of_class
from service.client import QuickDrawClient, Result
from service.core.metrics import Metrics
from service.dataplane.batching import Batcher, BatcherConfig
from service.protos import tfs
from service.protos.tensors import from_numpy, to_numpy

KNOWN = contract.KNOWN_SCORE
#: The threshold as the answers carry it (a proto float).
THRESHOLD_32 = float(np.float32(THRESHOLD))
needs_model = pytest.mark.skipif(not find_versions(SHIPPED_MODEL), reason=f"no SavedModel under {SHIPPED_MODEL}")


# --- without TensorFlow: the model card and the batcher ------------------------------------------------------------


def test_the_model_cards_entry(tmp_path: Path) -> None:
    assert read_out_of_class(tmp_path) is None  # no card: no decision
    card = tmp_path / "model_card.json"
    card.write_text(json.dumps({"name": "quickdraw"}))
    assert read_out_of_class(tmp_path) is None  # a card without the entry (models before issue 18)
    entry = {"score": KNOWN, "method": "outlier exposure", "threshold": 0.42,
             "operating_point": {"known_kept": 0.95, "measured_on": "validation"}, "auroc": 0.9}  # fmt: skip
    card.write_text(json.dumps({contract.MODEL_CARD_OOD: entry}))
    assert read_out_of_class(tmp_path) == OutOfClassInfo(0.42, KNOWN, "outlier exposure", 0.95, "validation")
    card.write_text(json.dumps({contract.MODEL_CARD_OOD: {"threshold": 1}}))
    assert read_out_of_class(tmp_path) == OutOfClassInfo(1.0)  # no operating point: known_kept unknown
    for bad in ({}, {"threshold": "0.5"}, {"threshold": True}, {"threshold": float("nan")}, [0.5],
                {"threshold": 0.5, "score": "energy"}):  # fmt: skip
        card.write_text(json.dumps({contract.MODEL_CARD_OOD: bad}))
        with pytest.raises(ValueError, match=contract.MODEL_CARD_OOD):
            read_out_of_class(tmp_path)
    card.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        read_out_of_class(tmp_path)


def test_the_batcher_slices_the_known_score_per_caller() -> None:
    """Concurrent calls merged into one batch each get their own rows of the score; a call split over several
    batches gets them concatenated in order; a backend without the score gives None (the old behaviour)."""

    async def scenario(with_known: bool) -> tuple[list[Answered], list[int]]:
        sizes: list[int] = []

        async def run(images: np.ndarray, version: int, deadline_s: float | None) -> Answered | np.ndarray:
            sizes.append(len(images))
            await asyncio.sleep(0.01)
            ids = images[:, 0, 0, 0].astype(np.float32)  # each drawing's id, in its first pixel
            probs = np.repeat(ids[:, None], 3, axis=1)
            return Answered(probs, version, ids / 100) if with_known else probs

        batcher = Batcher(run, BatcherConfig(max_batch_size=4, max_batch_delay_ms=20.0), Metrics())
        batcher.start()
        calls = [np.arange(a, b, dtype=np.uint8) for a, b in ((0, 1), (1, 3), (3, 4), (10, 19))]
        images = [np.zeros((len(c), 28, 28, 1), np.uint8) for c in calls]
        for im, c in zip(images, calls, strict=True):
            im[:, 0, 0, 0] = c
        got = await asyncio.gather(*(batcher.answer(im, 1) for im in images))
        await batcher.close()
        return got, sizes

    got, sizes = asyncio.run(scenario(True))
    assert max(sizes) <= 4 and sum(sizes) == 13 and len(sizes) < 7  # the small calls were merged
    for answered, ids in zip(got, ([0], [1, 2], [3], list(range(10, 19))), strict=True):
        assert answered.known is not None
        np.testing.assert_array_equal(answered.known, np.asarray(ids, np.float32) / 100)
        np.testing.assert_array_equal(answered.scores[:, 0], ids)
    got, _ = asyncio.run(scenario(False))
    assert all(a.known is None for a in got)


# --- the gateways ---------------------------------------------------------------------------------------------------


def _gateway(request: pytest.FixtureRequest, base: Path, **settings: Any) -> Iterator[RunningGateway]:
    """A gateway on ``request.param``'s backend serving ``base`` (tfserving: a stand-in serving it in front)."""
    values: dict[str, Any] = {"model_dir": base, "warmup": False, **settings}
    if request.param == "embedded":
        with RunningGateway(**values) as gw:
            yield gw
        return
    from tfserving_standin import TFServingStandIn

    with TFServingStandIn(base) as standin, RunningGateway(
        backend="tfserving", tfserving_target=standin.target, tfserving_status_poll_s=0.5, **values
    ) as gw:  # fmt: skip
        yield gw


@pytest.fixture(scope="module", params=["embedded", "tfserving"])
def gateway(request: pytest.FixtureRequest, known_model: Path) -> Iterator[RunningGateway]:
    """The gateway serving the model with ``known_score``, on each backend."""
    yield from _gateway(request, known_model)


@pytest.fixture(scope="module", params=["embedded", "tfserving"])
def old_gateway(request: pytest.FixtureRequest, old_model: Path) -> Iterator[RunningGateway]:
    """The gateway serving the model as exported before issue 18, on each backend."""
    yield from _gateway(request, old_model)


@pytest.fixture(scope="module")
def mixed_model(known_model: Path, old_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A roll-out: version 1 exported before issue 18, version 2 with ``known_score``."""
    base = tmp_path_factory.mktemp("mixed") / "quickdraw"
    base.mkdir()
    (base / "1").symlink_to(old_model / "1", target_is_directory=True)
    (base / "2").symlink_to(known_model / "1", target_is_directory=True)
    return base


@pytest.fixture(scope="module", params=["embedded", "tfserving"])
def mixed_gateway(request: pytest.FixtureRequest, mixed_model: Path) -> Iterator[RunningGateway]:
    """Both versions served at once (embedded: model_versions=all; the stand-in serves every version)."""
    yield from _gateway(request, mixed_model, model_versions="all")


@pytest.fixture(scope="module")
def cats(sample: Path, known_model: Path) -> np.ndarray:
    """25 cats of numpy_bitmap, uint8 [25, 28, 28, 1]: the first one, then the first the fixture model calls
    unknown (at ``THRESHOLD``), then the next ones in file order. Which cat that is depends on the shipped model
    the fixture wraps; the tests compare with the offline SavedModel, so they do not depend on it."""
    pool = np.asarray(open_bitmaps(sample / "numpy_bitmap" / "cat.npy")[:400]).reshape(-1, 28, 28, 1)
    scores = offline_outputs(known_model / "1", pool)[KNOWN]
    unknown = int(np.flatnonzero(scores < THRESHOLD)[0])
    rest = [i for i in range(1, len(pool)) if i != unknown]
    return pool[[0, unknown, *rest[:23]]]


@pytest.fixture(scope="module")
def offline_known(known_model: Path, cats: np.ndarray) -> np.ndarray:
    """The known_score of the cats, from the SavedModel loaded directly with TensorFlow."""
    return offline_outputs(known_model / "1", cats)[KNOWN]


def classify_request(images: np.ndarray, top_k: int = 3, version: int = 0) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(
        drawings=[pb.Drawing(bitmap=pb.Bitmap(pixels=im.tobytes())) for im in images], top_k=top_k,
        model=pb.ModelSpec(version=version) if version else None,
    )  # fmt: skip


def http(gw: RunningGateway, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{gw.app.http_port}{path}", data=data,
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def predict_request(images: np.ndarray, outputs: tuple[str, ...] = (), version: int = 0) -> Any:
    req = tfs.PredictRequest(output_filter=list(outputs))
    req.model_spec.name = "quickdraw"
    if version:
        req.model_spec.version.value = version
    req.inputs[contract.INPUT_KEY].CopyFrom(from_numpy(images))
    return req


def tfs_predict(gw: RunningGateway, req: Any) -> Any:
    with grpc.insecure_channel(gw.target) as ch:
        return tfs.PredictionServiceStub(ch).Predict(req, timeout=60)


# --- a model with known_score ---------------------------------------------------------------------------------------


@needs_model
@pytest.mark.parametrize("top_k", [3, 10])  # tfserving: 3 takes its top-k-only path, 10 the probabilities
def test_predictions_carry_the_offline_known_score_and_the_decision(
    gateway: RunningGateway, cats: np.ndarray, offline_known: np.ndarray, top_k: int
) -> None:
    with grpc.insecure_channel(gateway.target) as ch:
        resp = pb_grpc.ClassifierStub(ch).Classify(classify_request(cats, top_k), timeout=60)
    assert len(resp.predictions) == len(cats)
    scores = np.asarray([p.out_of_class.score for p in resp.predictions], np.float32)
    assert all(p.HasField("out_of_class") for p in resp.predictions)
    np.testing.assert_allclose(scores, offline_known, atol=1e-5)
    for p in resp.predictions:
        assert p.out_of_class.threshold == THRESHOLD_32
        assert p.out_of_class.known == (p.out_of_class.score >= p.out_of_class.threshold)
        assert len(p.top) == top_k  # the closest classes are given, known or not
    known = [p.out_of_class.known for p in resp.predictions]
    print(f"\n{gateway.settings.backend} top_k={top_k}: {sum(known)} of {len(known)} cats known at {THRESHOLD}; "
          f"scores {[round(float(x), 3) for x in scores[:5]]}...")  # fmt: skip
    assert any(known) and not all(known)  # the fixture's threshold was chosen so (see known_models.THRESHOLD)
    assert known[1] is False and offline_known[1] < THRESHOLD


@needs_model
def test_the_stream_and_the_client_carry_it(
    gateway: RunningGateway, cats: np.ndarray, offline_known: np.ndarray
) -> None:
    with QuickDrawClient(gateway.target, timeout_s=60) as client:
        answers = list(client.stream([(str(i), classify_request(cats[i : i + 1])) for i in range(4)], timeout_s=60))
        results = client.classify(list(cats[:4].reshape(-1, 28, 28)), top_k=3)
    assert sorted(a.id for a in answers) == ["0", "1", "2", "3"]
    for a in answers:
        ood = a.response.predictions[0].out_of_class
        assert a.response.predictions[0].HasField("out_of_class")
        assert abs(ood.score - offline_known[int(a.id)]) <= 1e-5 and ood.known == (ood.score >= ood.threshold)
    for r, want in zip(results, offline_known[:4], strict=True):
        assert r.known_score is not None and abs(r.known_score - want) <= 1e-5
        assert r.known == (r.known_score >= r.threshold) and r.threshold == THRESHOLD_32
    unknown = results[1]
    assert unknown.known is False
    label, score = unknown.top[0]
    assert str(unknown).startswith(f"not a known class (known_score {unknown.known_score:.2f} < {THRESHOLD:.2f}); "
                                   f"closest: {label} {score:.2f}")  # fmt: skip
    assert str(results[0]) == "  ".join(f"{lb} {s:.2f}" for lb, s in results[0].top)  # known: named as before


@needs_model
def test_model_info_gives_the_threshold_and_its_operating_point(gateway: RunningGateway) -> None:
    with grpc.insecure_channel(gateway.target) as ch:
        info = pb_grpc.ClassifierStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.HasField("out_of_class")
    ood = info.out_of_class
    assert (ood.score, ood.threshold, ood.method, ood.measured_on) == (KNOWN, THRESHOLD_32, MSP_METHOD, "validation")
    assert ood.HasField("known_kept") and ood.known_kept == pytest.approx(0.95)


@needs_model
def test_the_json_api_passes_it_on(gateway: RunningGateway, cats: np.ndarray, offline_known: np.ndarray) -> None:
    body = {"drawings": [{"bitmap": {"pixels": base64.b64encode(im.tobytes()).decode()}} for im in cats[:3]]}
    answer = http(gateway, "/v1/classify", body)
    for p, want in zip(answer["predictions"], offline_known[:3], strict=True):
        ood = p["outOfClass"]
        assert abs(ood["score"] - want) <= 1e-5 and ood["threshold"] == pytest.approx(THRESHOLD)
        assert ood["known"] is bool(want >= THRESHOLD_32)
    assert answer["predictions"][1]["outOfClass"]["known"] is False
    info = http(gateway, "/v1/model")
    assert info["outOfClass"] == {"score": KNOWN, "threshold": pytest.approx(THRESHOLD), "method": MSP_METHOD,
                                  "knownKept": pytest.approx(0.95), "measuredOn": "validation"}  # fmt: skip


@needs_model
def test_tf_servings_api_on_the_gateway_offers_known_score(
    gateway: RunningGateway, cats: np.ndarray, offline_known: np.ndarray
) -> None:
    images = cats[:6]
    every = tfs_predict(gateway, predict_request(images))
    assert set(every.outputs) == {*contract.OUTPUTS, KNOWN}
    np.testing.assert_allclose(to_numpy(every.outputs[KNOWN]), offline_known[:6], atol=1e-5)
    for outputs in ((KNOWN,), (contract.TOP_K_SCORES, KNOWN), (contract.OUTPUT_KEY, KNOWN)):
        resp = tfs_predict(gateway, predict_request(images, outputs))
        assert set(resp.outputs) == set(outputs)
        known = to_numpy(resp.outputs[KNOWN])
        assert known.dtype == np.float32 and known.shape == (6,)
        np.testing.assert_allclose(known, offline_known[:6], atol=1e-5)
    with grpc.insecure_channel(gateway.target) as ch:
        req = tfs.GetModelMetadataRequest(metadata_field=["signature_def"])
        req.model_spec.name = "quickdraw"
        meta = tfs.PredictionServiceStub(ch).GetModelMetadata(req, timeout=10)
    sigs = tfs.SignatureDefMap()
    assert meta.metadata["signature_def"].Unpack(sigs)
    out = sigs.signature_def[contract.SIGNATURE_NAME].outputs[KNOWN]
    assert out.dtype == tfs.DataType.Value("DT_FLOAT") and len(out.tensor_shape.dim) == 1


@needs_model
def test_quickdraw_classify_says_not_a_known_class(gateway: RunningGateway, cats: np.ndarray, tmp_path: Path) -> None:
    path = tmp_path / "cats.npy"
    np.save(path, cats[:3].reshape(3, 784))
    lines = quickdraw_classify(gateway.target, path).splitlines()
    assert len(lines) == 3
    print("\n" + "\n".join(lines))
    assert lines[1].startswith("cats.npy[1]") and "not a known class (known_score 0." in lines[1]
    assert f" < {THRESHOLD:.2f}); closest: " in lines[1]
    assert "not a known class" not in lines[0] and "not a known class" not in lines[2]


def quickdraw_classify(target: str, *files: Path) -> str:
    exe = shutil.which("quickdraw", path=os.path.dirname(sys.executable))
    cmd = [exe] if exe else [sys.executable, "-m", "quickdraw"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                          os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    proc = subprocess.run([*cmd, "classify", "--target", target, *map(str, files)], capture_output=True, text=True,
                          timeout=120, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# --- a model exported before issue 18 -------------------------------------------------------------------------------


@needs_model
def test_an_old_model_still_serves_with_no_decision(old_gateway: RunningGateway, cats: np.ndarray) -> None:
    with grpc.insecure_channel(old_gateway.target) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        for top_k in (3, 10):
            resp = stub.Classify(classify_request(cats[:5], top_k), timeout=60)
            assert len(resp.predictions) == 5 and all(len(p.top) == top_k for p in resp.predictions)
            assert not any(p.HasField("out_of_class") for p in resp.predictions)
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert not info.HasField("out_of_class") and len(info.labels) == 29
    with QuickDrawClient(old_gateway.target, timeout_s=60) as client:
        results = client.classify(list(cats[:2].reshape(-1, 28, 28)))
    assert all(r.known is None and r.known_score is None and r.threshold is None for r in results)
    assert all("not a known class" not in str(r) for r in results)
    body = {"drawings": [{"bitmap": {"pixels": base64.b64encode(cats[1].tobytes()).decode()}}]}
    assert "outOfClass" not in http(old_gateway, "/v1/classify", body)["predictions"][0]
    assert "outOfClass" not in http(old_gateway, "/v1/model")
    every = tfs_predict(old_gateway, predict_request(cats[:2]))
    assert set(every.outputs) == set(contract.OUTPUTS)
    with pytest.raises(grpc.RpcError) as info_err:
        tfs_predict(old_gateway, predict_request(cats[:2], (KNOWN,)))
    assert info_err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert f"output tensor alias not found in signature: {KNOWN}" in info_err.value.details()  # type: ignore[attr-defined]


# --- both side by side (a roll-out) ---------------------------------------------------------------------------------


@needs_model
def test_old_and_new_versions_side_by_side(
    mixed_gateway: RunningGateway, cats: np.ndarray, offline_known: np.ndarray
) -> None:
    """Version 1 (before issue 18) and 2 (with known_score) are both served and accepted; each answer carries a
    decision only from version 2; GetModelInfo describes the default version (2)."""
    with grpc.insecure_channel(mixed_gateway.target) as ch:
        stub = pb_grpc.ClassifierStub(ch)
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        assert list(info.versions) == [1, 2] and info.default_version == 2
        assert info.out_of_class.threshold == THRESHOLD_32
        for top_k in (3, 10):
            old = stub.Classify(classify_request(cats[:4], top_k, version=1), timeout=60)
            new = stub.Classify(classify_request(cats[:4], top_k, version=2), timeout=60)
            default = stub.Classify(classify_request(cats[:4], top_k), timeout=60)
            assert old.model_version == 1 and not any(p.HasField("out_of_class") for p in old.predictions)
            assert new.model_version == 2 and default.model_version == 2
            for resp in (new, default):
                got = [p.out_of_class.score for p in resp.predictions]
                np.testing.assert_allclose(got, offline_known[:4], atol=1e-5)
            # the same weights: the same classes whatever the version
            assert [p.top[0].label for p in old.predictions] == [p.top[0].label for p in new.predictions]
    assert set(tfs_predict(mixed_gateway, predict_request(cats[:2], version=1)).outputs) == set(contract.OUTPUTS)
    with pytest.raises(grpc.RpcError) as err:
        tfs_predict(mixed_gateway, predict_request(cats[:2], (KNOWN,), version=1))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert KNOWN in tfs_predict(mixed_gateway, predict_request(cats[:2], (KNOWN,), version=2)).outputs


def test_result_without_a_decision_reads_as_before() -> None:
    r = Result([("cat", 0.93), ("dog", 0.04)], 1)
    assert (r.known, r.known_score, r.threshold) == (None, None, None) and str(r) == "cat 0.93  dog 0.04"
    p = pb.Prediction(top=[pb.ScoredLabel(label="dog", score=0.67)],
                      out_of_class=pb.OutOfClass(known=False, score=0.12, threshold=0.5))  # fmt: skip
    assert str(Result.of(p, 3)) == "not a known class (known_score 0.12 < 0.50); closest: dog 0.67"


@needs_model
def test_a_replica_that_loads_an_old_version_between_two_polls(
    known_model: Path, old_model: Path, tmp_path: Path, cats: np.ndarray, offline_known: np.ndarray
) -> None:
    """The tfserving backend asks for known_score because the version it expects (1) gives it, but the replica has
    just loaded version 2, exported before issue 18, which the gateway has not seen yet: TF Serving refuses the
    output_filter (INVALID_ARGUMENT). The call still succeeds, and is never answered by the unchecked version; once
    the status poll has checked version 2 (accepted: old and new may be served side by side), its answers carry
    no decision."""
    from tfserving_standin import TFServingStandIn

    base = tmp_path / "quickdraw"
    base.mkdir()
    (base / "1").symlink_to(known_model / "1", target_is_directory=True)
    with TFServingStandIn(base) as standin, RunningGateway(
        backend="tfserving", tfserving_target=standin.target, model_dir=base, warmup=False,
        tfserving_status_poll_s=60.0,
    ) as gw, grpc.insecure_channel(gw.target) as ch:  # fmt: skip
        stub = pb_grpc.ClassifierStub(ch)
        assert stub.Classify(classify_request(cats[:1]), timeout=30).predictions[0].HasField("out_of_class")
        (base / "2").symlink_to(old_model / "1", target_is_directory=True)
        standin.add_version(2, base / "2")
        standin.seen.clear()
        resp = stub.Classify(classify_request(cats[:2]), timeout=30)
        asked = [(s.version, tuple(s.outputs)) for s in standin.seen]
        print(f"\nattempts (version, output_filter): {asked}")
        assert resp.model_version == 1, asked  # asked again by number: never the unchecked version's answer
        np.testing.assert_allclose([p.out_of_class.score for p in resp.predictions], offline_known[:2], atol=1e-5)
        retries = gw.scrape().get('quickdraw_backend_retries_total{reason="unchecked_version"}', 0)
        assert retries >= 1
        deadline = time_now() + 20
        while time_now() < deadline:  # the early poll checks version 2 and accepts it
            info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
            if list(info.versions) == [1, 2]:
                break
            sleep(0.1)
        assert list(info.versions) == [1, 2] and not info.HasField("out_of_class")  # the default (2) makes none
        resp = stub.Classify(classify_request(cats[:2]), timeout=30)
        assert resp.model_version == 2 and not any(p.HasField("out_of_class") for p in resp.predictions)
        pinned = stub.Classify(classify_request(cats[:2], version=1), timeout=30)
        assert all(p.HasField("out_of_class") for p in pinned.predictions)
