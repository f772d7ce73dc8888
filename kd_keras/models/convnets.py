"""Convolutional teachers and students (ResNet-50, EfficientNet-B3, ResNet-18, MobileNetV3-small,
ResNet8x3).
"""

from __future__ import annotations

import keras

from kd_keras import compat
from kd_keras.errors import KDError
from kd_keras.models.backbones import (
    check_weights_path,
    classifier_head,
    hub_backbone,
    keras_application,
    tiny_only_from_scratch,
    weights_failed,
)
from kd_keras.models.layers import ImagePreprocessing


def _tiny_resnet50(include_top, weights, input_tensor):
    """ResNet50's own code (bottleneck blocks, same layer names) at width 1/8, 1 block/stage."""
    resnet = compat.application_module("resnet")

    def stacks(x):
        x = resnet.stack_residual_blocks_v1(x, 8, 1, stride1=1, name="conv2")
        x = resnet.stack_residual_blocks_v1(x, 16, 1, name="conv3")
        x = resnet.stack_residual_blocks_v1(x, 32, 1, name="conv4")
        return resnet.stack_residual_blocks_v1(x, 64, 1, name="conv5")

    return resnet.ResNet(stacks, False, True, include_top=include_top, weights=weights,
                         input_tensor=input_tensor, name="resnet50_tiny")  # fmt: skip


def _tiny_efficientnet_b3(include_top, weights, input_tensor):
    """EfficientNet's own code (MBConv blocks, same layer names) at width and depth 1/4."""
    efficientnet = compat.application_module("efficientnet")

    return efficientnet.EfficientNet(
        0.25, 0.25, 32, include_top=include_top, weights=weights, input_tensor=input_tensor,
        name="efficientnet_b3_tiny",
    )  # fmt: skip


def resnet50(
    num_classes: int, image_size: int, weights: str = "none", tiny: bool = False, **_
) -> keras.Model:
    """ResNet50 (keras.applications, 23.6 M parameters with a 2-class head).

    Feature tap: the last `conv4_block*_out` (stride 16, 1024 channels). Preprocessing:
    caffe-style, as the keras.applications ImageNet weights expect. `tiny`: the same code at
    width 1/8 with one block per stage (tests and smoke runs).
    """
    if tiny:
        tiny_only_from_scratch("resnet50", weights, "teacher.weights")
    app = _tiny_resnet50 if tiny else keras.applications.ResNet50
    return keras_application(app, "resnet50", "caffe", num_classes, image_size, weights)


def efficientnet_b3(
    num_classes: int, image_size: int, weights: str = "none", tiny: bool = False, **_
) -> keras.Model:
    """EfficientNetB3 (keras.applications, 10.8 M parameters with a 2-class head).

    Feature tap: the output of stage 5 (`block5e_add`, stride 16, 136 channels). The
    application rescales and normalises [0, 255] pixels itself. `tiny`: the same code at width
    and depth 1/4 (tests and smoke runs).
    """
    if tiny:
        tiny_only_from_scratch("efficientnet_b3", weights, "teacher.weights")
    app = _tiny_efficientnet_b3 if tiny else keras.applications.EfficientNetB3
    return keras_application(app, "efficientnet_b3", "none", num_classes, image_size, weights)


RESNET18 = dict(input_conv_filters=[64], stackwise_num_filters=[64, 128, 256, 512],
                stackwise_num_blocks=[2, 2, 2, 2])  # fmt: skip


RESNET18_TINY = dict(input_conv_filters=[64], stackwise_num_filters=[64, 64, 64, 64],
                     stackwise_num_blocks=[1, 1, 1, 1])  # fmt: skip


def resnet18(
    num_classes: int,
    image_size: int,
    weights: str = "none",
    tiny: bool = False,
    weights_key: str = "student.weights",
    **_,
) -> keras.Model:
    """ResNet18 (keras-hub `ResNetBackbone`, basic blocks [2, 2, 2, 2], 11.2 M parameters).

    Feature tap: pyramid output P4, stride 16, 256 channels. ImageNet preset:
    `resnet_18_imagenet`. `tiny`: one block of 64 channels per stage (keras-hub needs 64 first).
    """
    import keras_hub

    if tiny:
        tiny_only_from_scratch("resnet18", weights, weights_key)
    backbone = hub_backbone(
        keras_hub.models.ResNetBackbone, "resnet_18_imagenet", weights, "resnet18", weights_key,
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
    return classifier_head(inputs, pooled, num_classes, name="resnet18", dropout=0.0)


def _mobilenet_v3_small(alpha: float):
    def app(include_top, weights, input_tensor):
        # [-1, 1] scaling is our ImagePreprocessing layer, not the application's own
        return keras.applications.MobileNetV3Small(
            alpha=alpha, include_top=include_top, weights=weights, input_tensor=input_tensor,
            include_preprocessing=False,
        )  # fmt: skip

    return app


def mobilenet_v3_small(
    num_classes: int,
    image_size: int,
    weights: str = "none",
    tiny: bool = False,
    weights_key: str = "student.weights",
    **_,
) -> keras.Model:
    """MobileNetV3-Small (keras.applications, alpha 1.0, squeeze-excite and hard-swish: the
    edge-sized student; 0.94 M parameters with a 2-class head, 1/25 of ResNet50).

    The head is global pooling, dropout 0.2 and one Dense layer: the application's own
    1024-wide last point-wise layer (0.59 M parameters) is left out. FLOPs at batch 1
    (2 x multiply-accumulates of the FP32 ONNX graph, `kd_keras.models.flops.onnx_flops`): 3.1 M at
    32 px, 9.8 M at 64 px, 110 M at 224 px (ResNet18: 74 M, 296 M and 3.63 G). Feature tap:
    `expanded_conv_7_add`, the output of the stride-16 stage (48 channels; 2x2 at 32 px, 4x4
    at 64 px, like the teachers' taps). Preprocessing: [-1, 1] (`"symmetric"`), as the
    ImageNet weights expect. `weights = "imagenet"` loads keras.applications' weights (any
    square size >= 32 px; they were trained at 224). Minimum image size 32 px: the stride-32
    stage is 1x1 there (its 5x5 depth-wise convolutions then see one pixel; 64 px gives it
    2x2). `tiny`: the same code at alpha 0.25.
    """
    if tiny:
        tiny_only_from_scratch("mobilenet_v3_small", weights, weights_key)
    return keras_application(
        _mobilenet_v3_small(0.25 if tiny else 1.0), "mobilenet_v3_small", "symmetric",
        num_classes, image_size, weights, key=weights_key,
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


def resnet8x3(
    num_classes: int,
    image_size: int,
    weights: str = "none",
    tiny: bool = False,
    weights_key: str = "student.weights",
    **_,
) -> keras.Model:
    """A narrow ResNet for small images (plain Keras layers; 0.69 M parameters with a 2-class
    head, 1/34 of ResNet50): the CIFAR ResNet8x4 of the distillation literature (CRD,
    mdistiller) at 3/4 width, with a stride-2 stem.

    A 3x3 stride-2 stem (32 channels), then one basic block per stage at 48, 96 and 192
    channels, strides 1, 2, 2: at 32 px the stages see 16x16, 8x8 and 4x4 maps (the CIFAR
    original's stride-1 stem would cost 4x the FLOPs for little at this data size); at 28 px
    14, 7, 4. FLOPs at batch 1 (as `kd_keras.models.flops.onnx_flops` counts them): 52 M at 32 px,
    2.5 G at 224 px — a student for 28-64 px images; for 224 px edge deployment use
    mobilenet_v3_small. Feature tap: the last stage's output (`narrow_stage3_out`, stride 8,
    192 channels, 4x4 at 32 px). Preprocessing: ImageNet mean/std. Minimum image size 16 px
    (last stage 2x2). No pretrained weights exist: `student.weights` is "none" or a
    `.weights.h5` file saved from this architecture. `tiny`: widths 8, 16, 32.
    """
    if tiny:
        tiny_only_from_scratch("resnet8x3", weights, weights_key)
    if weights == "imagenet":
        raise KDError(f'resnet8x3 has no ImageNet weights: set {weights_key} = "none" (or a '
                      '.weights.h5 file of this architecture)')  # fmt: skip
    check_weights_path(weights, weights_key)
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
    model = classifier_head(inputs, pooled, num_classes, name="resnet8x3", dropout=0.0)
    if weights != "none":
        try:
            model.load_weights(weights)
        except (ValueError, OSError, KeyError) as err:
            raise weights_failed("resnet8x3", weights, err, weights_key) from err
    return model
