"""Model registry: teachers and students as Keras functional models.

Every model built here:
- takes raw RGB pixels in [0, 255], float32, NHWC at the configured image size (scaling and
  normalisation are layers inside the model, so saved and exported files need no preprocessing);
- outputs class logits (layer `logits`);
- has one named feature tap (`taps.feature_and_logits`) for feature matching, shaped (batch, h, w,
  channels). Token students expose their patch tokens re-shaped to their grid, so one adapter
  (1x1 conv + resize) serves every teacher/student pair. Taps are found by layer name, so they
  survive `.keras` save/load.
- DeiT students also carry `kd_cls_logits` (class token head, trained on labels) and
  `kd_dist_logits` (distillation token head, trained on the teacher); `logits` is their mean.
"""

from __future__ import annotations

from collections.abc import Callable

import keras

from kd_keras.archs import TEACHER_ARCHS
from kd_keras.errors import KDError
from kd_keras.models import convnets, transformers

Builder = Callable[..., keras.Model]
TEACHERS: dict[str, Builder] = {
    "resnet50": convnets.resnet50,
    "efficientnet_b3": convnets.efficientnet_b3,
}
STUDENTS: dict[str, Builder] = {
    "resnet18": convnets.resnet18,
    "mobilenet_v3_small": convnets.mobilenet_v3_small,
    "resnet8x3": convnets.resnet8x3,
    "vit_small": transformers.vit_small,
    "deit_small": transformers.deit_small,
}


def _lookup(registry: dict[str, Builder], kind: str, name: str) -> Builder:
    if name not in registry:
        raise KDError(f"unknown {kind} architecture {name!r}; valid: {', '.join(registry)}")
    return registry[name]


def build_teacher(
    arch: str, num_classes: int, image_size: int, weights: str = "none", tiny: bool = False
) -> keras.Model:
    """A registered teacher architecture, or a convolutional student architecture trained as
    the teacher (`tiny`: its small variant, for tests/smoke runs)."""
    if arch in TEACHER_ARCHS and arch not in TEACHERS:
        return STUDENTS[arch](num_classes, image_size, weights=weights, tiny=tiny,
                              weights_key="teacher.weights")  # fmt: skip
    return _lookup(TEACHERS, "teacher", arch)(num_classes, image_size, weights=weights, tiny=tiny)


def build_student(
    arch: str, num_classes: int, image_size: int, weights: str = "none", patch_size: int = 16,
    tiny: bool = False,
) -> keras.Model:  # fmt: skip
    """A registered student architecture (`tiny`: its small variant, for tests/smoke runs)."""
    return _lookup(STUDENTS, "student", arch)(
        num_classes, image_size, weights=weights, patch_size=patch_size, tiny=tiny
    )
