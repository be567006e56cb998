"""tf.data input pipeline over ``trainer.data.BitmapData``, with on-the-fly augmentation.

Batches are gathered from the memory maps in a generator (cheap: a few fancy-indexing reads a
batch) and augmented in TensorFlow with one random affine warp per image: small rotation, scale,
shear and shift, and a horizontal flip (doodles of every Quick, Draw! class still read as that class
mirrored). Images stay 0..255 floats; the model scales them itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from doodle import BITMAP_SIDE
from trainer.data import BitmapData, Split


@dataclass(frozen=True, slots=True)
class Augment:
    """Ranges of the random affine warp; all zero disables augmentation."""

    rotate_deg: float = 10.0
    scale: float = 0.10
    shear: float = 0.10
    shift_px: float = 2.0
    flip: bool = True

    @property
    def enabled(self) -> bool:
        """Whether any augmentation is on."""
        return bool(self.rotate_deg or self.scale or self.shear or self.shift_px or self.flip)


NO_AUGMENT = Augment(0.0, 0.0, 0.0, 0.0, False)


def random_affine(images: tf.Tensor, aug: Augment, seed: tf.Tensor) -> tf.Tensor:
    """Warp a float batch [b, 28, 28, 1] by one random affine transform per image."""
    b = tf.shape(images)[0]
    seeds = tf.random.experimental.stateless_split(seed, 6)
    u = [tf.random.stateless_uniform([b], s, -1.0, 1.0) for s in tf.unstack(seeds)]
    theta = u[0] * aug.rotate_deg * math.pi / 180.0
    zoom = 1.0 + u[1] * aug.scale
    shear = u[2] * aug.shear
    tx, ty = u[3] * aug.shift_px, u[4] * aug.shift_px
    flip = tf.where(u[5] < 0.0, -1.0, 1.0) if aug.flip else tf.ones([b])
    # Output pixel p maps to input pixel A @ (p - c) + c - t, with c the centre of the image.
    cos, sin = tf.cos(theta) / zoom, tf.sin(theta) / zoom
    a0, a1 = cos * flip, -sin + shear
    b0, b1 = sin * flip, cos
    c = (BITMAP_SIDE - 1) / 2.0
    a2 = c - a0 * c - a1 * c - tx
    b2 = c - b0 * c - b1 * c - ty
    zeros = tf.zeros([b])
    transforms = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=[BITMAP_SIDE, BITMAP_SIDE],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )


def make_dataset(
    data: BitmapData,
    split: Split,
    batch_size: int,
    *,
    shuffle: bool,
    augment: Augment = NO_AUGMENT,
    seed: int = 0,
    epoch: int = 0,
    shard: int = 0,
    num_shards: int = 1,
) -> tf.data.Dataset:
    """One epoch of (float32 images 0..255 [b, 28, 28, 1], int32 labels [b]) batches."""

    def gen():
        yield from data.batches(
            split, batch_size, shuffle=shuffle, seed=seed, epoch=epoch, shard=shard, num_shards=num_shards
        )

    ds = tf.data.Dataset.from_generator(
        gen,
        output_signature=(
            tf.TensorSpec([None, BITMAP_SIDE, BITMAP_SIDE, 1], tf.uint8),
            tf.TensorSpec([None], tf.int32),
        ),
    )
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    # No autotuning: on a 2-core machine tf.data's autotuner put about half the epochs into a mode that ran
    # at half speed (seed arch, 20 epochs: 11 slow epochs with AUTOTUNE, none with this fixed pipeline).
    # The warp is cheap (tens of thousands of images/s on one thread), so one map thread and two
    # prefetched batches keep the model fed.
    options.autotune.enabled = False
    ds = ds.with_options(options)
    if augment.enabled:
        base = tf.constant([seed, epoch * 1_000_003 + shard], dtype=tf.int64)
        ds = ds.enumerate().map(
            lambda i, xy: (
                random_affine(tf.cast(xy[0], tf.float32), augment, base + tf.stack([i, i])),
                xy[1],
            ),
            num_parallel_calls=1,
        )
    else:
        ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y))
    return ds.prefetch(2)


def as_numpy_images(ds: tf.data.Dataset) -> np.ndarray:
    """All images of a (small) dataset as one array, for tests and plots."""
    return np.concatenate([x.numpy() for x, _ in ds])


def make_extra_dataset(
    images: np.ndarray,
    targets: np.ndarray,
    batch_size: int,
    *,
    augment: Augment = NO_AUGMENT,
    seed: int = 0,
    epoch: int = 0,
    shard: int = 0,
    num_shards: int = 1,
) -> tf.data.Dataset:
    """An endless stream of (float32 images [b, 28, 28, 1], int32 targets [b]) from arrays held in memory.

    For outlier exposure: ``images`` are rendered drawings, ``targets`` a class id or -1 for an unknown
    class. Each pass is a permutation seeded by (seed, epoch, pass); shard ``shard`` of ``num_shards``
    takes every ``num_shards``-th batch, as ``BitmapData.batches`` does.
    """
    n = len(images)
    if n < batch_size * num_shards:
        raise ValueError(f"{n} extra drawings are fewer than one batch of {batch_size} per shard")

    def gen():
        rounds = 0
        while True:
            perm = np.random.default_rng([seed, epoch, 7919, rounds]).permutation(n)
            for b in range(n // (batch_size * num_shards)):
                sl = perm[(b * num_shards + shard) * batch_size : (b * num_shards + shard + 1) * batch_size]
                yield images[sl], targets[sl].astype(np.int32)
            rounds += 1

    ds = tf.data.Dataset.from_generator(
        gen,
        output_signature=(
            tf.TensorSpec([None, BITMAP_SIDE, BITMAP_SIDE, 1], tf.uint8),
            tf.TensorSpec([None], tf.int32),
        ),
    )
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    options.autotune.enabled = False
    ds = ds.with_options(options)
    if augment.enabled:
        base = tf.constant([seed + 104729, epoch * 1_000_003 + shard], dtype=tf.int64)
        return ds.enumerate().map(
            lambda i, xy: (random_affine(tf.cast(xy[0], tf.float32), augment, base + tf.stack([i, i])), xy[1]),
            num_parallel_calls=1,
        )
    return ds.map(lambda x, y: (tf.cast(x, tf.float32), y))
