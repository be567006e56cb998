"""Test models for the out-of-class decision (issue 18), built from the shipped SavedModel.

Until the retrained model (with its own ``known_score`` output) is shipped, and so that the tests do not depend
on which model is, these wrap the shipped model's serving signature in a new SavedModel:

- :func:`model_with_known_score`: the shipped outputs plus ``doodle.contract.KNOWN_SCORE``, the maximum softmax
  probability (MSP, a legitimate if simple out-of-class score), and a ``model_card.json`` whose
  ``MODEL_CARD_OOD`` entry carries the given threshold;
- :func:`model_without_known_score`: the shipped outputs alone (``contract.OUTPUTS``; a shipped ``known_score`` is
  dropped) and a model card without that entry: a model exported before issue 18.

Both copy the labels, the TF Serving warm-up requests (``assets.extra``) and the model card, so the embedded
backend, the TF Serving stand-in and the gateway serve them as they serve the shipped model. Building one takes
about 5 s (TensorFlow traces and saves the wrapper).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from harness import SHIPPED_MODEL

from doodle import contract
from service.backends import find_versions

#: The method the fixture's model card names.
MSP_METHOD = "max softmax probability (test fixture wrapping the shipped model)"
#: The threshold of the ``known_model`` fixture (tests/conftest.py). Measured with the shipped model (version 1):
#: the first 5 cats of numpy_bitmap score 0.969, 0.545, 0.905, 0.945, 0.948 (so the second is unknown); a cat drawn
#: in the playground 0.97, a single horizontal line 0.21 and a dot 0.25 (unknown). The tests check the decision
#: against the offline SavedModel, so another shipped model changes which drawings are unknown, not the tests' truth.
THRESHOLD = 0.7


def need_shipped_model() -> None:
    """Skip (saying why) when the shipped model or TensorFlow is missing: the fixtures are built from both."""
    import pytest

    if not find_versions(SHIPPED_MODEL):
        pytest.skip(f"no SavedModel under {SHIPPED_MODEL} (the shipped model is missing)")
    pytest.importorskip("tensorflow", reason="the out-of-class test models are built with TensorFlow")


def shipped_version_dir() -> Path:
    """The shipped model's newest version directory."""
    return SHIPPED_MODEL / str(find_versions(SHIPPED_MODEL)[-1])


def _save_wrapper(out: Path, with_known_score: bool) -> None:
    import tensorflow as tf

    source = shipped_version_dir()
    shipped = tf.saved_model.load(str(source))
    sig = shipped.signatures[contract.SIGNATURE_NAME]
    module = tf.Module()
    module.shipped = shipped  # tracked: its variables and assets are saved with the wrapper

    @tf.function(input_signature=[tf.TensorSpec(contract.INPUT_SHAPE, tf.uint8, name=contract.INPUT_KEY)])
    def serve(image: Any) -> dict[str, Any]:
        got = sig(**{contract.INPUT_KEY: image})
        outputs = {name: tf.identity(got[name], name=name) for name in contract.OUTPUTS}
        if with_known_score:
            outputs[contract.KNOWN_SCORE] = tf.reduce_max(got[contract.OUTPUT_KEY], axis=1, name=contract.KNOWN_SCORE)
        return outputs

    tf.saved_model.save(module, str(out), signatures={contract.SIGNATURE_NAME: serve})
    labels = out / contract.LABELS_PATH
    labels.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / contract.LABELS_PATH, labels)
    if (source / "assets.extra").is_dir():
        shutil.copytree(source / "assets.extra", out / "assets.extra", dirs_exist_ok=True)


def _card(out: Path, ood: dict[str, Any] | None) -> None:
    card_path = shipped_version_dir() / "model_card.json"
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    card.pop(contract.MODEL_CARD_OOD, None)
    card.setdefault("outputs", {}).pop(contract.KNOWN_SCORE, None)
    if ood is not None:
        card[contract.MODEL_CARD_OOD] = ood
        card["outputs"][contract.KNOWN_SCORE] = "float32 [batch]"
    (out / "model_card.json").write_text(json.dumps(card, indent=1) + "\n")


def model_with_known_score(out: Path, threshold: float, known_kept: float | None = 0.95) -> Path:
    """A SavedModel version directory at ``out`` (created): the shipped model plus ``known_score`` (MSP), with a
    model card whose out-of-class entry has ``threshold``. Returns ``out``."""
    _save_wrapper(out, with_known_score=True)
    ood: dict[str, Any] = {"score": contract.KNOWN_SCORE, "method": MSP_METHOD, "threshold": threshold}
    if known_kept is not None:
        ood["operating_point"] = {"known_kept": known_kept, "measured_on": "validation"}
    _card(out, ood)
    return out


def model_without_known_score(out: Path) -> Path:
    """A SavedModel version directory at ``out`` (created): the shipped model's contract outputs alone, with a model
    card without an out-of-class entry, as exported before issue 18. Returns ``out``."""
    _save_wrapper(out, with_known_score=False)
    _card(out, None)
    return out


def offline_outputs(version_dir: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    """Every output of ``version_dir``'s serving signature for uint8 ``images`` [n, 28, 28, 1], with TensorFlow."""
    import tensorflow as tf

    loaded = tf.saved_model.load(str(version_dir))
    got = loaded.signatures[contract.SIGNATURE_NAME](**{contract.INPUT_KEY: tf.constant(images)})
    return {k: v.numpy() for k, v in got.items()}
