"""The training loop: one process or many (``MultiWorkerMirroredStrategy`` through ``TF_CONFIG``).

A custom loop rather than ``model.fit`` so that every piece a team relies on is explicit: seeded
per-epoch shuffling shared by all workers, progress bars, TensorBoard scalars, a checkpoint every
epoch and ``--resume`` from the last one, and an export written once, by the chief, atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from trainer import models, ood
from trainer.config import OE_LOSSES, Recipe, TrainConfig
from trainer.data import BitmapData, Split, SplitSpec
from trainer.export import ModelCard, export_model, latest_version_dir
from trainer.pipeline import NO_AUGMENT, Augment, make_dataset, make_extra_dataset

log = logging.getLogger(__name__)


@dataclass(slots=True)
class TrainResult:
    """What a run produced; ``export_dir`` is None on non-chief workers."""

    export_dir: Path | None
    history: list[dict[str, float]]
    train_seconds: float
    weights_sha256: str
    is_chief: bool


def make_strategy() -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy when TF_CONFIG names more than one worker, else the default."""
    tf_config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    workers = tf_config.get("cluster", {}).get("worker", [])
    if len(workers) + len(tf_config.get("cluster", {}).get("chief", [])) > 1:
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def _task() -> tuple[str, int]:
    tf_config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    task = tf_config.get("task", {})
    return task.get("type", "worker"), int(task.get("index", 0))


def is_chief() -> bool:
    """The chief (or worker 0 when there is no chief) writes checkpoints, logs and the export."""
    kind, index = _task()
    tf_config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    has_chief = "chief" in tf_config.get("cluster", {})
    return kind == "chief" or (kind == "worker" and index == 0 and not has_chief)


def weights_digest(model: keras.Model) -> str:
    """SHA-256 over every weight (trainable or not), to compare workers' models."""
    h = hashlib.sha256()
    for w in model.weights:
        h.update(np.ascontiguousarray(keras.ops.convert_to_numpy(w)).tobytes())
    return h.hexdigest()


def energy_hinges(
    known_logits: tf.Tensor, other_logits: tf.Tensor, m_in: float, m_out: float
) -> tuple[tf.Tensor, tf.Tensor]:
    """The energy loss's per-example squared hinges (Liu et al. 2020, with E = -logsumexp(logits)):
    ``relu(m_in - logsumexp(known))**2`` and ``relu(logsumexp(other) - m_out)**2`` (applied to the unknown ones)."""
    below = tf.square(tf.nn.relu(m_in - tf.reduce_logsumexp(known_logits, axis=-1)))
    above = tf.square(tf.nn.relu(tf.reduce_logsumexp(other_logits, axis=-1) - m_out))
    return below, above


def _schedule(recipe: Recipe, steps_per_epoch: int) -> float | keras.optimizers.schedules.LearningRateSchedule:
    if recipe.schedule == "constant":
        return recipe.learning_rate
    total = max(1, recipe.epochs * steps_per_epoch)
    warmup = min(steps_per_epoch, total // 2)
    return keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=total - warmup, warmup_target=recipe.learning_rate, warmup_steps=warmup
    )


def train(cfg: TrainConfig) -> TrainResult:
    """Train, checkpoint every epoch, export on the chief; returns what was produced."""
    strategy = make_strategy()
    chief = is_chief()
    workers = strategy.num_replicas_in_sync
    recipe = cfg.recipe()
    data = BitmapData.from_dir(cfg.data_dir, cfg.classes, replace_per_class(cfg.split, cfg.per_class))
    workdir = cfg.workdir or Path("runs") / cfg.arch
    ckpt_dir = workdir / "checkpoints" if chief else Path(tempfile.mkdtemp(prefix="ckpt-worker-"))
    global_bs = recipe.batch_size
    per_replica_bs = global_bs // workers
    steps = data.steps(Split.TRAIN, per_replica_bs, num_shards=workers)
    if steps == 0:
        raise ValueError(f"batch size {global_bs} is larger than the training split ({data.count(Split.TRAIN)})")
    num_classes = data.num_classes
    outliers = ood.outlier_data(cfg.data_dir, data, ood.cache_dir())
    oe_on = recipe.oe_weight > 0 and recipe.oe_batch_size > 0 and bool((outliers.train_targets < 0).any())
    if recipe.oe_weight > 0 and not oe_on:
        log.warning(
            "outlier exposure is on but %s has no drawings of unknown classes: training without it", cfg.data_dir
        )
    if oe_on and chief:
        log.info(
            "outlier exposure: %d drawings (%d unknown classes, -1 target) beside the known batches",
            len(outliers.train_images),
            len(outliers.split["train"]),
        )
    oe_per_replica = recipe.oe_batch_size // workers if oe_on else 0
    keras.utils.set_random_seed(cfg.seed)
    keras.config.set_dtype_policy(recipe.precision)

    with strategy.scope():
        model = models.ARCHITECTURES[cfg.arch](num_classes)
        if workers > 1:
            # Synchronised batch norm keeps the moving statistics, and so every weight, identical on all
            # workers; plain batch norm would let them drift apart.
            for layer in model.layers:
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.synchronized = True
        if recipe.weight_decay:
            optimizer = keras.optimizers.AdamW(_schedule(recipe, steps), weight_decay=recipe.weight_decay)
            optimizer.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
        else:
            optimizer = keras.optimizers.Adam(_schedule(recipe, steps))
        optimizer.build(model.trainable_variables)
        epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        init_digest = None
        if cfg.init_from is not None:
            restore_exported_weights(model, cfg.init_from, recipe.tta)
            init_digest = weights_digest(model)
    loss_fn = keras.losses.CategoricalCrossentropy(
        from_logits=True, label_smoothing=recipe.label_smoothing, reduction="none"
    )
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=epoch_var)
    manager = tf.train.CheckpointManager(checkpoint, str(ckpt_dir), max_to_keep=2)
    history_path = workdir / "history.json"
    history: list[dict[str, float]] = []
    elapsed_before = 0.0
    if cfg.resume and manager.latest_checkpoint is None and chief:
        log.warning("--resume: no checkpoint in %s, starting from scratch", ckpt_dir)
    if cfg.resume:
        latest = tf.train.latest_checkpoint(str(workdir / "checkpoints"))
        if latest:
            checkpoint.restore(latest)
            if history_path.exists():
                saved = json.loads(history_path.read_text())
                history = saved["history"][: int(epoch_var.numpy())]
                elapsed_before = float(saved.get("train_seconds", 0.0))
            log.info("resumed from %s at epoch %d", latest, int(epoch_var.numpy()))

    oe_weight = float(recipe.oe_weight)
    if recipe.oe_loss not in OE_LOSSES:
        raise ValueError(f"unknown outlier-exposure loss {recipe.oe_loss!r}; one of {OE_LOSSES}")
    energy_oe = recipe.oe_loss == "energy"
    m_in, m_out = (float(m) for m in recipe.oe_margins)

    @tf.function
    def train_step(x: tf.Tensor, y: tf.Tensor, xo: tf.Tensor, yo: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        def step_fn(x: tf.Tensor, y: tf.Tensor, xo: tf.Tensor, yo: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            b = tf.shape(x)[0]
            with tf.GradientTape() as tape:
                logits_all = tf.cast(model(tf.concat([x, xo], axis=0), training=True), tf.float32)
                logits = logits_all[:b]
                per_example = loss_fn(tf.one_hot(y, num_classes), logits)
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_bs)
                if oe_per_replica:
                    # Outlier exposure: known drawings rendered by doodle keep their label; unknown ones (-1)
                    # are pulled towards the uniform distribution (cross-entropy to uniform, weighted).
                    lo = logits_all[b:]
                    unknown = tf.cast(yo < 0, tf.float32)
                    to_uniform = tf.reduce_logsumexp(lo, axis=-1) - tf.reduce_mean(lo, axis=-1)
                    labelled = loss_fn(tf.one_hot(tf.maximum(yo, 0), num_classes), lo)
                    if energy_oe:
                        below, above = energy_hinges(logits, lo, m_in, m_out)
                        extra = unknown * oe_weight * above + (1.0 - unknown) * labelled
                        loss += oe_weight * tf.nn.compute_average_loss(below, global_batch_size=global_bs)
                    else:
                        extra = unknown * oe_weight * to_uniform + (1.0 - unknown) * labelled
                    loss += tf.nn.compute_average_loss(extra, global_batch_size=global_bs)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
            correct = tf.reduce_sum(tf.cast(tf.argmax(logits, -1, output_type=tf.int32) == y, tf.float32))
            return loss, correct

        loss, correct = strategy.run(step_fn, args=(x, y, xo, yo))
        return (
            strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None),
            strategy.reduce(tf.distribute.ReduceOp.SUM, correct, axis=None),
        )

    writer = tf.summary.create_file_writer(str(workdir / "logs")) if chief else tf.summary.create_noop_writer()
    augment = Augment() if recipe.augment else NO_AUGMENT
    start_epoch = int(epoch_var.numpy())
    t_start = time.perf_counter()
    for epoch in range(start_epoch, recipe.epochs):

        def dataset_fn(ctx: tf.distribute.InputContext, epoch: int = epoch) -> tf.data.Dataset:
            known = make_dataset(
                data,
                Split.TRAIN,
                ctx.get_per_replica_batch_size(global_bs),
                shuffle=True,
                augment=augment,
                seed=cfg.seed,
                epoch=epoch,
                shard=ctx.input_pipeline_id,
                num_shards=ctx.num_input_pipelines,
            )
            if oe_per_replica:
                extra = make_extra_dataset(
                    outliers.train_images,
                    outliers.train_targets,
                    oe_per_replica,
                    augment=augment,
                    seed=cfg.seed,
                    epoch=epoch,
                    shard=ctx.input_pipeline_id,
                    num_shards=ctx.num_input_pipelines,
                )
            else:
                extra = tf.data.Dataset.from_tensors(
                    (tf.zeros([0, *models.INPUT_SHAPE[1:]], tf.float32), tf.zeros([0], tf.int32))
                ).repeat()
            return tf.data.Dataset.zip(known, extra).map(lambda k, e: (*k, *e))

        dist = strategy.distribute_datasets_from_function(dataset_fn)
        t0 = time.perf_counter()
        loss_sum = correct = seen = 0.0
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{recipe.epochs}", unit="step", disable=None if chief else True)
        for x, y, xo, yo in dist:
            loss, right = train_step(x, y, xo, yo)
            n = per_replica_bs * workers
            loss_sum += float(loss) * n
            correct += float(right)
            seen += n
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", refresh=False)
        bar.close()
        seconds = time.perf_counter() - t0
        val = evaluate_split(model, data, Split.VAL)
        record = {
            "epoch": epoch + 1,
            "loss": loss_sum / max(seen, 1),
            "accuracy": correct / max(seen, 1),
            "val_loss": val["loss"],
            "val_accuracy": val["top1"],
            "seconds": seconds,
            "images_per_second": seen / seconds,
            "learning_rate": float(keras.ops.convert_to_numpy(optimizer.learning_rate)),
        }
        history.append(record)
        with writer.as_default(step=epoch + 1):
            for key in ("loss", "accuracy", "val_loss", "val_accuracy", "images_per_second", "learning_rate"):
                tf.summary.scalar(key, record[key])
        writer.flush()
        epoch_var.assign(epoch + 1)
        manager.save(checkpoint_number=epoch + 1)
        if chief:
            history_path.parent.mkdir(parents=True, exist_ok=True)
            history_path.write_text(
                json.dumps(
                    {"history": history, "train_seconds": elapsed_before + time.perf_counter() - t_start}, indent=1
                )
            )
            tqdm.write(
                f"epoch {epoch + 1}: loss {record['loss']:.4f} acc {record['accuracy']:.4f} "
                f"val_acc {record['val_accuracy']:.4f} ({seconds:.0f}s, {record['images_per_second']:.0f} img/s)"
            )
    train_seconds = elapsed_before + time.perf_counter() - t_start
    digest = weights_digest(model)
    workdir.mkdir(parents=True, exist_ok=True)
    kind, index = _task()
    (workdir / f"weights-{kind}-{index}.sha256").write_text(digest + "\n")

    keras.config.set_dtype_policy("float32")
    served = models.for_inference(models.as_float32(model, num_classes, cfg.arch), recipe.tta)
    metrics: dict[str, Any] = {}
    # Calibration and the out-of-class score are chosen on validation only (known val rows, unknown val classes).
    val_logits, val_labels = split_logits(served, data, Split.VAL)
    temperature = ood.fit_temperature(val_logits, val_labels)
    method = "outlier exposure" if oe_on else "none (no outlier data)"
    ood_card, choice = ood.choose_score(
        served_logits(served), val_logits, outliers, cfg.data_dir, ood.cache_dir(), temperature, method
    )
    if chief:
        tqdm.write(
            f"calibration: T = {temperature:.4f} (fitted on validation); out-of-class score: "
            f"{ood_card['score_kind']} (validation: {choice})"
        )
    if cfg.evaluate:
        test = evaluate_split(served, data, Split.TEST)
        val = evaluate_split(served, data, Split.VAL)
        metrics = {
            "test_top1": test["top1"],
            "test_top3": test["top3"],
            "test_n": test["n"],
            "val_top1": val["top1"],
            "val_top3": val["top3"],
            "val_n": val["n"],
        }
        test_logits, test_labels = split_logits(served, data, Split.TEST)
        metrics["test_ece_uncalibrated"] = ood.expected_calibration_error(ood.softmax(test_logits), test_labels)
        metrics["test_ece"] = ood.expected_calibration_error(ood.softmax(test_logits, temperature), test_labels)
        test_unknown = ood.load_unknown(cfg.data_dir, outliers.split["test"], ood.cache_dir())
        if len(test_unknown):
            kind = ood_card["score_kind"]
            known_s = ood.known_score(test_logits, kind, temperature)
            unknown_s = ood.known_score(served_logits(served)(test_unknown.images), kind, temperature)
            metrics["test_out_of_class"] = ood.ood_summary(known_s, unknown_s, ood_card["threshold"])
        if chief:
            tqdm.write(
                f"test: top-1 {test['top1']:.4f}  top-3 {test['top3']:.4f}  ({test['n']} drawings); ECE "
                f"{metrics['test_ece_uncalibrated']:.4f} -> {metrics['test_ece']:.4f} calibrated"
            )
            if "test_out_of_class" in metrics:
                tqdm.write(f"test out-of-class: {metrics['test_out_of_class']}")
    card = ModelCard.build(cfg, recipe, data, model, history, train_seconds, workers, metrics)
    if cfg.init_from is not None:
        card.recipe |= {"init_from": str(cfg.init_from), "init_weights_sha256": init_digest}
    n_unknown = int((outliers.train_targets < 0).sum()) if oe_on else 0
    card.recipe |= {
        "outlier_exposure": {
            "unknown_drawings": n_unknown,
            "known_drawings_rendered_by_doodle": len(outliers.train_targets) - n_unknown if oe_on else 0,
        }
    }
    card.calibration = {"method": "temperature scaling", "temperature": temperature, "fitted_on": "validation"}
    card.ood = {k: v for k, v in ood_card.items() if k != "score_kind"}
    if chief:
        export_dir: Path | None = export_model(
            served,
            data.labels,
            cfg.out,
            card,
            version=cfg.version,
            temperature=temperature,
            score=ood_card["score_kind"],
            validation=(x for x, _ in data.batches(Split.VAL, 512, shuffle=False)),
        )
    else:
        # Every worker must take part in saving (it may run collectives); non-chiefs write to a scratch
        # directory that is removed at once, so exactly one export is written.
        scratch = Path(tempfile.mkdtemp(prefix="export-worker-"))
        export_model(
            served, data.labels, scratch, card, version=1, temperature=temperature, score=ood_card["score_kind"]
        )
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        export_dir = None
    return TrainResult(export_dir, history, train_seconds, digest, chief)


def replace_per_class(spec: SplitSpec, per_class: int | None) -> SplitSpec:
    """The split spec with a per-class cap on training rows."""
    return SplitSpec(spec.val_fraction, spec.test_fraction, per_class, spec.max_eval_per_class)


def evaluate_split(
    model: keras.Model, data: BitmapData, split: Split, batch_size: int = 512, keep_predictions: bool = False
) -> dict[str, Any]:
    """Loss, top-1 and top-3 accuracy of a model on a split (and, optionally, every prediction)."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")
    total_loss = 0.0
    top1 = top3 = n = 0
    preds: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for x, y in data.batches(split, batch_size, shuffle=False):
        logits = np.asarray(_predict_logits(model, tf.constant(x)), dtype=np.float32)
        total_loss += float(loss_fn(y, logits))
        top = np.argsort(-logits, axis=1)[:, :3]
        top1 += int((top[:, 0] == y).sum())
        top3 += int((top == y[:, None]).any(axis=1).sum())
        n += len(y)
        if keep_predictions:
            preds.append(top[:, 0])
            labels.append(y)
    result: dict[str, Any] = {
        "loss": total_loss / max(n, 1),
        "top1": top1 / max(n, 1),
        "top3": top3 / max(n, 1),
        "n": n,
    }
    if keep_predictions:
        result["predicted"] = np.concatenate(preds) if preds else np.zeros(0, np.int64)
        result["labels"] = np.concatenate(labels) if labels else np.zeros(0, np.int32)
    return result


def split_logits(
    model: keras.Model, data: BitmapData, split: Split, batch_size: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """Logits float32 [n, C] and labels of a whole split, in the split's order."""
    logits, labels = [], []
    for x, y in data.batches(split, batch_size, shuffle=False):
        logits.append(np.asarray(_predict_logits(model, tf.constant(x)), dtype=np.float32))
        labels.append(y)
    return np.concatenate(logits), np.concatenate(labels)


def served_logits(model: keras.Model, batch_size: int = 512) -> Callable[[np.ndarray], np.ndarray]:
    """A function of uint8 images [n, 28, 28, 1] to the model's logits, batch by batch."""

    def fn(images: np.ndarray) -> np.ndarray:
        out = [
            np.asarray(_predict_logits(model, tf.constant(images[i : i + batch_size])), dtype=np.float32)
            for i in range(0, len(images), batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    return fn


def restore_exported_weights(model: keras.Model, version_dir: Path, tta: tuple[str, ...]) -> None:
    """Load an exported version's weights into ``model`` (same architecture and classes), for fine-tuning."""
    path = latest_version_dir(Path(version_dir)) / "variables" / "variables"
    # The export's object graph is ServingModule.model -> (TestTimeAugment.inner ->) the network.
    errors = []
    for wrapper in (models.TestTimeAugment(model, tta or models.TTA_VIEWS), model):
        try:
            tf.train.Checkpoint(model=wrapper).read(str(path)).assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as exc:
            errors.append(str(exc).splitlines()[0])
            continue
        log.info("initialised from %s", path)
        return
    raise ValueError(f"cannot load the weights of {path} into a {model.name} model: {errors}")


#: The last model's prediction graph: ``model`` called eagerly ran op by op (about 1.2 s per batch of 512 through
#: the four views on 2 cores, most of a short training run's evaluation time); one graph per model, kept for
#: the model predicted last only.
_PREDICT: list[Any] = [None, None]


def _predict_logits(model: keras.Model, x: tf.Tensor) -> tf.Tensor:
    if _PREDICT[0] is not model:

        def predict(images: tf.Tensor) -> tf.Tensor:
            return tf.cast(model(tf.cast(images, tf.float32), training=False), tf.float32)

        _PREDICT[:] = [model, tf.function(predict, reduce_retracing=True)]
    return _PREDICT[1](x)


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as JSON-friendly values (paths as strings)."""
    d = asdict(cfg)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}
