"""SavedModel export in TF Serving's layout, written atomically, with labels, warm-up data and a model card.

``models/quickdraw/<version>/`` holds:

- ``saved_model.pb`` and ``variables/``, with signature ``serving_default``: input ``image`` uint8
  [batch, 28, 28, 1] (strokes bright on dark, as numpy_bitmap), outputs ``probabilities`` float32
  [batch, C], ``top_k_scores`` float32 [batch, K], ``top_k_indices`` int32 [batch, K] and
  ``top_k_labels`` string [batch, K]; every output has the batch dimension first, as TF Serving's
  server-side batching requires;
- ``assets/labels.txt``: the class names, one a line, in output order;
- ``assets.extra/tf_serving_warmup_requests``: PredictionLog records TF Serving replays on load;
- ``model_card.json``: what the model is, what it was trained on and how well it does, and (given the
  validation split) the distribution of its answers there (``trainer.distribution``: model health).

The version directory appears in one ``rename`` from a hidden temporary directory beside it, so a
server watching ``models/quickdraw/`` never sees a half-written version.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf

from doodle import BITMAP_SIDE
from doodle.contract import (
    INPUT_DTYPE,
    INPUT_KEY,
    INPUT_SHAPE,
    KNOWN_SCORE,
    LABELS_PATH,
    MODEL_CARD_DISTRIBUTION,
    MODEL_CARD_OOD,
    OUTPUT_DTYPES,
    OUTPUT_KEY,
    OUTPUTS,
    SIGNATURE_NAME,
    TOP_K,
    TOP_K_INDICES,
    TOP_K_LABELS,
    TOP_K_SCORES,
)
from trainer.distribution import DistributionCounter

if TYPE_CHECKING:
    from trainer.config import Recipe, TrainConfig
    from trainer.data import BitmapData

MODEL_NAME = "quickdraw"
WARMUP_BATCH_SIZES = (1, 8, 32, 128)
CARD_FILE = "model_card.json"


#: How each out-of-class score is computed from the logits z and the temperature T (see trainer.ood.SCORES).
SCORE_KINDS = ("msp", "energy", "max_logit")


class ServingModule(tf.Module):
    """The exported graph: uint8 images in, calibrated probabilities, the top classes and a known-score out.

    ``probabilities`` are ``softmax(logits / temperature)`` (temperature 1: the plain softmax); with ``score``
    set the signature also gives ``KNOWN_SCORE`` float32 [n] (higher = more like a known class).
    """

    def __init__(
        self,
        model: keras.Model,
        labels: Sequence[str],
        labels_path: Path,
        temperature: float = 1.0,
        score: str | None = None,
    ) -> None:
        super().__init__()
        if score is not None and score not in SCORE_KINDS:
            raise ValueError(f"unknown score {score!r}; one of {SCORE_KINDS}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, not {temperature}")
        self.model = model
        self.labels_asset = tf.saved_model.Asset(str(labels_path))
        self.labels = tf.constant(list(labels))
        self.k = min(TOP_K, len(labels))
        self.temperature = float(temperature)
        self.score = score

    @tf.function(input_signature=[tf.TensorSpec(INPUT_SHAPE, tf.as_dtype(INPUT_DTYPE), name=INPUT_KEY)])
    def serve(self, image: tf.Tensor) -> dict[str, tf.Tensor]:
        """Classify a batch of 28x28 uint8 bitmaps."""
        logits = tf.cast(self.model(tf.cast(image, tf.float32), training=False), tf.float32)
        scaled = logits / self.temperature if self.temperature != 1.0 else logits
        probabilities = tf.nn.softmax(scaled, axis=-1)
        scores, indices = tf.math.top_k(probabilities, k=self.k)
        out = {
            OUTPUT_KEY: probabilities,
            TOP_K_SCORES: scores,
            TOP_K_INDICES: indices,
            TOP_K_LABELS: tf.gather(self.labels, indices),
        }
        if self.score == "msp":
            out[KNOWN_SCORE] = scores[:, 0]
        elif self.score == "energy":
            out[KNOWN_SCORE] = self.temperature * tf.reduce_logsumexp(scaled, axis=-1)
        elif self.score == "max_logit":
            out[KNOWN_SCORE] = tf.reduce_max(logits, axis=-1)
        return out


@dataclass(slots=True)
class ModelCard:
    """``model_card.json``: the facts a user of the model needs, in one file."""

    name: str
    version: int | None
    created: str
    classes: list[str]
    architecture: str
    parameters: int
    input: dict[str, Any]
    outputs: dict[str, Any]
    data: dict[str, Any]
    recipe: dict[str, Any]
    metrics: dict[str, Any]
    history: list[dict[str, float]]
    training_seconds: float
    workers: int
    tensorflow_version: str
    keras_version: str
    machine: dict[str, Any]
    #: How the exported probabilities are calibrated (temperature scaling fitted on validation).
    calibration: dict[str, Any] | None = None
    #: The out-of-class decision, written under ``MODEL_CARD_OOD`` (score, method, threshold, class split).
    ood: dict[str, Any] | None = None
    #: What the model answers on the validation split, written under ``MODEL_CARD_DISTRIBUTION``
    #: (``trainer.distribution``): the gateway's model-health metrics are compared with it.
    distribution: dict[str, Any] | None = None

    @classmethod
    def build(
        cls,
        cfg: TrainConfig,
        recipe: Recipe,
        data: BitmapData,
        model: keras.Model,
        history: list[dict[str, float]],
        train_seconds: float,
        workers: int,
        metrics: dict[str, Any] | None = None,
    ) -> ModelCard:
        """Collect the card's facts from a finished training run."""
        from trainer.data import Split

        k = min(TOP_K, len(data.labels))
        return cls(
            name=MODEL_NAME,
            version=None,
            created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            classes=list(data.labels),
            architecture=cfg.arch,
            parameters=int(model.count_params()),
            input={
                "name": INPUT_KEY,
                "dtype": INPUT_DTYPE,
                "shape": [-1 if d is None else d for d in INPUT_SHAPE],
                "convention": "numpy_bitmap: strokes 255 on background 0, drawing centred",
            },
            outputs={
                **{name: f"{OUTPUT_DTYPES[name]} [batch, {'C' if name == OUTPUT_KEY else k}]" for name in OUTPUTS},
                KNOWN_SCORE: f"{OUTPUT_DTYPES[KNOWN_SCORE]} [batch]",
            },
            data={
                "data_dir": str(cfg.data_dir),
                "format": "numpy_bitmap",
                "split": {
                    "val_fraction": data.spec.val_fraction,
                    "test_fraction": data.spec.test_fraction,
                    "per_class": data.spec.per_class,
                    "max_eval_per_class": data.spec.max_eval_per_class,
                    "rule": "per class file: last rows are test, the rows before them validation",
                },
                "rows": {s.value: data.row_ranges(s) for s in Split},
                "counts": {s.value: data.count(s) for s in Split},
            },
            recipe=asdict(recipe) | {"seed": cfg.seed},
            metrics=metrics or {},
            history=history,
            training_seconds=round(train_seconds, 1),
            workers=workers,
            tensorflow_version=tf.__version__,
            keras_version=keras.__version__,
            machine={"platform": platform.platform(), "cpus": os.cpu_count()},
        )


def next_version(base: Path) -> int:
    """One more than the highest integer version directory under ``base`` (1 when there is none)."""
    versions = [int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit()] if base.exists() else []
    return max(versions, default=0) + 1


def export_model(
    model: keras.Model,
    labels: Sequence[str],
    base: Path,
    card: ModelCard,
    version: int | None = None,
    temperature: float = 1.0,
    score: str | None = None,
    validation: Iterable[np.ndarray] | None = None,
) -> Path:
    """Write ``base/<version>/`` atomically and return it. Refuses to overwrite an existing version.

    ``temperature`` divides the logits before the softmax; ``score`` adds the ``KNOWN_SCORE`` output.
    ``validation``: batches of the validation split's images, run through the exported signature for the card's
    ``MODEL_CARD_DISTRIBUTION`` entry (with the threshold of ``card.ood``, when it has one).
    """
    base.mkdir(parents=True, exist_ok=True)
    version = version or next_version(base)
    final = base / str(version)
    if final.exists():
        raise FileExistsError(f"{final} exists; versions are immutable, pick another --version")
    tmp = base / f".tmp-{version}-{uuid.uuid4().hex[:8]}"
    scratch = Path(tempfile.mkdtemp(prefix="labels-"))
    try:
        labels_path = scratch / LABELS_PATH.name
        labels_path.write_text("".join(f"{label}\n" for label in labels))
        module = ServingModule(model, labels, labels_path, temperature, score)
        tf.saved_model.save(module, str(tmp), signatures={SIGNATURE_NAME: module.serve.get_concrete_function()})
        if not (tmp / LABELS_PATH).is_file():  # TensorFlow copies assets into assets/, where the gateway reads them
            raise RuntimeError(f"the labels asset is not at {LABELS_PATH} in the exported SavedModel")
        write_warmup_requests(tmp / "assets.extra" / "tf_serving_warmup_requests")
        card.version = version
        if validation is not None:
            card.distribution = validation_distribution(module, labels, validation, card.ood)
        (tmp / CARD_FILE).write_text(json.dumps(card_dict(card), indent=1) + "\n")
        os.rename(tmp, final)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def card_dict(card: ModelCard) -> dict[str, Any]:
    """The card as written: the out-of-class entry under ``MODEL_CARD_OOD``, absent fields left out."""
    d = asdict(card)
    ood = d.pop("ood")
    distribution = d.pop("distribution")
    if d["calibration"] is None:
        d.pop("calibration")
    if ood is not None:
        d[MODEL_CARD_OOD] = ood
    else:
        d["outputs"].pop(KNOWN_SCORE, None)
    if distribution is not None:
        d[MODEL_CARD_DISTRIBUTION] = distribution
    return d


def validation_distribution(
    module: ServingModule, labels: Sequence[str], batches: Iterable[np.ndarray], ood: dict[str, Any] | None
) -> dict[str, Any]:
    """The card's ``MODEL_CARD_DISTRIBUTION`` entry: ``batches`` (uint8 [b, 28, 28, 1]) through the exported
    signature, counted by ``trainer.distribution``."""
    threshold = (ood or {}).get("threshold")
    counter = DistributionCounter(labels, None if threshold is None else float(threshold))
    for x in batches:
        out = module.serve(tf.constant(x, tf.as_dtype(INPUT_DTYPE)))
        known = out[KNOWN_SCORE].numpy() if KNOWN_SCORE in out else None
        counter.add(out[OUTPUT_KEY].numpy(), known, x)
    return counter.entry(f"validation split: {counter.drawings} drawings, the exported signature's answers")


def write_warmup_requests(path: Path, batch_sizes: Sequence[int] = WARMUP_BATCH_SIZES) -> None:
    """A TFRecord of ``tensorflow.serving.PredictionLog``, one Predict request per batch size."""
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for n in batch_sizes:
            request = predict_pb2.PredictRequest()
            request.model_spec.name = MODEL_NAME
            request.model_spec.signature_name = SIGNATURE_NAME
            images = (rng.random((n, BITMAP_SIDE, BITMAP_SIDE, 1)) > 0.9).astype(np.uint8) * 255
            request.inputs[INPUT_KEY].CopyFrom(tf.make_tensor_proto(images, dtype=tf.as_dtype(INPUT_DTYPE)))
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())


def read_labels(model_dir: Path) -> list[str]:
    """The class names of an exported version, in output order."""
    return (model_dir / LABELS_PATH).read_text().splitlines()


def latest_version_dir(path: Path) -> Path:
    """``path`` itself if it is a version directory, else its highest integer version."""
    if (path / "saved_model.pb").exists():
        return path
    versions = sorted((int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True)
    for v in versions:
        if (path / str(v) / "saved_model.pb").exists():
            return path / str(v)
    raise FileNotFoundError(f"no SavedModel version under {path}")
