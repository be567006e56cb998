"""Out-of-class detection and calibration: the class split, the measures, the exported ``known_score``.

The measures are checked on tiny hand-made inputs whose answers are worked out by hand; the export on an
untrained three-class network (no training: a few seconds of TensorFlow). Runtime: about 15 s, nearly all
of it importing TensorFlow and saving one small SavedModel.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from doodle.contract import KNOWN_SCORE, MODEL_CARD_OOD, OUTPUT_DTYPES, OUTPUT_KEY
from trainer import ood


def test_split_is_by_whole_classes_disjoint_and_deterministic() -> None:
    names = [f"class {i}" for i in range(400)]
    split = ood.split_classes(names)
    assert set(split) == {"train", "val", "test"}
    parts = [set(v) for v in split.values()]
    assert sum(map(len, parts)) == len(names) and set().union(*parts) == set(names)
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    # the split depends on each name alone: not on order, nor on which other classes are present
    assert ood.split_classes(reversed(names)) == split
    fewer = ood.split_classes(names[:150])
    for part, members in fewer.items():
        assert set(members) <= set(split[part])
    # roughly the fractions asked for (a hash, not a shuffle: 400 names land within a few percent)
    assert 0.5 < len(split["train"]) / 400 < 0.7 and 0.1 < len(split["test"]) / 400 < 0.3
    with pytest.raises(ValueError):
        ood.split_classes(names, (0.5, 0.5, 0.5))


def test_unknown_classes_of_the_sample_exclude_the_known_ones(sample: Path) -> None:
    known = sorted(p.stem for p in (sample / "numpy_bitmap").glob("*.npy"))
    unknown = ood.unknown_classes(sample, known)
    assert unknown and not set(unknown) & set(known)
    assert "ant" in unknown  # raw/ and simplified/ both count
    split = ood.split_classes(unknown)
    assert sorted(split["train"] + split["val"] + split["test"]) == unknown


def test_auroc_on_hand_made_scores() -> None:
    assert ood.auroc([3, 4, 5], [0, 1, 2]) == 1.0
    assert ood.auroc([0, 1], [2, 3]) == 0.0
    assert ood.auroc([1, 1], [1, 1, 1]) == 0.5  # all ties count a half
    # pairs (known, unknown): 0.9>0.5, 0.9>0.1, 0.8>0.5, 0.8>0.1, 0.3<0.5, 0.3>0.1: 5 of 6
    assert ood.auroc([0.9, 0.8, 0.3], [0.5, 0.1]) == pytest.approx(5 / 6)
    # one tie among 4 pairs: (2 vs 2) is a half, (2 vs 1), (3 vs 2), (3 vs 1) are wins: 3.5 / 4
    assert ood.auroc([2, 3], [2, 1]) == pytest.approx(3.5 / 4)


def test_fpr_at_95_tpr_on_hand_made_scores() -> None:
    known = np.arange(1, 21, dtype=float)  # 20 known drawings: keeping 95% keeps 19, so the threshold is 2
    assert ood.threshold_at_tpr(known, 0.95) == 2.0
    assert ood.fpr_at_tpr(known, [1.5, 2.0, 3.0, 0.0], 0.95) == 0.5
    assert ood.fpr_at_tpr(known, [0.0, 1.0], 0.95) == 0.0


def test_ece_on_hand_made_probabilities() -> None:
    # five drawings at confidence 0.8, four right: accuracy equals confidence, ECE 0
    p = np.tile([0.8, 0.2], (5, 1))
    assert ood.expected_calibration_error(p, [0, 0, 0, 0, 1]) == pytest.approx(0.0)
    # two sure and wrong: ECE 1
    assert ood.expected_calibration_error(np.array([[1.0, 0.0], [0.0, 1.0]]), [1, 0]) == pytest.approx(1.0)
    # two bins: (0.9, right) and (0.6, wrong) -> |1 - 0.9| / 2 + |0 - 0.6| / 2 = 0.35
    p = np.array([[0.9, 0.1], [0.4, 0.6]])
    assert ood.expected_calibration_error(p, [0, 0]) == pytest.approx(0.35)
    conf, acc, count = ood.reliability(p, [0, 0])
    assert count.sum() == 2 and count[13] == 1 and count[8] == 1  # 0.9 -> (13/15, 14/15], 0.6 -> (8/15, 9/15]
    assert (conf[13], acc[13], conf[8], acc[8]) == pytest.approx((0.9, 1.0, 0.6, 0.0))


def test_temperature_scaling_recovers_a_known_temperature() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (20000, 10))
    probs = ood.softmax(logits, 2.0)
    labels = (probs.cumsum(axis=1) > rng.random((len(probs), 1))).argmax(axis=1)
    t = ood.fit_temperature(logits, labels)
    assert t == pytest.approx(2.0, rel=0.05)
    assert ood.nll(logits, labels, t) < ood.nll(logits, labels, 1.0)
    # calibrated with the fitted T, the probabilities the labels were drawn from have a small ECE
    assert ood.expected_calibration_error(ood.softmax(logits, t), labels) < 0.02
    assert ood.expected_calibration_error(ood.softmax(logits, 1.0), labels) > 0.05


def test_known_scores_match_their_definitions() -> None:
    z = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    np.testing.assert_allclose(ood.known_score(z, "max_logit"), [2.0, 0.5])
    np.testing.assert_allclose(ood.known_score(z, "msp", 2.0), ood.softmax(z, 2.0).max(axis=1))
    np.testing.assert_allclose(ood.known_score(z, "energy", 2.0), 2.0 * np.log(np.exp(z / 2.0).sum(axis=1)))


def test_uncalibrated_probabilities_are_recovered_from_the_exported_ones() -> None:
    from trainer.evaluate import uncalibrated

    z = np.random.default_rng(1).normal(0, 4, (50, 7))
    np.testing.assert_allclose(uncalibrated(ood.softmax(z, 0.7), 0.7), ood.softmax(z), atol=1e-9)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An untrained three-class qdnet exported with (T = 2, energy) and without the known-score output."""
    import keras

    from trainer import models
    from trainer.export import ModelCard, export_model

    keras.utils.set_random_seed(0)
    net = models.qdnet(3, width=8)
    base = tmp_path_factory.mktemp("models")
    card_args = dict.fromkeys(ModelCard.__dataclass_fields__, None)
    card_args |= {
        "name": "quickdraw",
        "created": "now",
        "classes": ["a", "b", "c"],
        "architecture": "qdnet",
        "parameters": 1,
        "input": {},
        "outputs": {},
        "data": {},
        "recipe": {},
        "metrics": {},
        "history": [],
        "training_seconds": 0.0,
        "workers": 1,
        "tensorflow_version": "",
        "keras_version": "",
        "machine": {},
    }
    with_score = ModelCard(**card_args)
    with_score.calibration = {"temperature": 2.0}
    with_score.ood = {"score": KNOWN_SCORE, "threshold": 1.25, "split": {"test_classes": ["x"]}}
    new = export_model(net, ["a", "b", "c"], base, with_score, version=2, temperature=2.0, score="energy")
    old = export_model(net, ["a", "b", "c"], base, ModelCard(**card_args), version=1)
    return {"new": new, "old": old, "net": net}  # type: ignore[dict-item]


def test_exported_signature_has_known_score_and_calibrated_probabilities(exported: dict[str, Path]) -> None:
    import tensorflow as tf

    fn = tf.saved_model.load(str(exported["new"])).signatures["serving_default"]
    spec = fn.structured_outputs[KNOWN_SCORE]
    assert spec.dtype.name == OUTPUT_DTYPES[KNOWN_SCORE] and spec.shape.as_list() == [None]
    x = np.random.default_rng(2).integers(0, 256, (7, 28, 28, 1)).astype(np.uint8)
    out = fn(image=tf.constant(x))
    logits = exported["net"](x.astype(np.float32), training=False).numpy()  # type: ignore[operator]
    np.testing.assert_allclose(out[OUTPUT_KEY].numpy(), ood.softmax(logits, 2.0), atol=1e-5)
    np.testing.assert_allclose(out[KNOWN_SCORE].numpy(), ood.known_score(logits, "energy", 2.0), rtol=1e-5)
    assert out[KNOWN_SCORE].shape == (7,)
    card = json.loads((exported["new"] / "model_card.json").read_text())
    assert card[MODEL_CARD_OOD]["threshold"] == 1.25 and card[MODEL_CARD_OOD]["score"] == KNOWN_SCORE
    assert card["calibration"]["temperature"] == 2.0


def test_a_model_without_known_score_still_loads_in_evaluate(exported: dict[str, Path]) -> None:
    from trainer.evaluate import LoadedModel

    old, new = LoadedModel(exported["old"]), LoadedModel(exported["new"])
    assert not old.has_known_score and new.has_known_score
    assert old.temperature is None and old.threshold is None and new.threshold == 1.25
    x = np.zeros((3, 28, 28, 1), np.uint8)
    probs, score = old.predict_with_score(x)
    assert probs.shape == (3, 3) and score.shape == (3,)
    np.testing.assert_allclose(score, probs.max(axis=1))  # the max probability stands in for the missing score
    card = json.loads((exported["old"] / "model_card.json").read_text())
    assert MODEL_CARD_OOD not in card and KNOWN_SCORE not in card["outputs"]


def test_energy_hinges_on_hand_made_logits() -> None:
    """The energy loss (``--oe-loss energy``): known drawings pay under m_in, unknown ones over m_out."""
    import tensorflow as tf

    from trainer.config import ENERGY_MARGINS, OE_LOSSES, TrainConfig
    from trainer.train import energy_hinges

    m_in, m_out = 6.0, 3.0
    known = np.array([[9.0, 0.0, 0.0], [np.log(4.0 / 3.0)] * 3], np.float32)  # logsumexp ~9.0 and 4 (= log(4))
    other = np.array([[0.0, 0.0, 0.0], [5.0, 5.0, 5.0]], np.float32)  # logsumexp log(3) and 5 + log(3)
    below, above = (t.numpy() for t in energy_hinges(tf.constant(known), tf.constant(other), m_in, m_out))
    np.testing.assert_allclose(below, [0.0, (m_in - np.log(4.0)) ** 2], rtol=1e-5)
    np.testing.assert_allclose(above, [0.0, (5.0 + np.log(3.0) - m_out) ** 2], rtol=1e-5)
    assert TrainConfig(data_dir=Path(".")).recipe().oe_loss == "uniform"
    energy = TrainConfig(data_dir=Path("."), oe_loss="energy").recipe()
    assert (energy.oe_loss, energy.oe_margins) == ("energy", ENERGY_MARGINS) and "energy" in OE_LOSSES
