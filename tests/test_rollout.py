"""Roll-outs (service.dataplane.rollout): the canary split, the routing key at every door, the rollout file, the
shadow comparison against the two SavedModels offline, its bounded queue, and the promotion gate's decisions.

The split runs over two TF Serving stand-in replicas (tests/tfserving_standin.py) serving versions 1 and 2 under the
labels ``stable`` and ``canary``; the shadow over the embedded backend with two versions loaded (the shipped model,
and a copy whose weights scripts/perturb_model.py perturbed).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest
from harness import ROOT, SHIPPED_MODEL, RunningGateway
from test_tfserving import sample_bitmaps
from tfserving_standin import TFServingStandIn

from quickdraw.commands import rollout as rollout_cmd
from quickdraw_client.v1 import classifier_pb2 as pb
from quickdraw_client.v1 import classifier_pb2_grpc as pb_grpc
from service.backends import Answered, ModelDescription, find_versions
from service.core.errors import Unavailable
from service.core.metrics import Metrics
from service.dataplane.rollout import Comparison, RolloutPlan, Shadow, Split, routing_point

sys.path.insert(0, str(ROOT / "scripts"))

from rehearsal_rollouts import binomial_interval

pytestmark = pytest.mark.skipif(
    not find_versions(SHIPPED_MODEL), reason=f"no SavedModel under {SHIPPED_MODEL} (the shipped model is missing)"
)


#: Versionless calls split 90/10 here (``make rehearsal``'s canary row sends over 2,000 through real processes).
CALLS = 400


def classify(stub: Any, image: np.ndarray, key: str | None = None) -> int:
    req = pb.ClassifyRequest(drawings=[pb.Drawing(bitmap=pb.Bitmap(pixels=image.tobytes()))])
    metadata = [("x-routing-key", key)] if key else None
    return int(stub.Classify(req, timeout=10, metadata=metadata).model_version)


# --- the canary split over two TF Serving replicas --------------------------------------------------------------


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Two stand-in replicas, each serving versions 1 and 2 (the shipped model), labelled stable=1 and canary=2."""
    base = tmp_path_factory.mktemp("volume") / "quickdraw"
    base.mkdir()
    shipped = SHIPPED_MODEL / str(find_versions(SHIPPED_MODEL)[-1])
    for v in (1, 2):
        (base / str(v)).symlink_to(shipped.resolve(), target_is_directory=True)
    labels = {"stable": 1, "canary": 2}
    with TFServingStandIn(base, version_labels=labels) as a, TFServingStandIn(base, version_labels=labels) as b:
        yield base, (a, b)


def test_split_by_labels_is_binomial_and_routing_keys_stick_at_every_door(labelled: Any, tmp_path: Path) -> None:
    """stable=90, canary=10 over 400 versionless calls: the canary's share is within the binomial 99% interval,
    each answer naming its version. Then, through the rollout file, 50/50: a routing key keeps its caller on one
    side, the same side at every door; ``quickdraw rollout abort`` sends everyone back to stable."""
    base, replicas = labelled
    plan = tmp_path / "rollout.json"
    plan.write_text(json.dumps({"split": {"stable": 90, "canary": 10}}))
    images = sample_bitmaps(16)
    target = "ipv4:" + ",".join(r.target for r in replicas)
    with RunningGateway(backend="tfserving", tfserving_target=target, model_dir=base, warmup=False,
                        tfserving_status_poll_s=0.2, tfserving_version_label="stable", rollout_file=plan,
                        rollout_watch_s=0.1) as gw, grpc.insecure_channel(gw.target) as ch:  # fmt: skip
        stub = pb_grpc.ClassifierStub(ch)
        deadline = time.monotonic() + 10
        while gw.app._gateway.model.version_labels != {"canary": 2, "stable": 1}:  # the labels' poll
            assert time.monotonic() < deadline, gw.app._gateway.model
            time.sleep(0.05)
        with ThreadPoolExecutor(4) as pool:
            versions = Counter(pool.map(lambda i: classify(stub, images[i % 16]), range(CALLS)))
        lo, hi = binomial_interval(CALLS, 0.10)
        print(f"\n{CALLS} calls at stable=90, canary=10: {dict(versions)}; 99% interval for canary {lo}..{hi}")
        assert set(versions) == {1, 2} and lo <= versions[2] <= hi
        m = gw.scrape()
        assert m['quickdraw_split_calls_total{target="canary",version="2"}'] == versions[2]

        plan.write_text(json.dumps({"split": {"1": 50, "2": 50}}))
        deadline = time.monotonic() + 10
        while gw.app._gateway.rollout.plan.split != {"1": 50, "2": 50}:  # the file's poll
            assert time.monotonic() < deadline
            time.sleep(0.05)
        sides = {f"user-{i}": {classify(stub, images[0], f"user-{i}") for _ in range(5)} for i in range(40)}
        assert all(len(s) == 1 for s in sides.values()), sides
        assert {next(iter(s)) for s in sides.values()} == {1, 2}  # both sides used by some keys
        # the same key, the same side, at every door (the key is read from any door's metadata or headers)
        for key in ("user-1", "user-2", "user-3"):
            want = next(iter(sides[key]))
            assert door_versions(gw, images[0], key) == {want}, key

        assert rollout_cmd.run(SimpleNamespace(action="abort", rollout_file=plan)) == 0
        deadline = time.monotonic() + 10
        while gw.app._gateway.rollout.plan.split:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert {classify(stub, images[0], f"user-{i}") for i in range(20)} == {1}


def door_versions(gw: RunningGateway, image: np.ndarray, key: str) -> set[int]:
    """The version that answers one versionless call with routing key ``key`` at each of the five doors."""
    from service.protos import oip, tfs

    out = set()
    with grpc.insecure_channel(gw.target) as ch:
        out.add(classify(pb_grpc.ClassifierStub(ch), image, key))
        req = tfs.PredictRequest()
        req.model_spec.name = "quickdraw"
        req.inputs["image"].CopyFrom(_uint8_tensor(image[None]))
        resp = tfs.PredictionServiceStub(ch).Predict(req, timeout=10, metadata=[("x-routing-key", key)])
        out.add(int(resp.model_spec.version.value))
        infer = oip.ModelInferRequest(model_name="quickdraw")
        infer.inputs.add(name="image", datatype="UINT8", shape=[1, 28, 28, 1])
        infer.raw_input_contents.append(image.tobytes())
        out.add(int(oip.GRPCInferenceServiceStub(ch).ModelInfer(infer, timeout=10,
                                                               metadata=[("x-routing-key", key)]).model_version))
    http = f"http://127.0.0.1:{gw.app.http_port}"
    body = json.dumps({"drawings": [{"bitmap": {"pixels": __import__("base64").b64encode(image.tobytes()).decode()}}]})
    req = urllib.request.Request(f"{http}/v1/classify", data=body.encode(),
                                 headers={"Content-Type": "application/json", "X-Routing-Key": key})  # fmt: skip
    with urllib.request.urlopen(req, timeout=10) as resp:
        out.add(int(json.load(resp)["modelVersion"]))
    body = json.dumps({"inputs": [{"name": "image", "shape": [1, 28, 28, 1], "datatype": "UINT8",
                                   "data": image.reshape(-1).tolist()}]})  # fmt: skip
    req = urllib.request.Request(f"{http}/v2/models/quickdraw/infer", data=body.encode(),
                                 headers={"Content-Type": "application/json", "X-Routing-Key": key})  # fmt: skip
    with urllib.request.urlopen(req, timeout=10) as resp:
        out.add(int(json.load(resp)["model_version"]))
    return out


def _uint8_tensor(a: np.ndarray) -> Any:
    from service.protos import tfs

    t = tfs.TensorProto(dtype=tfs.DT_UINT8, tensor_content=a.tobytes())
    for d in a.shape:
        t.tensor_shape.dim.add(size=d)
    return t


# --- the shadow, against the two SavedModels offline ------------------------------------------------------------

#: Drawings shadowed and compared offline (in calls of 100).
DRAWINGS = 300


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Version 1: the shipped model; version 2: its weights perturbed (scripts/perturb_model.py, scale 0.3)."""
    from perturb_model import perturbed_copy

    base = tmp_path_factory.mktemp("shadow") / "quickdraw"
    base.mkdir()
    shipped = SHIPPED_MODEL / str(find_versions(SHIPPED_MODEL)[-1])
    (base / "1").symlink_to(shipped.resolve(), target_is_directory=True)
    perturbed_copy(shipped, base / "2", 0.3)
    return base


def test_shadow_agreement_equals_the_offline_agreement_of_the_two_models(two_models: Path) -> None:
    """Every call answered by version 1 and shadowed to version 2: the exported top-1 agreement equals the one
    computed offline from the two SavedModels on the same drawings (within 0.5%), and so does the top-3 overlap;
    the caller's answers are version 1's."""
    import tensorflow as tf

    images = sample_bitmaps(DRAWINGS)
    with RunningGateway(model_dir=two_models, model_versions="all", canary_split="1=100", shadow_version="2",
                        shadow_fraction=1.0) as gw, grpc.insecure_channel(gw.target) as ch:  # fmt: skip
        stub = pb_grpc.ClassifierStub(ch)
        done = 0.0
        for i in range(0, DRAWINGS, 100):  # one call at a time, each compared before the next (nothing busy)
            req = pb.ClassifyRequest(drawings=[pb.Drawing(bitmap=pb.Bitmap(pixels=x.tobytes()))
                                               for x in images[i : i + 100]], top_k=1)  # fmt: skip
            assert stub.Classify(req, timeout=30).model_version == 1
            deadline = time.monotonic() + 30
            while done < i + 100:
                m = gw.scrape()
                done = m.get('quickdraw_shadow_compared_drawings_total{candidate="2",stable="1"}', 0.0)
                assert time.monotonic() < deadline, m
                time.sleep(0.05)
        m = gw.scrape()
    pair = '{candidate="2",stable="1"}'
    exported = m[f"quickdraw_shadow_top1_agreements_total{pair}"] / m[f"quickdraw_shadow_compared_drawings_total{pair}"]
    top3 = m[f"quickdraw_shadow_top3_overlap_ratio_sum{pair}"] / m[f"quickdraw_shadow_top3_overlap_ratio_count{pair}"]
    probs = []
    for v in (1, 2):
        fn = tf.saved_model.load(str(two_models / str(v))).signatures["serving_default"]
        probs.append(fn(image=tf.constant(images))["probabilities"].numpy())
    offline = Comparison.of(probs[0], probs[1])
    print(f"\nshadow of {DRAWINGS} drawings: exported top-1 agreement {exported:.4f}, offline "
          f"{offline.top1.mean():.4f}; top-3 overlap {top3:.4f} / {offline.overlap.mean():.4f}")  # fmt: skip
    assert 0.5 < exported < 1.0  # the perturbed model really differs
    assert abs(exported - offline.top1.mean()) <= 0.005
    assert abs(top3 - offline.overlap.mean()) <= 0.005
    assert not any(k.startswith("quickdraw_shadow_dropped_drawings_total") and v for k, v in m.items())


# --- the shadow's own queue: bounded, dropped and counted, never retried ----------------------------------------


class _Primary:
    max_batch_size = 8
    busy = False
    refusing = False


def test_shadow_queue_is_bounded_and_failures_are_counted_not_retried() -> None:
    """A stalled candidate: offers beyond the shadow's queue are dropped as queue_full, never waited for; a failing
    candidate is called once per batch (no retry) and its drawings counted as error; a busy primary drops as busy."""

    async def scenario() -> dict[str, float]:
        metrics = Metrics()
        primary = _Primary()
        calls: list[int] = []
        gate = asyncio.Event()

        async def predict(images: np.ndarray, version: int, deadline_s: float | None) -> Answered:
            calls.append(len(images))
            await gate.wait()
            raise Unavailable("candidate down")

        shadow = Shadow(predict, primary, metrics, max_queued_drawings=16, timeout_s=5)  # type: ignore[arg-type]
        shadow.plan = RolloutPlan(shadow={"target": "2", "fraction": 1.0}).shadow  # type: ignore[arg-type]
        shadow.start()
        model = ModelDescription("quickdraw", (1, 2), tuple("abc"))
        answer = Answered(np.full((4, 3), 1 / 3, np.float32), 1)
        images = np.zeros((4, 28, 28, 1), np.uint8)
        primary.busy = True
        assert not shadow.wants(4)  # callers' work queued: not even offered
        primary.busy = False
        t0 = time.perf_counter()
        for _ in range(10):  # 40 drawings offered; the worker takes one batch (8), then 16 fit in the queue
            if shadow.wants(4):
                shadow.offer(images, answer, model, 0.001)
            await asyncio.sleep(0)
        offered_s = time.perf_counter() - t0
        gate.set()
        for _ in range(50):
            await asyncio.sleep(0.01)
        await shadow.close()
        assert offered_s < 0.5  # the callers never waited for the shadow
        assert all(n <= 8 for n in calls)  # batches of at most max_batch_size
        return {k: v for k, v in _families(metrics).items() if "dropped" in k} | {"called": sum(calls)}

    got = asyncio.run(scenario())
    error = got.get('quickdraw_shadow_dropped_drawings_total{reason="error"}', 0)
    full = got.get('quickdraw_shadow_dropped_drawings_total{reason="queue_full"}', 0)
    busy = got.get('quickdraw_shadow_dropped_drawings_total{reason="busy"}', 0)
    assert busy == 4 and full > 0 and error + full == 40  # every drawing offered is accounted for
    assert error == got["called"]  # each batch's drawings sent once (never retried) and counted once


def _families(metrics: Metrics) -> dict[str, float]:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


# --- plans, the split's arithmetic, the gate ---------------------------------------------------------------------


def test_plans_refuse_what_they_cannot_do_in_words_that_say_why() -> None:
    assert RolloutPlan.of("stable=95, canary=5", "canary", 0.5).split == {"stable": 95.0, "canary": 5.0}
    assert RolloutPlan.of("01=1,1=2", None, 0).split == {"1": 3.0}  # one version, however spelled
    for bad, words in [("stable", "not target=weight"), ("stable=x", "not target=weight"),
                       ("-x=3", "neither a version number"), ("a=-1", ">= 0"), ("a=0,b=0", "above 0")]:  # fmt: skip
        with pytest.raises(ValueError, match=words):
            RolloutPlan.of(bad, None, 0)
    with pytest.raises(ValueError, match="fraction"):
        RolloutPlan.of(None, "2", 1.5)
    assert RolloutPlan.of("1=1", "canary", 0.1).labels == {"canary"}


def test_split_weights_and_keys() -> None:
    split = Split({"a": 90, "b": 10})
    assert split.pick("same-key") == split.pick("same-key")
    assert 0 <= routing_point("k") < 1 and routing_point("k") == routing_point("k")
    picks = Counter(split.pick(f"k{i}") for i in range(20000))
    assert abs(picks["b"] / 20000 - 0.10) < 0.01  # keys spread as the weights say


def test_gate_decides_wait_refuse_promote() -> None:
    args = SimpleNamespace(min_compared=500, min_agreement=0.95, max_latency_ratio=1.5, latency_slack_ms=5.0,
                           latency_quantile=0.99)  # fmt: skip

    def gate(n: float, agreement: float, p99: tuple[float, float] = (0.002, 0.003)) -> rollout_cmd.Gate:
        g = rollout_cmd.Gate("1", "2", n, agreement, 1.0, 0.0, None, p99[0], p99[1], {})
        rollout_cmd.decide(g, args)  # type: ignore[arg-type]
        return g

    assert gate(100, 1.0).decision == "wait"
    assert gate(1000, 0.97).decision == "promote"
    assert gate(1000, 0.90).decision == "refuse"
    assert gate(1000, 0.99, (0.010, 0.030)).decision == "refuse"  # 3x slower at p99
    assert gate(1000, 0.99, (0.001, 0.004)).decision == "promote"  # within the slack
