"""Building blocks shared by the convolutional and transformer architectures: classifier heads,
pretrained-weight checks, keras-hub backbones.
"""

from __future__ import annotations

from pathlib import Path

import keras

from kd_keras.errors import KDError
from kd_keras.io import is_download_error
from kd_keras.models.layers import ImagePreprocessing


def weights_failed(arch: str, weights: str, err: Exception, key: str) -> KDError:
    reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    if weights == "imagenet":
        return KDError(
            f"could not load ImageNet weights for {arch} ({reason}). Without internet, download "
            f"them on a connected machine and set {key} to the local file or preset folder, "
            f'or use {key} = "none" to train from scratch'
        )
    return KDError(f"could not load {key} = {weights!r} for {arch}: {reason}")


def preset_errors() -> tuple[type[Exception], ...]:
    """What keras-hub's `from_preset` raises for a preset it cannot find, download or read
    (keras_hub/src/utils/preset_utils.py, tried offline and on broken folders): ValueError (an
    unknown name, no config.json, bad JSON), OSError (requests' and huggingface_hub's network
    errors, FileNotFoundError) and kagglehub's own errors (credentials, backend, not found),
    which derive from Exception only."""
    try:
        from kagglehub import exceptions as kaggle
    except ImportError:  # keras-hub without kagglehub: Kaggle presets cannot be downloaded
        return (ValueError, OSError)
    return (ValueError, OSError, kaggle.CredentialError, kaggle.KaggleEnvironmentError,
            kaggle.BackendError, kaggle.NotFoundError, kaggle.DataCorruptionError,
            kaggle.UnauthenticatedError)  # fmt: skip


def check_weights_path(weights: str, key: str) -> None:
    if weights not in ("none", "imagenet") and not Path(weights).exists():
        raise KDError(f"{key} file not found: {weights}")


def classifier_head(inputs, pooled, num_classes: int, name: str, dropout: float = 0.2):
    x = keras.layers.Dropout(dropout, name="head_dropout")(pooled) if dropout else pooled
    # float32 under mixed precision too: losses and exported files see float32 logits
    logits = keras.layers.Dense(num_classes, name="logits", dtype="float32")(x)
    return keras.Model(inputs, logits, name=name)


def keras_application(app, arch, prep_mode, num_classes, image_size, weights,
                       key="teacher.weights", dropout=0.2):  # fmt: skip
    check_weights_path(weights, key)
    inputs = keras.Input((image_size, image_size, 3), name="images")
    x = ImagePreprocessing(prep_mode, name="preprocessing")(inputs)
    if weights == "none":
        base = app(include_top=False, weights=None, input_tensor=x)
    else:
        try:
            base = app(include_top=False, weights=weights, input_tensor=x)
        except Exception as err:
            # a failed download (keras.utils.get_file) or a local file Keras cannot read
            # (OSError from h5py, ValueError for another format or other layers); else a bug
            if not is_download_error(err):
                raise
            raise weights_failed(arch, weights, err, key) from err
    pooled = keras.layers.GlobalAveragePooling2D(name="avg_pool")(base.output)
    return classifier_head(inputs, pooled, num_classes, name=arch, dropout=dropout)


def tiny_only_from_scratch(arch: str, weights: str, key: str) -> None:
    if weights != "none":
        raise KDError(f'the tiny {arch} has no pretrained weights: set {key} = "none"')


def hub_backbone(cls, preset: str, weights: str, arch: str, key: str, **config):
    import keras_hub  # noqa: F401  (registers keras-hub layers for loading)

    check_weights_path(weights, key)
    if weights == "none":
        return cls(**config)
    # keep our layer name on presets too: feature taps find the backbone by name
    named = {"name": config["name"]} if "name" in config else {}
    try:
        return cls.from_preset(preset if weights == "imagenet" else weights, **named)
    except preset_errors() as err:
        raise weights_failed(arch, weights, err, key) from err
