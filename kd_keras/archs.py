"""The registered architectures and their facts, one entry each (no Keras here: the config
checks a run against these before anything builds a model; `kd_keras.models.registry` builds
them).

Facts: the smallest image each accepts (its deepest feature map must stay at least 1x1), or
for token students the patch rule (the image must split into at least 2x2 patches); the feature
tap distillation reads (`kd_keras.models.taps`); whether XLA beats eager on a CPU
(`kd_keras.distill.precision`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    name: str
    role: str  # "teacher" or "student"
    # the feature tap: (layer-name pattern, output index of a nested model or None, leading
    # tokens to drop before re-shaping a token sequence to its grid, or None)
    tap: tuple[str, int | None, int | None]
    min_image_size: int | None = None  # None: a token student (the patch rule applies)
    jit_faster: bool = False  # XLA-compiled steps are faster than eager ones on a CPU

    @property
    def tokens(self) -> bool:
        """A token (transformer) student: image size and patch size must give >= 2x2 patches."""
        return self.min_image_size is None


ARCHS = {a.name: a for a in (
    Arch("resnet50", "teacher", (r"conv4_block\d+_out", None, None), 32),  # stride 16
    # stage 5 output (block5e_add), stride 16
    Arch("efficientnet_b3", "teacher", (r"block5[a-z]+_.*", None, None), 32),
    Arch("resnet18", "student", (r"resnet18_backbone", 0, None), 32),  # P4, stride 16
    Arch("mobilenet_v3_small", "student", (r"expanded_conv_7_add", None, None), 32),  # stride 16
    Arch("resnet8x3", "student", (r"narrow_stage3_out", None, None), 16),  # last stage, stride 8
    # jit_faster: their train step is faster under XLA on a CPU (benchmarks/jit_compile.py)
    Arch("vit_small", "student", (r"vit_backbone", None, 1), jit_faster=True),  # class token
    Arch("deit_small", "student", (r"deit_backbone", None, 2), jit_faster=True),  # + dist token
)}  # fmt: skip
# any convolutional architecture can be trained as the teacher (a small-image one, several times
# over as `teacher.members`, can teach better than a large ImageNet one: docs/results.md)
TEACHER_ARCHS = tuple(name for name, a in ARCHS.items() if a.role == "teacher" or not a.tokens)
STUDENT_ARCHS = tuple(name for name, a in ARCHS.items() if a.role == "student")
MIN_IMAGE_SIZE = {name: a.min_image_size for name, a in ARCHS.items() if a.min_image_size}
TOKEN_ARCHS = tuple(name for name, a in ARCHS.items() if a.tokens)
JIT_FASTER = frozenset(name for name, a in ARCHS.items() if a.jit_faster)


def patch_grid_ok(image_size: int, patch_size: int) -> bool:
    """Whether a token student's patches tile the image into a grid of at least 2x2."""
    return not image_size % patch_size and image_size // patch_size >= 2
