"""Vision-transformer students (ViT-small, DeiT-small) from keras-hub backbones."""

from __future__ import annotations

import keras

from kd_keras.errors import KDError
from kd_keras.models.backbones import classifier_head, hub_backbone, tiny_only_from_scratch
from kd_keras.models.layers import (
    CLS_LOGITS_LAYER,
    DIST_LOGITS_LAYER,
    ImagePreprocessing,
    TokenSelect,
)

VIT_SMALL = dict(num_layers=12, num_heads=6, hidden_dim=384, mlp_dim=1536)
VIT_TINY = dict(num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)


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
        tiny_only_from_scratch("vit_small", weights, "student.weights")
    if weights == "imagenet":
        raise KDError(
            'keras-hub has no ImageNet preset for vit_small; use student.arch = "deit_small" '
            'with student.weights = "imagenet", or a local preset folder'
        )
    backbone = hub_backbone(
        keras_hub.models.ViTBackbone, "", weights, "vit_small", "student.weights",
        image_shape=(image_size, image_size, 3), patch_size=patch_size,
        **(VIT_TINY if tiny else VIT_SMALL),
        name="vit_backbone",
    )  # fmt: skip
    inputs = keras.Input((image_size, image_size, 3), name="images")
    tokens = backbone(ImagePreprocessing("imagenet", name="preprocessing")(inputs))
    pooled = TokenSelect(0, name="class_token")(tokens)
    return classifier_head(inputs, pooled, num_classes, name="vit_small", dropout=0.0)


DEIT_SMALL = dict(num_layers=12, num_heads=6, hidden_dim=384, intermediate_dim=1536)
DEIT_TINY = dict(num_layers=2, num_heads=2, hidden_dim=32, intermediate_dim=64)
DEIT_SMALL_PRESET = "deit_small_distilled_patch16_224_imagenet"


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
        tiny_only_from_scratch("deit_small", weights, "student.weights")
    if weights == "imagenet" and (image_size, patch_size) != (224, 16):
        raise KDError(
            f"the ImageNet DeiT-small preset needs data.image_size = 224 and "
            f"student.patch_size = 16 (got {image_size} and {patch_size}); use "
            'student.weights = "none" at other sizes'
        )
    backbone = hub_backbone(
        keras_hub.models.DeiTBackbone, DEIT_SMALL_PRESET, weights, "deit_small", "student.weights",
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
