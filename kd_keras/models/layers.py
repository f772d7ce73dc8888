"""Custom Keras layers that saved model files reference (registered under the package name
"kd_keras", so files saved by any kd_keras version load).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

CLS_LOGITS_LAYER = "kd_cls_logits"
DIST_LOGITS_LAYER = "kd_dist_logits"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="kd_keras")
class ImagePreprocessing(keras.layers.Layer):
    """Turns raw RGB pixels in [0, 255] into what a backbone expects.

    Args:
        mode: `"imagenet"` scales to [0, 1] and normalises with ImageNet mean/std (torch/timm and
            keras-hub presets); `"caffe"` flips RGB to BGR and subtracts the ImageNet pixel mean
            (keras.applications ResNet50 weights); `"unit"` scales to [0, 1]; `"symmetric"`
            scales to [-1, 1] (MobileNet, Inception, ResNetV2 style); `"none"` passes pixels
            through (models such as keras.applications EfficientNet normalise internally).

    Example:
        >>> ImagePreprocessing("imagenet")(np.full((1, 4, 4, 3), 255.0)).shape
        TensorShape([1, 4, 4, 3])
    """

    MODES = ("imagenet", "caffe", "unit", "symmetric", "none")

    def __init__(self, mode: str = "imagenet", **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode

    def call(self, x):
        x = keras.ops.cast(x, "float32")
        if self.mode == "imagenet":
            mean = np.asarray(IMAGENET_MEAN, "float32")
            std = np.asarray(IMAGENET_STD, "float32")
            return (x / 255.0 - mean) / std
        if self.mode == "caffe":
            return keras.ops.flip(x, axis=-1) - np.asarray(CAFFE_MEAN_BGR, "float32")
        if self.mode == "unit":
            return x / 255.0
        if self.mode == "symmetric":
            return x / 127.5 - 1.0
        return x

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="kd_keras")
class TokenSelect(keras.layers.Layer):
    """Picks one token from a (batch, tokens, dim) sequence: (batch, dim)."""

    def __init__(self, index: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.index = index

    def call(self, x):
        return x[:, self.index]

    def get_config(self):
        return {**super().get_config(), "index": self.index}


@keras.saving.register_keras_serializable(package="kd_keras")
class TokenGrid(keras.layers.Layer):
    """Drops the first `skip` (class/distillation) tokens and reshapes the patch tokens to their
    spatial grid: (batch, skip + g*g, dim) -> (batch, g, g, dim)."""

    def __init__(self, skip: int = 1, grid: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.skip = skip
        self.grid = grid

    def call(self, x):
        x = x[:, self.skip :]
        return keras.ops.reshape(x, (-1, self.grid, self.grid, x.shape[-1]))

    def get_config(self):
        return {**super().get_config(), "skip": self.skip, "grid": self.grid}


@keras.saving.register_keras_serializable(package="kd_keras")
class EnsembleLogits(keras.layers.Layer):
    """T * log(mean_i softmax(z_i / T)): logits whose softmax at temperature T is the mean of the
    members' softmaxes at T.

    Args:
        temperature: T > 0 (1 for the ensemble's own predictions).
    """

    def __init__(self, temperature: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)

    def call(self, member_logits):
        z = ops.stack([ops.cast(v, "float32") for v in member_logits], axis=0) / self.temperature
        log_p = z - ops.logsumexp(z, axis=-1, keepdims=True)
        mean_log_p = ops.logsumexp(log_p, axis=0) - ops.log(float(len(member_logits)))
        return self.temperature * mean_log_p

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}


@keras.saving.register_keras_serializable(package="kd_keras")
class ResizeImages(keras.layers.Layer):
    """Bilinear, antialiased resize to `size` x `size` (what the Distiller does per model).

    A plain layer: Keras's `Resizing` preprocessing layer makes a functional model called
    without `training` run its batch norms in training mode (measured with Keras 3.15)."""

    def __init__(self, size: int, **kwargs):
        super().__init__(**kwargs)
        self.size = int(size)

    def call(self, images):
        return resize_images(images, (self.size, self.size))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.size, self.size, input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "size": self.size}


@keras.saving.register_keras_serializable(package="kd_keras")
class ProbabilitiesToLogits(keras.layers.Layer):
    """log(p): logits of a model that outputs probabilities (softmax(log p) = p)."""

    def call(self, p):
        return keras.ops.log(keras.ops.maximum(keras.ops.cast(p, "float32"), 1e-12))


@keras.saving.register_keras_serializable(package="kd_keras")
class SelectClasses(keras.layers.Layer):
    """Re-orders the last axis: output class i is input column `order[i]`."""

    def __init__(self, order: list[int], **kwargs):
        super().__init__(**kwargs)
        self.order = [int(i) for i in order]

    def call(self, x):
        return keras.ops.take(x, np.asarray(self.order, "int32"), axis=-1)

    def get_config(self):
        return {**super().get_config(), "order": self.order}


def resize_images(images, size: tuple[int, int]):
    """`images` (batch, h, w, c) resized to `size` (height, width), bilinear and antialiased:
    how every model is shown a batch at its own input size (Distiller, teacher ensembles)."""
    return keras.ops.image.resize(images, size, interpolation="bilinear", antialias=True)
