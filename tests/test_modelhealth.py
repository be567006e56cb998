"""Model health (issue 26): the per-version accounting (``service.core.modelhealth``) and its scrape-time export
(``service.core.metrics.ModelHealthCollector``). Pure: no model, no server."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from harness import SHIPPED_MODEL
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from doodle.contract import MODEL_CARD_DISTRIBUTION
from service.backends import MODEL_CARD, Answered, TopK, find_versions, read_labels, read_reference
from service.core.metrics import Metrics
from service.core.modelhealth import VECTOR_FROM, ModelHealth, Reference
from service.preprocess.validation import Kind

LABELS = ("cat", "dog", "sun")


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def value(found: dict, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def bitmaps(n: int, ink: int) -> np.ndarray:
    out = np.zeros((n, 28 * 28), np.uint8)
    out[:, :ink] = 255
    return out.reshape(n, 28, 28, 1)


def test_one_drawing_counts_class_histograms_out_of_class_and_kind() -> None:
    m = Metrics()
    m.health.serve(LABELS, {1: 2.0, 2: None})
    probs = np.array([[0.1, 0.7, 0.2]], np.float32)
    m.health.record(Answered(probs, 1, np.array([1.5], np.float32)), bitmaps(1, 196), [Kind.BITMAP])
    m.health.record(Answered(probs, 2, None), bitmaps(1, 196), [Kind.STROKES])
    found = samples(m)
    assert value(found, "quickdraw_predictions_total", version="1", **{"class": "dog"}) == 1
    assert value(found, "quickdraw_predictions_total", version="1", **{"class": "cat"}) == 0
    assert value(found, "quickdraw_top1_probability_bucket", version="1", le="0.6") == 0
    assert value(found, "quickdraw_top1_probability_bucket", version="1", le="0.7") == 1
    assert value(found, "quickdraw_top1_probability_sum", version="1") == pytest.approx(0.7)
    assert value(found, "quickdraw_known_score_count", version="1") == 1
    assert value(found, "quickdraw_out_of_class_total", version="1") == 1
    # 196 of 784 pixels: exactly on the 0.25 bound (le)
    assert value(found, "quickdraw_ink_fraction_bucket", version="1", le="0.2") == 0
    assert value(found, "quickdraw_ink_fraction_bucket", version="1", le="0.25") == 1
    assert value(found, "quickdraw_ink_fraction_sum", version="1") == pytest.approx(0.25)
    assert value(found, "quickdraw_model_drawings_total", version="1", kind="bitmap") == 1
    assert value(found, "quickdraw_model_drawings_total", version="2", kind="strokes") == 1
    # version 2 makes no out-of-class decision: no known_score, no out-of-class series
    assert not any(n.startswith(("quickdraw_known_score", "quickdraw_out_of_class")) and ("version", "2") in ls
                   for n, ls in found)  # fmt: skip


def test_labels_stay_bounded() -> None:
    """A class index outside the labels (negative, or past the end) creates no series and counts in no class;
    an unserved version counts nowhere."""
    m = Metrics()
    m.health.serve(LABELS, {1: None})
    for n in (1, 3, VECTOR_FROM + 2):
        idx = np.tile(np.array([[7, 0], [-1, 0], [2, 0]], np.int32), (n, 1))[:n]
        sc = np.full((n, 2), 0.5, np.float32)
        m.health.record(Answered(TopK(sc, idx), 1), bitmaps(n, 10), [Kind.IMAGE] * n)
    m.health.record(Answered(np.ones((1, 3), np.float32), 9), bitmaps(1, 10), [Kind.IMAGE])
    found = samples(m)
    classes = {dict(ls)["class"] for n, ls in found if n == "quickdraw_predictions_total"}
    versions = {dict(ls).get("version") for n, ls in found if n.startswith("quickdraw_")} - {None}
    assert classes == set(LABELS) and versions == {"1"}
    # of 1 + 3 + 26 drawings, only those answered "sun" (index 2) count in a class; all count in the histograms
    assert value(found, "quickdraw_predictions_total", version="1", **{"class": "sun"}) == 0 + 1 + 8
    assert sum(value(found, "quickdraw_predictions_total", version="1", **{"class": c}) for c in LABELS) == 9
    assert value(found, "quickdraw_top1_probability_count", version="1") == 1 + 3 + VECTOR_FROM + 2


def test_topk_and_probabilities_count_alike_one_by_one_and_vectorised() -> None:
    rng = np.random.default_rng(0)
    n = VECTOR_FROM * 3
    probs = rng.random((n, 3)).astype(np.float32)
    probs /= probs.sum(axis=1, keepdims=True)
    known = (rng.random(n) * 4).astype(np.float32)
    images = (rng.random((n, 28, 28, 1)) > 0.7).astype(np.uint8) * 255
    kinds = [Kind.BITMAP, Kind.IMAGE, Kind.STROKES] * VECTOR_FROM
    counted = []
    for how in ("probs-one", "topk-one", "probs-batch", "topk-batch"):
        h = ModelHealth()
        h.serve(LABELS, {1: 2.0})
        scores = probs if how.startswith("probs") else TopK.of(probs, 2)
        if how.endswith("one"):
            for i in range(n):
                s = scores[i : i + 1]
                h.record(Answered(s, 1, known[i : i + 1]), images[i : i + 1], kinds[i : i + 1])
        else:
            h.record(Answered(scores, 1, known), images, kinds)
        v = h.versions[1]
        counted.append((v.classes, v.top1, v.known, v.out_of_class, v.ink, v.ink_pixels, v.kinds,
                        round(v.top1_sum, 4), round(v.known_sum, 3)))  # fmt: skip
    assert all(c == counted[0] for c in counted), counted
    assert counted[0][3] == int((known < 2.0).sum())
    assert counted[0][0] == np.bincount(probs.argmax(axis=1), minlength=3).tolist()


def test_serve_keeps_counts_of_versions_still_served_and_forgets_the_others() -> None:
    h = ModelHealth()
    h.serve(LABELS, {1: 2.0, 2: 2.0})
    h.record(Answered(np.array([[1, 0, 0]], np.float32), 1, None), bitmaps(1, 1), [Kind.BITMAP])
    h.serve(LABELS, {1: 2.0, 3: None})
    assert h.versions[1].classes == [1, 0, 0] and set(h.versions) == {1, 3}
    h.serve(("a", "b"), {1: 2.0})  # other labels: counted afresh
    assert h.versions[1].classes == [0, 0]


def test_reference_from_the_shipped_card_is_exported() -> None:
    version_dir = SHIPPED_MODEL / str(max(find_versions(SHIPPED_MODEL)))
    labels = read_labels(version_dir)
    ref = read_reference(version_dir, labels)
    assert ref is not None and sum(ref.class_share) == pytest.approx(1)
    card = json.loads((version_dir / MODEL_CARD).read_text())
    assert ref.out_of_class_rate == card[MODEL_CARD_DISTRIBUTION]["out_of_class_rate"]
    m = Metrics()
    m.health.serve(labels, {1: 2.2}, {1: ref})  # the version's number in the series does not matter
    found = samples(m)
    shares = [value(found, "quickdraw_model_reference_class_share", version="1", **{"class": c}) for c in labels]
    assert shares == pytest.approx(list(ref.class_share))
    assert value(found, "quickdraw_model_reference_ink_fraction_mean", version="1") == pytest.approx(ref.ink_mean)
    # the version's known_score buckets are the card's
    les = {dict(ls)["le"] for n, ls in found if n == "quickdraw_known_score_bucket"}
    assert len(les) == len(ref.known_bounds) + 1
    with pytest.raises(ValueError, match="exactly the model's classes"):
        Reference.from_card({"top1_class": {"cat": 1}}, LABELS)


def test_the_drift_tests_are_generated_from_the_shipped_card() -> None:
    """deploy/prometheus/tests/model-health.test.yml (scripts/gen_drift_tests.py: the model's answers, so TensorFlow,
    not run here) carries the shipped card's reference in every test: regenerate it when the card changes. promtool
    runs it in tests/test_deploy.py."""
    import yaml

    path = SHIPPED_MODEL.parent.parent / "deploy" / "prometheus" / "tests" / "model-health.test.yml"
    if not path.exists():  # QUICKDRAW_TEST_MODEL_DIR elsewhere
        path = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "tests" / "model-health.test.yml"
    version_dir = SHIPPED_MODEL / str(max(find_versions(SHIPPED_MODEL)))
    card = json.loads((version_dir / MODEL_CARD).read_text())[MODEL_CARD_DISTRIBUTION]
    total = sum(card["top1_class"].values())
    want = {f'quickdraw_model_reference_class_share{{class="{c}"}}': n / total for c, n in card["top1_class"].items()}
    want["quickdraw_model_reference_ink_fraction_mean"] = card["ink_fraction"]["mean"]
    want["quickdraw_model_reference_out_of_class_ratio"] = card["out_of_class_rate"]
    tests = yaml.safe_load(path.read_text())["tests"]
    assert len(tests) == 3
    for case in tests:
        for s in case["input_series"]:
            name, labels = s["series"].split("{", 1)
            if not name.startswith("quickdraw_model_reference_"):
                continue
            assert f'version="{version_dir.name}"' in labels
            cls = [x for x in labels.rstrip("}").split(",") if x.startswith("class=")]
            key = name + (f"{{{cls[0]}}}" if cls else "")
            got = float(s["values"].split("x")[0])
            assert got == pytest.approx(want[key], rel=1e-12), (case["name"], key)


def test_the_one_lock_histogram_exposes_what_the_librarys_does() -> None:
    """``service.core.metrics.Histogram`` (bisection, one lock a child) against prometheus_client's own Histogram
    over the same observations: bucket bounds exactly, between them, past the last, negative, NaN, an exemplar."""
    import math
    import threading

    import prometheus_client
    from prometheus_client import CollectorRegistry

    from service.core.metrics import LATENCY_BUCKETS_S, Histogram

    values = [b for b in LATENCY_BUCKETS_S] + [b * 1.01 for b in LATENCY_BUCKETS_S] + [0.0, -1.0, 9.0, 1e9]
    values += [i / 997 for i in range(5000)]
    texts = []
    for cls in (Histogram, prometheus_client.Histogram):
        registry = CollectorRegistry()
        h = cls("h", "h", ["door"], buckets=LATENCY_BUCKETS_S, registry=registry)
        child = h.labels("x")
        for v in values:
            child.observe(v)
        child.observe(0.004, {"trace_id": "abc"})
        nan = cls("nan", "nan", buckets=LATENCY_BUCKETS_S, registry=registry)
        nan.observe(math.nan)
        nan.observe(0.1)
        texts.append(generate_latest(registry).decode().replace("\n# TYPE", "").splitlines())
    assert [t for t in texts[0] if "_created" not in t] == [t for t in texts[1] if "_created" not in t]
    assert Histogram("e", "e", registry=CollectorRegistry())._one_lock  # the fast path is the one measured

    shared = Histogram("t", "t", buckets=LATENCY_BUCKETS_S, registry=CollectorRegistry())
    threads = [threading.Thread(target=lambda: [shared.observe(0.004) for _ in range(20_000)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(b.get() for b in shared._buckets) == 80_000  # no update lost between threads
