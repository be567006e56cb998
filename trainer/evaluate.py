"""Evaluate an exported SavedModel on the test split: accuracy, calibration, out-of-class detection, speed.

Writes ``report.json``, ``confusion.png`` (row-normalised, so each row shows where one class's
drawings went), ``curves.png`` (loss and accuracy by epoch from the model card) and ``reliability.png``
(accuracy against confidence, before and after temperature scaling) into the output directory, and
measures the serving signature's images/s at batch 1 and batch 128 on this machine.

Calibration: the expected calibration error (15 bins) of the exported probabilities, and of the
uncalibrated ones, recovered as ``softmax(T * log p)`` with the card's temperature T. Out-of-class
detection: the known test drawings against every drawing of the held-out unknown TEST classes (the
card's class split; for a model without one, the same hash split of the data's unknown classes),
rendered by doodle as the gateway renders them, scored by ``KNOWN_SCORE`` or, for a model exported
without it, by the max probability.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from doodle.contract import INPUT_KEY, KNOWN_SCORE, MODEL_CARD_OOD, OUTPUT_KEY, SIGNATURE_NAME
from trainer import ood
from trainer.data import BitmapData, Split, SplitSpec
from trainer.export import CARD_FILE, latest_version_dir, read_labels


class LoadedModel:
    """An exported version loaded with ``tf.saved_model.load``; ``predict`` runs ``serving_default``."""

    def __init__(self, path: Path) -> None:
        self.dir = latest_version_dir(path)
        self.saved = tf.saved_model.load(str(self.dir))
        self.fn = self.saved.signatures[SIGNATURE_NAME]
        self.labels = read_labels(self.dir)
        card = self.dir / CARD_FILE
        self.card: dict[str, Any] = json.loads(card.read_text()) if card.exists() else {}

    @property
    def version(self) -> int:
        """The integer version directory name."""
        return int(self.dir.name)

    @property
    def has_known_score(self) -> bool:
        """Whether the signature gives ``KNOWN_SCORE`` (models exported before it do not)."""
        return KNOWN_SCORE in self.fn.structured_outputs

    @property
    def temperature(self) -> float | None:
        """The calibration temperature from the model card, None for a model exported without one."""
        t = (self.card.get("calibration") or {}).get("temperature")
        return float(t) if t is not None else None

    @property
    def threshold(self) -> float | None:
        """The out-of-class threshold from the model card, None when the card has none."""
        t = (self.card.get(MODEL_CARD_OOD) or {}).get("threshold")
        return float(t) if t is not None else None

    def outputs(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Every output of the signature for uint8 images [n, 28, 28, 1] (or [n, 784], or [n, 28, 28])."""
        x = np.asarray(images, dtype=np.uint8).reshape(-1, 28, 28, 1)
        return {k: v.numpy() for k, v in self.fn(**{INPUT_KEY: tf.constant(x)}).items()}

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities [n, C] for uint8 images [n, 28, 28, 1] (or [n, 784], or [n, 28, 28])."""
        x = np.asarray(images, dtype=np.uint8).reshape(-1, 28, 28, 1)
        return self.fn(**{INPUT_KEY: tf.constant(x)})[OUTPUT_KEY].numpy()

    def predict_with_score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities [n, C] and the known-score [n]: ``KNOWN_SCORE``, or the max probability without it."""
        out = self.outputs(images)
        probs = out[OUTPUT_KEY]
        return probs, (out[KNOWN_SCORE] if KNOWN_SCORE in out else probs.max(axis=1))


def images_per_second(model: LoadedModel, batch: int, seconds: float = 2.0) -> float:
    """Throughput of the serving signature at a fixed batch size, after a warm-up call."""
    x = np.random.default_rng(0).integers(0, 256, (batch, 28, 28, 1), dtype=np.uint8)
    model.predict(x)
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        model.predict(x)
        n += batch
    return n / (time.perf_counter() - t0)


def evaluate(
    model_path: Path,
    data_dir: Path,
    out_dir: Path | None = None,
    split: Split = Split.TEST,
    batch_size: int = 512,
    measure_speed: bool = True,
) -> dict[str, Any]:
    """Evaluate and write the report and plots; returns the report."""
    model = LoadedModel(model_path)
    spec_d = model.card.get("data", {}).get("split", {})
    spec = SplitSpec(
        val_fraction=spec_d.get("val_fraction", SplitSpec.val_fraction),
        test_fraction=spec_d.get("test_fraction", SplitSpec.test_fraction),
        max_eval_per_class=spec_d.get("max_eval_per_class", SplitSpec.max_eval_per_class),
    )
    data = BitmapData.from_dir(data_dir, model.labels, spec)
    if data.labels != model.labels:
        raise ValueError("the data's classes do not match the model's labels")
    out_dir = out_dir or model.dir / "evaluation"
    out_dir.mkdir(parents=True, exist_ok=True)
    c = len(model.labels)
    confusion = np.zeros((c, c), dtype=np.int64)
    top3 = 0
    total = data.count(split)
    all_probs: list[np.ndarray] = []
    all_labels: list[np.ndarray] = []
    known_scores: list[np.ndarray] = []
    with tqdm(total=total, desc=f"evaluating {split}", unit="drawing", disable=None) as bar:
        for x, y in data.batches(split, batch_size, shuffle=False):
            probs, score = model.predict_with_score(x)
            best = np.argsort(-probs, axis=1)[:, :3]
            np.add.at(confusion, (y, best[:, 0]), 1)
            top3 += int((best == y[:, None]).any(axis=1).sum())
            all_probs.append(probs)
            all_labels.append(y)
            known_scores.append(score)
            bar.update(len(y))
    probs_all, labels_all = np.concatenate(all_probs), np.concatenate(all_labels)
    per_class = confusion.diagonal() / np.maximum(confusion.sum(axis=1), 1)
    report: dict[str, Any] = {
        "model_dir": str(model.dir),
        "version": model.version,
        "architecture": model.card.get("architecture"),
        "parameters": model.card.get("parameters"),
        "split": str(split),
        "drawings": int(confusion.sum()),
        "top1": float(confusion.trace() / max(confusion.sum(), 1)),
        "top3": top3 / max(int(confusion.sum()), 1),
        "per_class_accuracy": {label: round(float(a), 4) for label, a in zip(model.labels, per_class, strict=True)},
        "confusion_matrix": confusion.tolist(),
        "most_confused": _most_confused(confusion, model.labels),
        "training_seconds": model.card.get("training_seconds"),
    }
    report["calibration"] = calibration_report(probs_all, labels_all, model.temperature)
    report["out_of_class"] = out_of_class_report(model, data_dir, np.concatenate(known_scores), batch_size)
    if measure_speed:
        report["images_per_second"] = {
            "batch_1": round(images_per_second(model, 1), 1),
            "batch_128": round(images_per_second(model, 128), 1),
        }
    (out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    plot_confusion(confusion, model.labels, out_dir / "confusion.png", report["top1"])
    plot_reliability(probs_all, labels_all, model.temperature, out_dir / "reliability.png")
    if model.card.get("history"):
        plot_curves(model.card["history"], out_dir / "curves.png", model.card.get("architecture", ""))
    return report


def uncalibrated(probabilities: np.ndarray, temperature: float | None) -> np.ndarray:
    """The probabilities before temperature scaling: ``softmax(T * log p)`` (log p is logits / T plus a constant)."""
    if temperature is None or temperature == 1.0:
        return probabilities
    return ood.softmax(np.log(np.maximum(probabilities.astype(np.float64), 1e-38)), 1.0 / temperature)


def calibration_report(probabilities: np.ndarray, labels: np.ndarray, temperature: float | None) -> dict[str, Any]:
    """ECE (15 bins) of the exported probabilities and of the uncalibrated ones."""
    return {
        "bins": ood.ECE_BINS,
        "temperature": temperature,
        "ece_before": round(ood.expected_calibration_error(uncalibrated(probabilities, temperature), labels), 4),
        "ece_after": round(ood.expected_calibration_error(probabilities, labels), 4),
        "note": "ece_after is the exported probabilities; ece_before undoes the card's temperature"
        if temperature is not None
        else "no calibration temperature in the model card: both are the exported probabilities",
    }


def out_of_class_report(
    model: LoadedModel, data_dir: Path, known_scores: np.ndarray, batch_size: int = 512
) -> dict[str, Any]:
    """AUROC and FPR at 95% TPR of the known test drawings against the held-out unknown test classes."""
    card_ood = model.card.get(MODEL_CARD_OOD) or {}
    test_classes = (card_ood.get("split") or {}).get("test_classes")
    source = "the model card's split"
    if test_classes is None:
        test_classes = ood.split_classes(ood.unknown_classes(data_dir, model.labels))["test"]
        source = "the hash split of the data's unknown classes (the card has none)"
    unknown = ood.load_unknown(data_dir, test_classes, ood.cache_dir())
    if not len(unknown):
        return {"skipped": f"no drawings of unknown test classes under {data_dir}/simplified or raw"}
    scores = np.concatenate(
        [model.predict_with_score(unknown.images[i : i + batch_size])[1] for i in range(0, len(unknown), batch_size)]
    )
    summary = ood.ood_summary(known_scores, scores, model.threshold)
    return {
        "score": KNOWN_SCORE if model.has_known_score else "max probability (no known_score output)",
        "test_classes": len(test_classes),
        "test_classes_from": source,
        **summary,
    }


def _most_confused(confusion: np.ndarray, labels: Sequence[str], n: int = 10) -> list[dict[str, Any]]:
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None)[:n]
    pairs = []
    for idx in flat:
        i, j = np.unravel_index(idx, off.shape)
        if off[i, j] == 0:
            break
        pairs.append({"true": labels[i], "predicted": labels[j], "count": int(off[i, j])})
    return pairs


def plot_confusion(confusion: np.ndarray, labels: Sequence[str], path: Path, top1: float) -> None:
    """A row-normalised confusion matrix with class names on both axes."""
    norm = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    size = max(6.0, 0.32 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion on the test split (top-1 {top1:.3f}); rows sum to 1")
    if len(labels) <= 40:
        for i in range(len(labels)):
            for j in range(len(labels)):
                if norm[i, j] >= 0.02:
                    ax.text(j, i, f"{norm[i, j] * 100:.0f}", ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reliability(probabilities: np.ndarray, labels: np.ndarray, temperature: float | None, path: Path) -> None:
    """Reliability diagram: accuracy against confidence per bin, before and after temperature scaling."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharey=True)
    edges = np.linspace(0.0, 1.0, ood.ECE_BINS + 1)
    views = (("before calibration", uncalibrated(probabilities, temperature)), ("exported (calibrated)", probabilities))
    for ax, (title, p) in zip(axes, views, strict=True):
        conf, acc, count = ood.reliability(p, labels)
        ece = ood.expected_calibration_error(p, labels)
        used = count > 0
        ax.bar(edges[:-1][used], acc[used], width=1.0 / ood.ECE_BINS, align="edge", edgecolor="black",
               alpha=0.75, label="accuracy")
        centres = (edges[:-1] + edges[1:]) / 2.0
        ax.plot(centres[used], conf[used], "o", color="tab:red", ms=4, label="mean confidence in the bin")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top-1 probability)")
        ax.set_title(f"{title}: ECE {ece:.4f}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=8)
    t = "none" if temperature is None else f"{temperature:.3f}"
    fig.suptitle(f"Reliability on the test split ({ood.ECE_BINS} bins; temperature {t})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(history: Sequence[dict[str, float]], path: Path, title: str = "") -> None:
    """Training and validation loss and accuracy by epoch."""
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(epochs, [h["loss"] for h in history], marker="o", label="train (augmented, smoothed)")
    ax1.plot(epochs, [h["val_loss"] for h in history], marker="o", label="validation")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(epochs, [h["accuracy"] for h in history], marker="o", label="train (augmented)")
    ax2.plot(epochs, [h["val_accuracy"] for h in history], marker="o", label="validation")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("top-1 accuracy")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.suptitle(f"Training curves {title}".strip())
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
