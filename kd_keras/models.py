"""Model registry: teachers and students as Keras functional models.

Every model built here:
- takes raw RGB pixels in [0, 255], float32, NHWC at the configured image size (scaling and
  normalisation are layers inside the model, so saved and exported files need no preprocessing);
- outputs class logits (layer `logits`);
- has one named feature tap (`feature_tensor`) for feature matching, shaped (batch, h, w,
  channels). Token students expose their patch tokens re-shaped to their grid, so one adapter
  (1x1 conv + resize) serves every teacher/student pair. Taps are found by layer name, so they
  survive `.keras` save/load.
- DeiT students also carry `kd_cls_logits` (class token head, trained on labels) and
  `kd_dist_logits` (distillation token head, trained on the teacher); `logits` is their mean.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np

from kd_keras import compat
from kd_keras.errors import KDError

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


Builder = Callable[..., keras.Model]
TEACHERS: dict[str, Builder] = {}
STUDENTS: dict[str, Builder] = {}


def _register(registry: dict[str, Builder], name: str):
    def wrap(fn: Builder) -> Builder:
        registry[name] = fn
        return fn

    return wrap


def _lookup(registry: dict[str, Builder], kind: str, name: str) -> Builder:
    if name not in registry:
        raise KDError(f"unknown {kind} architecture {name!r}; valid: {', '.join(registry)}")
    return registry[name]


def _weights_failed(arch: str, weights: str, err: Exception, key: str) -> KDError:
    reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    if weights == "imagenet":
        return KDError(
            f"could not load ImageNet weights for {arch} ({reason}). Without internet, download "
            f"them on a connected machine and set {key} to the local file or preset folder, "
            f'or use {key} = "none" to train from scratch'
        )
    return KDError(f"could not load {key} = {weights!r} for {arch}: {reason}")


def _check_weights_path(weights: str, key: str) -> None:
    if weights not in ("none", "imagenet") and not Path(weights).exists():
        raise KDError(f"{key} file not found: {weights}")


def _classifier(inputs, pooled, num_classes: int, name: str, dropout: float = 0.2):
    x = keras.layers.Dropout(dropout, name="head_dropout")(pooled) if dropout else pooled
    # float32 under mixed precision too: losses and exported files see float32 logits
    logits = keras.layers.Dense(num_classes, name="logits", dtype="float32")(x)
    return keras.Model(inputs, logits, name=name)


def _keras_application(app, arch, prep_mode, num_classes, image_size, weights,
                       key="teacher.weights", dropout=0.2):  # fmt: skip
    _check_weights_path(weights, key)
    inputs = keras.Input((image_size, image_size, 3), name="images")
    x = ImagePreprocessing(prep_mode, name="preprocessing")(inputs)
    if weights == "none":
        base = app(include_top=False, weights=None, input_tensor=x)
    else:
        try:
            base = app(include_top=False, weights=weights, input_tensor=x)
        except Exception as err:  # download and file errors surface as many types
            raise _weights_failed(arch, weights, err, key) from err
    pooled = keras.layers.GlobalAveragePooling2D(name="avg_pool")(base.output)
    return _classifier(inputs, pooled, num_classes, name=arch, dropout=dropout)


def _tiny_only_from_scratch(arch: str, weights: str, key: str) -> None:
    if weights != "none":
        raise KDError(f'the tiny {arch} has no pretrained weights: set {key} = "none"')


def _tiny_resnet50(include_top, weights, input_tensor):
    """ResNet50's own code (bottleneck blocks, same layer names) at width 1/8, 1 block/stage."""
    from keras.src.applications import resnet

    def stacks(x):
        x = resnet.stack_residual_blocks_v1(x, 8, 1, stride1=1, name="conv2")
        x = resnet.stack_residual_blocks_v1(x, 16, 1, name="conv3")
        x = resnet.stack_residual_blocks_v1(x, 32, 1, name="conv4")
        return resnet.stack_residual_blocks_v1(x, 64, 1, name="conv5")

    return resnet.ResNet(stacks, False, True, include_top=include_top, weights=weights,
                         input_tensor=input_tensor, name="resnet50_tiny")  # fmt: skip


def _tiny_efficientnet_b3(include_top, weights, input_tensor):
    """EfficientNet's own code (MBConv blocks, same layer names) at width and depth 1/4."""
    from keras.src.applications import efficientnet

    return efficientnet.EfficientNet(
        0.25, 0.25, 32, include_top=include_top, weights=weights, input_tensor=input_tensor,
        name="efficientnet_b3_tiny",
    )  # fmt: skip


@_register(TEACHERS, "resnet50")
def resnet50(
    num_classes: int, image_size: int, weights: str = "none", tiny: bool = False, **_
) -> keras.Model:
    """ResNet50 (keras.applications, 23.6 M parameters with a 2-class head).

    Feature tap: the last `conv4_block*_out` (stride 16, 1024 channels). Preprocessing:
    caffe-style, as the keras.applications ImageNet weights expect. `tiny`: the same code at
    width 1/8 with one block per stage (tests and smoke runs).
    """
    if tiny:
        _tiny_only_from_scratch("resnet50", weights, "teacher.weights")
    app = _tiny_resnet50 if tiny else keras.applications.ResNet50
    return _keras_application(app, "resnet50", "caffe", num_classes, image_size, weights)


@_register(TEACHERS, "efficientnet_b3")
def efficientnet_b3(
    num_classes: int, image_size: int, weights: str = "none", tiny: bool = False, **_
) -> keras.Model:
    """EfficientNetB3 (keras.applications, 10.8 M parameters with a 2-class head).

    Feature tap: the output of stage 5 (`block5e_add`, stride 16, 136 channels). The
    application rescales and normalises [0, 255] pixels itself. `tiny`: the same code at width
    and depth 1/4 (tests and smoke runs).
    """
    if tiny:
        _tiny_only_from_scratch("efficientnet_b3", weights, "teacher.weights")
    app = _tiny_efficientnet_b3 if tiny else keras.applications.EfficientNetB3
    return _keras_application(app, "efficientnet_b3", "none", num_classes, image_size, weights)


def _hub_backbone(cls, preset: str, weights: str, arch: str, **config):
    import keras_hub  # noqa: F401  (registers keras-hub layers for loading)

    _check_weights_path(weights, "student.weights")
    if weights == "none":
        return cls(**config)
    # keep our layer name on presets too: feature taps find the backbone by name
    named = {"name": config["name"]} if "name" in config else {}
    try:
        return cls.from_preset(preset if weights == "imagenet" else weights, **named)
    except Exception as err:
        raise _weights_failed(arch, weights, err, "student.weights") from err


RESNET18 = dict(input_conv_filters=[64], stackwise_num_filters=[64, 128, 256, 512],
                stackwise_num_blocks=[2, 2, 2, 2])  # fmt: skip
RESNET18_TINY = dict(input_conv_filters=[64], stackwise_num_filters=[64, 64, 64, 64],
                     stackwise_num_blocks=[1, 1, 1, 1])  # fmt: skip


@_register(STUDENTS, "resnet18")
def resnet18(
    num_classes: int, image_size: int, weights: str = "none", tiny: bool = False, **_
) -> keras.Model:
    """ResNet18 (keras-hub `ResNetBackbone`, basic blocks [2, 2, 2, 2], 11.2 M parameters).

    Feature tap: pyramid output P4, stride 16, 256 channels. ImageNet preset:
    `resnet_18_imagenet`. `tiny`: one block of 64 channels per stage (keras-hub needs 64 first).
    """
    import keras_hub

    if tiny:
        _tiny_only_from_scratch("resnet18", weights, "student.weights")
    backbone = _hub_backbone(
        keras_hub.models.ResNetBackbone, "resnet_18_imagenet", weights, "resnet18",
        input_conv_kernel_sizes=[7], stackwise_num_strides=[1, 2, 2, 2],
        block_type="basic_block", image_shape=(None, None, 3),
        **(RESNET18_TINY if tiny else RESNET18),
    )  # fmt: skip
    taps = keras.Model(
        backbone.inputs, [backbone.pyramid_outputs["P4"], backbone.output], name="resnet18_backbone"
    )
    inputs = keras.Input((image_size, image_size, 3), name="images")
    x = ImagePreprocessing("imagenet", name="preprocessing")(inputs)
    _, top = taps(x)
    pooled = keras.layers.GlobalAveragePooling2D(name="avg_pool")(top)
    return _classifier(inputs, pooled, num_classes, name="resnet18", dropout=0.0)


def _mobilenet_v3_small(alpha: float):
    def app(include_top, weights, input_tensor):
        # [-1, 1] scaling is our ImagePreprocessing layer, not the application's own
        return keras.applications.MobileNetV3Small(
            alpha=alpha, include_top=include_top, weights=weights, input_tensor=input_tensor,
            include_preprocessing=False,
        )  # fmt: skip

    return app


@_register(STUDENTS, "mobilenet_v3_small")
def mobilenet_v3_small(
    num_classes: int, image_size: int, weights: str = "none", tiny: bool = False, **_
) -> keras.Model:
    """MobileNetV3-Small (keras.applications, alpha 1.0, squeeze-excite and hard-swish: the
    edge-sized student; 0.94 M parameters with a 2-class head, 1/25 of ResNet50).

    The head is global pooling, dropout 0.2 and one Dense layer: the application's own
    1024-wide last point-wise layer (0.59 M parameters) is left out. FLOPs at batch 1
    (2 x multiply-accumulates of the FP32 ONNX graph, `kd_keras.compute.onnx_flops`): 3.1 M at
    32 px, 9.8 M at 64 px, 110 M at 224 px (ResNet18: 74 M, 296 M and 3.63 G). Feature tap:
    `expanded_conv_7_add`, the output of the stride-16 stage (48 channels; 2x2 at 32 px, 4x4
    at 64 px, like the teachers' taps). Preprocessing: [-1, 1] (`"symmetric"`), as the
    ImageNet weights expect. `weights = "imagenet"` loads keras.applications' weights (any
    square size >= 32 px; they were trained at 224). Minimum image size 32 px: the stride-32
    stage is 1x1 there (its 5x5 depth-wise convolutions then see one pixel; 64 px gives it
    2x2). `tiny`: the same code at alpha 0.25.
    """
    if tiny:
        _tiny_only_from_scratch("mobilenet_v3_small", weights, "student.weights")
    return _keras_application(
        _mobilenet_v3_small(0.25 if tiny else 1.0), "mobilenet_v3_small", "symmetric",
        num_classes, image_size, weights, key="student.weights",
    )  # fmt: skip


RESNET8X3 = dict(stem=32, widths=(48, 96, 192))
RESNET8X3_TINY = dict(stem=8, widths=(8, 16, 32))


def _basic_block(x, filters: int, stride: int, name: str):
    """ResNet's basic block (two 3x3 convolutions, batch norm, identity or 1x1 projection)."""
    layers = keras.layers
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False,
                                 name=f"{name}_proj_conv")(x)  # fmt: skip
        shortcut = layers.BatchNormalization(epsilon=1e-5, name=f"{name}_proj_bn")(shortcut)
    y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                      name=f"{name}_conv1")(x)  # fmt: skip
    y = layers.BatchNormalization(epsilon=1e-5, name=f"{name}_bn1")(y)
    y = layers.ReLU(name=f"{name}_relu1")(y)
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(y)
    y = layers.BatchNormalization(epsilon=1e-5, name=f"{name}_bn2")(y)
    y = layers.Add(name=f"{name}_add")([shortcut, y])
    return layers.ReLU(name=f"{name}_out")(y)


@_register(STUDENTS, "resnet8x3")
def resnet8x3(
    num_classes: int, image_size: int, weights: str = "none", tiny: bool = False, **_
) -> keras.Model:
    """A narrow ResNet for small images (plain Keras layers; 0.69 M parameters with a 2-class
    head, 1/34 of ResNet50): the CIFAR ResNet8x4 of the distillation literature (CRD,
    mdistiller) at 3/4 width, with a stride-2 stem.

    A 3x3 stride-2 stem (32 channels), then one basic block per stage at 48, 96 and 192
    channels, strides 1, 2, 2: at 32 px the stages see 16x16, 8x8 and 4x4 maps (the CIFAR
    original's stride-1 stem would cost 4x the FLOPs for little at this data size); at 28 px
    14, 7, 4. FLOPs at batch 1 (as `kd_keras.compute.onnx_flops` counts them): 52 M at 32 px,
    2.5 G at 224 px — a student for 28-64 px images; for 224 px edge deployment use
    mobilenet_v3_small. Feature tap: the last stage's output (`narrow_stage3_out`, stride 8,
    192 channels, 4x4 at 32 px). Preprocessing: ImageNet mean/std. Minimum image size 16 px
    (last stage 2x2). No pretrained weights exist: `student.weights` is "none" or a
    `.weights.h5` file saved from this architecture. `tiny`: widths 8, 16, 32.
    """
    if tiny:
        _tiny_only_from_scratch("resnet8x3", weights, "student.weights")
    if weights == "imagenet":
        raise KDError('resnet8x3 has no ImageNet weights: set student.weights = "none" (or a '
                      '.weights.h5 file of this architecture)')  # fmt: skip
    _check_weights_path(weights, "student.weights")
    spec = RESNET8X3_TINY if tiny else RESNET8X3
    layers = keras.layers
    inputs = keras.Input((image_size, image_size, 3), name="images")
    x = ImagePreprocessing("imagenet", name="preprocessing")(inputs)
    x = layers.Conv2D(spec["stem"], 3, strides=2, padding="same", use_bias=False,
                      name="stem_conv")(x)  # fmt: skip
    x = layers.BatchNormalization(epsilon=1e-5, name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for i, (width, stride) in enumerate(zip(spec["widths"], (1, 2, 2)), start=1):
        x = _basic_block(x, width, stride, name=f"narrow_stage{i}")
    pooled = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    model = _classifier(inputs, pooled, num_classes, name="resnet8x3", dropout=0.0)
    if weights != "none":
        try:
            model.load_weights(weights)
        except (ValueError, OSError, KeyError) as err:
            raise _weights_failed("resnet8x3", weights, err, "student.weights") from err
    return model


VIT_SMALL = dict(num_layers=12, num_heads=6, hidden_dim=384, mlp_dim=1536)
VIT_TINY = dict(num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)


@_register(STUDENTS, "vit_small")
def vit_small(
    num_classes: int, image_size: int, weights: str = "none", patch_size: int = 16,
    tiny: bool = False, **_,
) -> keras.Model:  # fmt: skip
    """ViT-small (keras-hub `ViTBackbone`: width 384, depth 12, 6 heads, MLP 1536; 21.7 M).

    `patch_size` is configurable so small images still make enough tokens (64 px / patch 8 =
    64 tokens). Head on the class token. Feature tap: the patch tokens (class token dropped)
    re-shaped to their (image_size / patch_size) square grid, 384 channels, so CNN-to-token
    feature matching compares spatial maps, with no pooling. `tiny`: 2 blocks, width 32.
    """
    import keras_hub

    if tiny:
        _tiny_only_from_scratch("vit_small", weights, "student.weights")
    if weights == "imagenet":
        raise KDError(
            'keras-hub has no ImageNet preset for vit_small; use student.arch = "deit_small" '
            'with student.weights = "imagenet", or a local preset folder'
        )
    backbone = _hub_backbone(
        keras_hub.models.ViTBackbone, "", weights, "vit_small",
        image_shape=(image_size, image_size, 3), patch_size=patch_size,
        **(VIT_TINY if tiny else VIT_SMALL),
        name="vit_backbone",
    )  # fmt: skip
    inputs = keras.Input((image_size, image_size, 3), name="images")
    tokens = backbone(ImagePreprocessing("imagenet", name="preprocessing")(inputs))
    pooled = TokenSelect(0, name="class_token")(tokens)
    return _classifier(inputs, pooled, num_classes, name="vit_small", dropout=0.0)


DEIT_SMALL = dict(num_layers=12, num_heads=6, hidden_dim=384, intermediate_dim=1536)
DEIT_TINY = dict(num_layers=2, num_heads=2, hidden_dim=32, intermediate_dim=64)
DEIT_SMALL_PRESET = "deit_small_distilled_patch16_224_imagenet"


@_register(STUDENTS, "deit_small")
def deit_small(
    num_classes: int, image_size: int, weights: str = "none", patch_size: int = 16,
    tiny: bool = False, **_,
) -> keras.Model:  # fmt: skip
    """DeiT-small with a distillation token (keras-hub `DeiTBackbone`: width 384, depth 12,
    6 heads, MLP 1536; 21.7 M parameters).

    The backbone's sequence is [class token, distillation token, patches]. Two heads: Dense
    `kd_cls_logits` on the class token (trained on labels) and Dense `kd_dist_logits` on the
    distillation token (trained on the teacher, soft or hard); the output `logits` is their
    mean, as in DeiT at inference. Feature tap: the patch tokens (both leading tokens dropped)
    re-shaped to their (image_size / patch_size) square grid, 384 channels, so CNN-to-token
    feature matching compares spatial maps, with no pooling.

    `weights = "imagenet"` loads the keras-hub preset `deit_small_distilled_patch16_224_imagenet`
    (224 px, patch 16 only: its position embeddings fix the grid); a local preset folder must
    match `image_size` and `patch_size` likewise. `tiny`: 2 blocks, width 32.
    """
    import keras_hub

    if tiny:
        _tiny_only_from_scratch("deit_small", weights, "student.weights")
    if weights == "imagenet" and (image_size, patch_size) != (224, 16):
        raise KDError(
            f"the ImageNet DeiT-small preset needs data.image_size = 224 and "
            f"student.patch_size = 16 (got {image_size} and {patch_size}); use "
            'student.weights = "none" at other sizes'
        )
    backbone = _hub_backbone(
        keras_hub.models.DeiTBackbone, DEIT_SMALL_PRESET, weights, "deit_small",
        image_shape=(image_size, image_size, 3), patch_size=patch_size,
        **(DEIT_TINY if tiny else DEIT_SMALL),
        name="deit_backbone",
    )  # fmt: skip
    got = (tuple(backbone.image_shape[:2]), tuple(backbone.patch_size))
    if got != ((image_size, image_size), (patch_size, patch_size)):
        raise KDError(
            f"student.weights = {weights!r} is a DeiT for {got[0][0]} px images with patch "
            f"{got[1][0]}, but data.image_size = {image_size} and student.patch_size = "
            f"{patch_size}"
        )
    inputs = keras.Input((image_size, image_size, 3), name="images")
    tokens = backbone(ImagePreprocessing("imagenet", name="preprocessing")(inputs))
    cls_logits = keras.layers.Dense(num_classes, name=CLS_LOGITS_LAYER, dtype="float32")(
        TokenSelect(0, name="class_token")(tokens)
    )
    dist_logits = keras.layers.Dense(num_classes, name=DIST_LOGITS_LAYER, dtype="float32")(
        TokenSelect(1, name="distillation_token")(tokens)
    )
    logits = keras.layers.Average(name="logits", dtype="float32")([cls_logits, dist_logits])
    return keras.Model(inputs, logits, name="deit_small")


def load_model(path: str | Path, what: str = "model") -> keras.Model:
    """Load a `.keras` file, always in Keras's safe mode, with a clear error when it is missing,
    unreadable, or would need unsafe loading (a `Lambda` layer's Python code, Keras's own
    `TFSMLayer`): such a file is refused, never run. A teacher view around a SavedModel holds
    `kd_keras.teacher.SavedModelTeacher`, which loads only a SavedModel the run checked."""
    import zipfile

    import keras_hub  # noqa: F401  (registers keras-hub layers)

    import kd_keras.ensemble  # noqa: F401  (registers the layers kd_keras writes)
    import kd_keras.teacher  # noqa: F401

    path = Path(path)
    if not path.is_file():
        raise KDError(f"{what} file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise KDError(f"{what} file {path} could not be loaded: it is not a .keras archive "
                      "(corrupt, truncated or another format)")  # fmt: skip
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as err:  # Keras reports unreadable files with many exception types
        ours = _kd_error_in(err)
        if ours is not None:  # raised by a kd_keras layer while loading: already one line
            raise KDError(f"{what} file {path}: {ours}") from err
        unsafe = re.search(r"deserialization of an? `(\w+)`", str(err))
        if unsafe:
            raise KDError(
                f"{what} file {path} holds a {unsafe.group(1)} layer, which would run code from "
                "the file: kd_keras loads models only in Keras's safe mode. Rebuild the model "
                "without it (a registered layer with get_config instead of a Lambda), or as a "
                "SavedModel folder named by teacher.path"
            ) from err
        missing = re.search(r"Could not locate (?:class|function) '([^']+)'", str(err))
        if missing:
            raise KDError(
                f"{what} file {path} needs the custom class {missing.group(1)!r}, which is not "
                "registered: import the module that defines it (decorated with "
                "@keras.saving.register_keras_serializable()) before loading"
            ) from err
        reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise KDError(f"{what} file {path} could not be loaded: {reason}") from err


def _kd_error_in(err: BaseException) -> KDError | None:
    """The KDError that caused `err` (Keras wraps errors raised while deserialising)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KDError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def build_teacher(
    arch: str, num_classes: int, image_size: int, weights: str = "none", tiny: bool = False
) -> keras.Model:
    """A registered teacher architecture (`tiny`: its small variant, for tests/smoke runs)."""
    return _lookup(TEACHERS, "teacher", arch)(num_classes, image_size, weights=weights, tiny=tiny)


def build_student(
    arch: str, num_classes: int, image_size: int, weights: str = "none", patch_size: int = 16,
    tiny: bool = False,
) -> keras.Model:  # fmt: skip
    """A registered student architecture (`tiny`: its small variant, for tests/smoke runs)."""
    return _lookup(STUDENTS, "student", arch)(
        num_classes, image_size, weights=weights, patch_size=patch_size, tiny=tiny
    )


# Feature taps of the registered architectures, tried in order: (layer-name pattern, output
# index of a nested model, leading tokens to drop before re-shaping a token sequence to its grid;
# None = already a feature map). The last layer matching a pattern is the tap, so deeper or
# shallower variants of a family (ResNet101, a tiny EfficientNet) find their own stage output.
# `kd_taps` is the [feature, logits] model inside a teacher view (kd_keras.teacher).
FEATURE_TAPS = (
    (r"kd_taps", 0, None),  # a user's teacher wrapped by kd_keras.teacher.teacher_view
    (r"conv4_block\d+_out", None, None),  # resnet50 (conv4_block6_out), stride 16
    (r"block5[a-z]+_.*", None, None),  # efficientnet_b3 stage 5 output (block5e_add), stride 16
    (r"resnet18_backbone", 0, None),  # resnet18 P4, stride 16
    (r"expanded_conv_7_add", None, None),  # mobilenet_v3_small stride-16 stage output
    (r"narrow_stage3_out", None, None),  # resnet8x3 last stage, stride 8
    (r"vit_backbone", None, 1),  # vit_small: class token + patches
    (r"deit_backbone", None, 2),  # deit_small: class + distillation tokens + patches
)


# graph nodes that training views (kd_keras.matmul_conv) added to a model's shared layers:
# graph surgery on the model itself (feature taps) must not follow them into a view's graph
VIEW_NODES: weakref.WeakSet = weakref.WeakSet()


def _graph_output(layer: keras.layers.Layer):
    """The layer's output inside the enclosing model's graph (not a nested model's own)."""
    nodes = [node for node in compat.inbound_nodes(layer) if node not in VIEW_NODES]
    outputs = nodes[-1].output_tensors if nodes else layer.output
    return outputs[0] if isinstance(outputs, (list, tuple)) and len(outputs) == 1 else outputs


def model_output(model: keras.Model):
    """The single output tensor of a classifier, also when Keras gives it as a one-element list
    (common for `.keras` files of functional models)."""
    outputs = model.outputs
    if len(outputs) != 1:
        raise KDError(f"model {model.name!r} has {len(outputs)} outputs; a classifier needs one")
    return outputs[0]


def _graph(model: keras.Model):
    """The functional graph behind a model (a Sequential keeps one inside)."""
    return getattr(model, "_functional", None) or model


def _is_spatial(tensor, image_channels: int = 3) -> bool:
    shape = tuple(tensor.shape) if hasattr(tensor, "shape") else ()
    return len(shape) == 4 and shape[-1] not in (None, image_channels)


def tap_candidates(model: keras.Model, prefix: str = "") -> list[str]:
    """Names (dotted through nested models) of the layers with a spatial (4-D) output."""
    names = []
    for layer in _graph(model).layers:
        if isinstance(layer, keras.Model) and hasattr(_graph(layer), "_run_through_graph"):
            names += tap_candidates(layer, f"{prefix}{layer.name}.")
        try:
            out = _graph_output(layer)
        except (AttributeError, IndexError, ValueError):
            continue
        if not isinstance(out, (list, tuple, dict)) and _is_spatial(out):
            names.append(prefix + layer.name)
    return names


def _split_path(model: keras.Model, path: str, full: str) -> tuple[str, str | None]:
    """(first layer name, rest) of a dotted path; layer names may contain dots themselves
    ("mobilenetv2_1.00_224"), so the longest matching layer name wins."""
    names = [layer.name for layer in _graph(model).layers]
    matches = [n for n in names if path == n or path.startswith(n + ".")]
    if not matches:
        shown = ", ".join(tap_candidates(model)[-12:]) or "none"
        raise KDError(
            f"feature layer {full!r} not found in model {model.name!r}; layers with a spatial "
            f"output (last 12): {shown}"
        )
    name = max(matches, key=len)
    return name, (path[len(name) + 1 :] or None)


def _tap_through(model: keras.Model, name: str, rest: str, full: str, inputs):
    """Re-run `model`'s graph on `inputs`, replacing its nested model `name` by one that also
    returns the inner layer `rest`: (feature, model output), in one pass."""
    sub = _graph(model).get_layer(name)
    if not isinstance(sub, keras.Model):
        raise KDError(f"feature layer {full!r}: {name!r} is not a nested model")
    inner_feature, inner_out = _tap(sub, rest, full)
    taps = keras.Model(sub.inputs, [inner_feature, inner_out], name=f"{sub.name}_taps")
    captured = {}

    def operation(op):
        if op is not sub:
            return op

        def run(*args, **kwargs):
            feature, out = taps(*args, **kwargs)
            captured["feature"] = feature
            return out

        return run

    out = _graph(model)._run_through_graph(inputs, operation_fn=operation)
    out = out[0] if isinstance(out, (list, tuple)) else out
    return captured["feature"], out


def _tap(model: keras.Model, path: str, full: str):
    """(feature, output) of `model` on its own inputs for a dotted layer path."""
    name, rest = _split_path(model, path, full)
    if rest is None:
        return _graph_output(_graph(model).get_layer(name)), model_output(model)
    return _tap_through(model, name, rest, full, model.inputs)


def feature_and_logits(model: keras.Model, layer: str | None = None):
    """Symbolic (feature map (batch, h, w, c), logits) of `model`, on `model.inputs`.

    `layer` names the tap (dotted through nested models: `"resnet50.conv4_block6_out"`); else
    the registered architectures' taps (`FEATURE_TAPS`), else the last layer with a spatial
    output, nested models included. A model with no spatial feature map (one that only outputs
    logits) raises `KDError`: distil its logits only (`distill.beta = 0`).
    """
    if layer:
        feature, logits = _tap(model, layer, layer)
        if not _is_spatial(feature, image_channels=-1):
            raise KDError(f"feature layer {layer!r} of {model.name!r} is not a (batch, h, w, c) "
                          f"map (shape {tuple(feature.shape)})")  # fmt: skip
        return feature, logits
    graph = _graph(model)
    for pattern, index, skip in FEATURE_TAPS:
        matches = [lay for lay in graph.layers if re.fullmatch(pattern, lay.name)]
        if not matches:
            continue
        name = matches[-1].name
        out = _graph_output(matches[-1])
        if index is not None:
            out = out[index]
        if skip is not None:
            grid = int(round((out.shape[1] - skip) ** 0.5))
            out = TokenGrid(skip=skip, grid=grid, name=f"{name}_grid")(out)
        return out, model_output(model)
    candidates = tap_candidates(model)
    if candidates:
        return _tap(model, candidates[-1], candidates[-1])
    raise KDError(
        f"model {model.name!r} has no spatial feature map to match (it may output logits only); "
        "set distill.beta = 0 to distil its logits only, or name a layer in "
        "teacher.feature_layer / student.feature_layer"
    )


def feature_tensor(model: keras.Model, layer: str | None = None):
    """Symbolic feature map (batch, h, w, c) of `model` used for feature matching."""
    return feature_and_logits(model, layer)[0]


def feature_extractor(model: keras.Model, layer: str | None = None) -> keras.Model:
    """A model sharing `model`'s weights that returns [feature map, logits]."""
    feature, logits = feature_and_logits(model, layer)
    return keras.Model(model.inputs, [feature, logits], name=f"{model.name}_fx")


def all_layers(model) -> list:
    """Every layer of `model`, nested models' layers included (depth first, outer first)."""
    layers = []
    for layer in getattr(model, "layers", []):
        layers.append(layer)
        if isinstance(layer, keras.Model):
            layers += all_layers(layer)
    return layers


def resize_images(images, size: tuple[int, int]):
    """`images` (batch, h, w, c) resized to `size` (height, width), bilinear and antialiased:
    how every model is shown a batch at its own input size (Distiller, teacher ensembles)."""
    return keras.ops.image.resize(images, size, interpolation="bilinear", antialias=True)


def set_batchnorm_momentum(model: keras.Model, momentum: float) -> int:
    """Set the moving-statistics momentum of every BatchNormalization layer of `model` (nested
    models included); returns how many. Keras's default, 0.99, averages over ~100 steps: over a
    short CPU schedule the inference-mode statistics lag the weights (an EfficientNetB3 trained
    5 epochs at 32 px predicted one class at the default rule; re-estimating its statistics
    raised validation balanced accuracy at 0.5 from 0.500 to 0.871)."""
    layers = [lay for lay in all_layers(model) if isinstance(lay, keras.layers.BatchNormalization)]
    for layer in layers:
        layer.momentum = float(momentum)
    return len(layers)


def has_layer(model: keras.Model, name: str) -> bool:
    """Whether `model` has a (top-level) layer called `name`."""
    return any(layer.name == name for layer in model.layers)


def image_size_of(model: keras.Model) -> int:
    """The fixed square input size of `model`."""
    shape = model.inputs[0].shape
    if shape[1] is None:
        raise KDError(f"model {model.name!r} has no fixed input size")
    return int(shape[1])
