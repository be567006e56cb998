"""Model architectures: ``seed`` (the starting point, fixed to train) and ``qdnet`` (the default).

Every model takes float32 images 0..255 shaped [b, 28, 28, 1] and returns logits; it scales its input
itself, so the serving signature and the training pipeline cannot disagree about scaling. Softmax
is applied in the serving signature; training uses the numerically stable loss on logits.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
from keras import layers

import trainer
from doodle.contract import INPUT_KEY, INPUT_SHAPE


def seed(num_classes: int) -> keras.Model:
    """The starting point's layers: 3x3 convs of 16/32/64, each ReLU + 2x2 max-pool, dense 1024, dropout.

    Its original bugs are fixed, nothing else: the input is scaled to 0..1 and the loss is computed
    from logits (it used ``-sum(y * log(softmax))`` on raw 0..255 pixels and diverged).
    """
    inputs = keras.Input(INPUT_SHAPE[1:], name=INPUT_KEY)
    x = layers.Rescaling(1.0 / 255.0)(inputs)
    for filters in (16, 32, 64):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(1024, activation="relu")(x)
    x = layers.Dropout(0.5)(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="seed")


def _conv_bn(x: keras.KerasTensor, filters: int) -> keras.KerasTensor:
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
    # Momentum 0.9, not Keras' 0.99: with ~200 steps an epoch the moving statistics must forget their
    # initial values (variance 1.0, far above the true ~0.003 of the first layer) within an epoch, or
    # validation in the first epochs measures stale statistics rather than the weights.
    x = layers.BatchNormalization(momentum=0.9)(x)
    return layers.ReLU()(x)


def qdnet(num_classes: int, width: int = 32, dropout: float = 0.3) -> keras.Model:
    """A small VGG-style network with batch norm: 3 stages of two 3x3 convs (w, 2w, 4w filters).

    Global average pooling keeps the parameter count low (about 0.33M at width 32) and the
    serving latency small; augmentation in the pipeline does the regularising.
    """
    inputs = keras.Input(INPUT_SHAPE[1:], name=INPUT_KEY)
    x = layers.Rescaling(1.0 / 255.0)(inputs)
    for stage, filters in enumerate((width, 2 * width, 4 * width)):
        x = _conv_bn(x, filters)
        x = _conv_bn(x, filters)
        if stage < 2:
            x = layers.MaxPooling2D(2)(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dense(8 * width, activation="relu")(x)
    x = layers.Dropout(dropout)(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="qdnet")


#: Test-time views, by name: each is an image -> image transform averaged over at inference.
TTA_VIEWS = ("flip", "zoom0.9", "zoom1.1")
TTA_CHOICES: dict[str, tuple[str, ...]] = {"none": (), "flip": ("flip",), "flip-zoom": TTA_VIEWS}


def _view(images: keras.KerasTensor, name: str) -> keras.KerasTensor:
    import tensorflow as tf

    if name == "flip":
        return keras.ops.flip(images, axis=2)
    if name.startswith("zoom"):
        side = int(28 * float(name.removeprefix("zoom")))
        resized = tf.image.resize(images, [side, side], antialias=True)
        return tf.image.resize_with_crop_or_pad(resized, 28, 28)
    raise ValueError(f"unknown test-time view {name!r}")


class TestTimeAugment(keras.Model):
    """Test-time augmentation: the mean of a model's logits over the image and a few views of it.

    The views (mirror, 10% smaller, 10% larger) are inside the training augmentation's range, so each
    is in-distribution; averaging them is a cheap ensemble. It multiplies inference work by the number
    of views, which batching absorbs.
    """

    def __init__(self, inner: keras.Model, views: tuple[str, ...] = TTA_VIEWS, **kwargs: object) -> None:
        super().__init__(name=f"{inner.name}_tta", **kwargs)
        self.inner = inner
        self.views = tuple(views)

    def call(self, images: keras.KerasTensor, training: bool = False) -> keras.KerasTensor:
        """Average the logits of every view."""
        total = self.inner(images, training=training)
        for name in self.views:
            total = total + self.inner(_view(images, name), training=training)
        return total / float(1 + len(self.views))


def for_inference(model: keras.Model, views: tuple[str, ...]) -> keras.Model:
    """The model as served: the trained model itself, or wrapped in test-time augmentation."""
    return TestTimeAugment(model, views) if views else model


def as_float32(model: keras.Model, num_classes: int, arch: str) -> keras.Model:
    """A float32 copy of a model trained under a mixed-precision policy, for export.

    The weights of a mixed-precision model are float32 already; only the compute dtype differs, and
    a float32 graph serves on every CPU and GPU.
    """
    if model.dtype_policy.name == "float32":
        return model
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        clone = ARCHITECTURES[arch](num_classes)
    finally:
        keras.config.set_dtype_policy(previous)
    clone.set_weights(model.get_weights())
    return clone


ARCHITECTURES: dict[str, Callable[[int], keras.Model]] = {"qdnet": qdnet, "seed": seed}
DEFAULT_ARCH = trainer.DEFAULT_ARCH
assert tuple(sorted(ARCHITECTURES)) == tuple(sorted(trainer.ARCH_NAMES)), "keep trainer.ARCH_NAMES in step"
