"""The trainer: deterministic splits, sharded batches, augmentation, export layout, evaluate and predict."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from doodle.contract import KNOWN_SCORE, MODEL_CARD_DISTRIBUTION, MODEL_CARD_OOD
from trainer.data import BitmapData, Split, SplitSpec

CLASSES = "cat,dog,apple"
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def quickdraw(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "quickdraw", *args], capture_output=True, text=True, cwd=cwd, env=env or ENV
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_split_is_deterministic_and_follows_row_order(sample: Path) -> None:
    data = BitmapData.from_dir(sample, ["cat", "angel"])
    assert data.labels == ["angel", "cat"]
    for rows, split in zip(map(len, data.maps), data.splits, strict=True):
        assert split[Split.TEST].stop == rows
        assert split[Split.VAL].stop == split[Split.TEST].start
        assert split[Split.TRAIN].stop == split[Split.VAL].start
        assert len(split[Split.TEST]) == -(-rows // 10)
    capped = BitmapData.from_dir(sample, ["cat"], SplitSpec(per_class=100))
    assert capped.splits[0][Split.TRAIN] == range(0, 100)
    assert capped.splits[0][Split.TEST] == data.splits[1][Split.TEST]
    with pytest.raises(FileNotFoundError, match="nope"):
        BitmapData.from_dir(sample, ["nope"])


def test_batches_gather_the_right_rows(sample: Path) -> None:
    data = BitmapData.from_dir(sample, ["cat", "dog"])
    cat = np.load(sample / "numpy_bitmap" / "cat.npy", mmap_mode="r")
    x, y = next(data.batches(Split.TEST, 16, shuffle=False))
    assert x.shape == (16, 28, 28, 1) and x.dtype == np.uint8
    start = data.splits[0][Split.TEST].start
    np.testing.assert_array_equal(x.reshape(16, 784), cat[start : start + 16])
    assert (y == 0).all()


def test_shuffled_shards_are_disjoint_and_cover_the_split(sample: Path) -> None:
    data = BitmapData.from_dir(sample, ["cat", "dog"], SplitSpec(per_class=200))
    seen = []
    for shard in (0, 1):
        batches = list(data.batches(Split.TRAIN, 50, shuffle=True, seed=3, epoch=1, shard=shard, num_shards=2))
        assert len(batches) == 4
        seen.append({(int(lbl), img.tobytes()) for x, y in batches for img, lbl in zip(x, y, strict=True)})
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == 400
    again = next(data.batches(Split.TRAIN, 50, shuffle=True, seed=3, epoch=1))
    other_epoch = next(data.batches(Split.TRAIN, 50, shuffle=True, seed=3, epoch=2))
    first = next(data.batches(Split.TRAIN, 50, shuffle=True, seed=3, epoch=1))
    np.testing.assert_array_equal(again[0], first[0])
    assert not np.array_equal(other_epoch[0], first[0])


def test_augmentation_keeps_shape_and_ink(sample: Path) -> None:
    from trainer.pipeline import Augment, make_dataset

    data = BitmapData.from_dir(sample, ["cat"], SplitSpec(per_class=64))
    plain = next(iter(make_dataset(data, Split.TRAIN, 32, shuffle=False)))[0].numpy()
    warped = next(iter(make_dataset(data, Split.TRAIN, 32, shuffle=False, augment=Augment())))[0].numpy()
    assert warped.shape == plain.shape == (32, 28, 28, 1)
    assert not np.array_equal(plain, warped)
    ratio = warped.sum(axis=(1, 2, 3)) / plain.sum(axis=(1, 2, 3))
    assert 0.6 < ratio.mean() < 1.4  # a small warp, not an empty or blown-up image
    corr = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(plain, warped, strict=True)]
    assert np.mean(corr) > 0.2


@pytest.fixture(scope="module")
def tiny_model(sample: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model trained for one short epoch on three classes, exported twice: version 1 with the recipe's four
    test-time views, version 2 with one (``--tta none``: both exports covered, and evaluating it costs a quarter)."""
    base = tmp_path_factory.mktemp("models")
    for views in ([], ["--tta", "none"]):
        quickdraw("train", "--data", str(sample), "--classes", CLASSES, "--per-class", "256", "--epochs", "1",
                  "--out", str(base), "--workdir", str(base.parent / "run"), "--threads", "2", *views)
    return base


def test_export_layout_and_signature(tiny_model: Path) -> None:
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    assert sorted(p.name for p in tiny_model.iterdir()) == ["1", "2"]  # no temporary directory left behind
    v = tiny_model / "2"
    assert (v / "assets" / "labels.txt").read_text().splitlines() == ["apple", "cat", "dog"]
    loaded = tf.saved_model.load(str(v))
    fn = loaded.signatures["serving_default"]
    spec = fn.structured_input_signature[1]["image"]
    assert spec.dtype == tf.uint8 and spec.shape.as_list() == [None, 28, 28, 1]
    for n in (1, 7, 128):
        out = fn(image=tf.zeros([n, 28, 28, 1], tf.uint8))
        assert out["probabilities"].shape == (n, 3) and out["probabilities"].dtype == tf.float32
        np.testing.assert_allclose(out["probabilities"].numpy().sum(axis=1), 1.0, rtol=1e-5)
        for key, value in out.items():
            assert value.shape[0] == n, key
        assert out["top_k_labels"].numpy()[0, 0].decode() in {"apple", "cat", "dog"}
    records = list(tf.data.TFRecordDataset(str(v / "assets.extra" / "tf_serving_warmup_requests")))
    assert len(records) >= 1
    log = prediction_log_pb2.PredictionLog.FromString(records[0].numpy())
    assert log.predict_log.request.model_spec.signature_name == "serving_default"
    assert list(log.predict_log.request.inputs["image"].tensor_shape.dim)[1].size == 28
    card = json.loads((v / "model_card.json").read_text())
    assert card["version"] == 2 and card["classes"] == ["apple", "cat", "dog"]
    assert card["architecture"] == "qdnet" and card["parameters"] > 0
    # the exported widths: three classes, so top-k outputs of three (doodle.contract.TOP_K is 5)
    assert card["outputs"] == {"probabilities": "float32 [batch, C]", "top_k_scores": "float32 [batch, 3]",
                               "top_k_indices": "int32 [batch, 3]", "top_k_labels": "string [batch, 3]",
                               KNOWN_SCORE: "float32 [batch]"}
    # out-of-class: the score chosen on validation, its threshold, and a split by whole classes
    ood = card[MODEL_CARD_OOD]
    assert ood["score"] == KNOWN_SCORE and ood["operating_point"] == {"known_kept": 0.95, "measured_on": "validation"}
    assert isinstance(ood["threshold"], float)
    parts = [set(ood["split"][f"{s}_classes"]) for s in ("train", "val", "test")]
    assert all(parts) and not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert not set().union(*parts) & {"apple", "cat", "dog"}
    assert card["calibration"]["temperature"] > 0
    out = fn(image=tf.zeros([4, 28, 28, 1], tf.uint8))
    assert out[KNOWN_SCORE].dtype == tf.float32 and out[KNOWN_SCORE].shape == (4,)
    assert fn.structured_outputs["top_k_indices"].shape.as_list() == [None, 3]
    for key in ("test_top1", "test_top3", "val_top1"):
        assert 0.0 <= card["metrics"][key] <= 1.0
    assert card["training_seconds"] > 0 and card["tensorflow_version"] == tf.__version__
    # model health (issue 26): the exported signature's answers on the validation split, counted
    dist = card[MODEL_CARD_DISTRIBUTION]
    assert list(dist["top1_class"]) == ["apple", "cat", "dog"]
    assert dist["drawings"] == sum(dist["top1_class"].values()) == card["data"]["counts"]["val"]
    for hist in ("top1_probability", KNOWN_SCORE, "ink_fraction"):
        assert sum(dist[hist]["counts"]) == dist["drawings"]
        assert len(dist[hist]["counts"]) == len(dist[hist]["bounds"]) + 1
    assert 0 <= dist["out_of_class_rate"] <= 1 and 0 < dist["ink_fraction"]["mean"] < 1


def test_evaluate_and_predict(tiny_model: Path, sample: Path, tmp_path: Path) -> None:
    out = quickdraw("evaluate", str(tiny_model), "--data", str(sample), "--out", str(tmp_path), "--no-speed")
    assert "top-1" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["version"] == 2 and set(report["per_class_accuracy"]) == {"apple", "cat", "dog"}
    assert np.array(report["confusion_matrix"]).sum() == report["drawings"] > 0
    assert 0.0 <= report["calibration"]["ece_after"] <= 1.0 and report["calibration"]["temperature"] > 0
    assert 0.0 <= report["out_of_class"]["auroc"] <= 1.0 and 0.0 <= report["out_of_class"]["fpr_at_95_tpr"] <= 1.0
    assert report["out_of_class"]["score"] == KNOWN_SCORE
    for png in ("confusion.png", "curves.png", "reliability.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = quickdraw("predict", "--model", str(tiny_model), str(sample / "simplified" / "cat.ndjson"),
                      "--limit", "4").splitlines()
    assert len(lines) == 4
    assert all(len(line.split(": ", 1)[1].split("  ")) == 3 for line in lines)


def test_checkpoints_tensorboard_and_resume(sample: Path, tmp_path: Path) -> None:
    args = ["train", "--data", str(sample), "--classes", CLASSES, "--per-class", "128", "--arch", "seed",
            "--out", str(tmp_path / "models"), "--workdir", str(tmp_path / "run"), "--threads", "2"]
    quickdraw(*args, "--epochs", "1")
    history = json.loads((tmp_path / "run" / "history.json").read_text())["history"]
    assert len(history) == 1
    assert list((tmp_path / "run" / "checkpoints").glob("ckpt-*.index"))
    assert list((tmp_path / "run" / "logs").rglob("events.out.tfevents.*"))
    quickdraw(*args, "--epochs", "2", "--resume")
    history = json.loads((tmp_path / "run" / "history.json").read_text())["history"]
    assert len(history) == 2  # epoch 1 came from the checkpoint, only epoch 2 was trained
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["1", "2"]
    card = json.loads((tmp_path / "models" / "2" / "model_card.json").read_text())
    assert len(card["history"]) == 2


def test_shipped_model_serves_batches_of_1_7_128() -> None:
    import tensorflow as tf
    from conftest import ROOT

    shipped = ROOT / "models" / "quickdraw" / "1"
    loaded = tf.saved_model.load(str(shipped))
    fn = loaded.signatures["serving_default"]
    for n in (1, 7, 128):
        out = fn(image=tf.zeros([n, 28, 28, 1], tf.uint8))
        assert out["probabilities"].shape == (n, 29)
        assert out[KNOWN_SCORE].shape == (n,) and out[KNOWN_SCORE].dtype == tf.float32
    card = json.loads((shipped / "model_card.json").read_text())
    assert card["metrics"]["test_top1"] >= 0.91
    assert isinstance(card[MODEL_CARD_OOD]["threshold"], float)
    split = card[MODEL_CARD_OOD]["split"]
    parts = [set(split[f"{s}_classes"]) for s in ("train", "val", "test")]
    assert all(parts) and not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert not set().union(*parts) & set(card["classes"])  # whole unknown classes, none of the model's own
    assert card["calibration"]["temperature"] > 0 and card["metrics"]["test_ece"] <= 0.03
    assert len(card["classes"]) == 29 and card["data"]
    size = sum(p.stat().st_size for p in shipped.rglob("*") if p.is_file())
    assert size < 5 * 1024 * 1024


def re_measure(version_dir: Path, sample: Path) -> tuple[dict[str, object], float, float, int]:
    """Run an exported SavedModel again, through its serving signature, on exactly the test rows its card names:
    (card, top-1, ECE of its probabilities, rows)."""
    import tensorflow as tf

    from trainer import ood

    card = json.loads((version_dir / "model_card.json").read_text())
    fn = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    images, labels = [], []
    for index, name in enumerate(card["classes"]):
        start, stop = card["data"]["rows"]["test"][name]
        rows = np.load(sample / "numpy_bitmap" / f"{name}.npy", mmap_mode="r")[start:stop]
        images.append(np.asarray(rows, np.uint8).reshape(-1, 28, 28, 1))
        labels += [index] * len(rows)
    x, y = np.concatenate(images), np.array(labels)
    probs = np.concatenate([fn(image=tf.constant(x[i : i + 512]))["probabilities"].numpy()
                            for i in range(0, len(x), 512)])  # fmt: skip
    return card, float((probs.argmax(axis=1) == y).mean()), ood.expected_calibration_error(probs, y), len(y)


@pytest.mark.parametrize("which", ["shipped", "tiny"])
def test_the_card_agrees_with_a_re_measurement(which: str, sample: Path, request: pytest.FixtureRequest) -> None:
    """The card's test top-1 and ECE are not taken on trust: the shipped model, and the one trained here, are run
    again on the test rows their cards name, and both figures measured here must equal the card's."""
    from conftest import ROOT

    version = ROOT / "models" / "quickdraw" / "1" if which == "shipped" else request.getfixturevalue("tiny_model") / "2"
    card, top1, ece, n = re_measure(version, sample)
    metrics = card["metrics"]
    print(f"\n{which}: re-measured on {n} test rows: top-1 {top1:.4f} (card {metrics['test_top1']:.4f}), "
          f"ECE {ece:.4f} (card {metrics['test_ece']:.4f})")
    assert n == metrics["test_n"]
    assert top1 == pytest.approx(metrics["test_top1"], abs=1e-3)
    assert ece == pytest.approx(metrics["test_ece"], abs=2e-3)
    if which == "shipped":
        assert top1 >= 0.91 and ece <= 0.03
