"""Rules between config keys: what no single key's type, range or choices can check (used by
`kd_keras.config` when a config is built; `cfg` is a `kd_keras.config.Config`, not imported
here so the two modules do not import each other)."""

from __future__ import annotations

from typing import Any

from kd_keras.archs import MIN_IMAGE_SIZE, TOKEN_ARCHS, patch_grid_ok
from kd_keras.errors import KDError

STAGES = ("teacher", "distill", "scratch")


def check_consistency(cfg: Any) -> None:
    """Refuse a config whose keys are each valid but do not go together (a `KDError` naming
    them): unknown stages, an image too small for an architecture or its patches, stacked
    class-prior corrections, a data source without its path, conflicting teacher sources."""
    for stage in cfg.train.stages:
        if stage not in STAGES:
            raise KDError(f"config key train.stages has unknown stage {stage!r}; valid: {STAGES}")
    size = cfg.data.image_size
    for section, arch in (("teacher", cfg.teacher.arch), ("student", cfg.student.arch)):
        need = MIN_IMAGE_SIZE.get(arch)
        if need and size < need:
            raise KDError(
                f"config key data.image_size = {size} is too small for {section} {arch} "
                f"(needs at least {need})"
            )
    if cfg.student.arch in TOKEN_ARCHS:
        p = cfg.student.patch_size
        if not patch_grid_ok(size, p):
            raise KDError(
                f"config key student.patch_size = {p} must divide data.image_size = {size} "
                "into a grid of at least 2x2 patches"
            )
    tc = cfg.train
    if tc.optimizer == "adamw" and tc.weight_decay_mode == "l2":
        raise KDError(
            'config keys train.optimizer = "adamw" and train.weight_decay_mode = "l2" contradict '
            'each other (AdamW is Adam with decoupled decay); use optimizer = "adam" for '
            'coupled L2, or weight_decay_mode = "decoupled"'
        )
    corrections = [
        key for key, on in (
            ('train.class_weight = "balanced"', tc.class_weight == "balanced"),
            ("train.balanced_sampling = true", tc.balanced_sampling),
            (f"train.logit_adjustment = {tc.logit_adjustment}", tc.logit_adjustment > 0),
        ) if on
    ]  # fmt: skip
    if len(corrections) > 1 and not tc.stack_prior_corrections:
        raise KDError(
            f"config sets {' and '.join(corrections)}: each corrects for the class prior, "
            "together they over-correct; keep one, or set train.stack_prior_corrections = true"
        )
    if cfg.data.source in ("folder", "csv") and not cfg.data.path:
        raise KDError(f"config key data.path is required when data.source = {cfg.data.source!r}")
    if cfg.augment.mixup > 0 and cfg.teacher.cache in ("memory", "disk"):
        raise KDError(
            f"config keys augment.mixup = {cfg.augment.mixup} and teacher.cache = "
            f"{cfg.teacher.cache!r} contradict each other (the teacher must label each mixed "
            'image); set teacher.cache = "auto" or "off", or augment.mixup = 0'
        )
    _check_teacher_sources(cfg.teacher)


def _check_teacher_sources(tc: Any) -> None:
    if tc.members > 1 and tc.from_user:
        raise KDError(
            "config key teacher.members trains teachers of teacher.arch; with teacher.path or "
            "teacher.ensemble none is trained: remove one of them"
        )
    if tc.ensemble is None:
        return
    if tc.path:
        raise KDError("config keys teacher.path and teacher.ensemble are both set; use "
                      "teacher.path for one teacher, teacher.ensemble for several")  # fmt: skip
    if len(tc.ensemble) < 2:
        raise KDError(f"config key teacher.ensemble lists {len(tc.ensemble)} teacher(s); list at "
                      "least 2, or use teacher.path for one")  # fmt: skip
    choice = tc.ensemble_features
    in_range = isinstance(choice, int) and 0 <= choice < len(tc.ensemble)
    if choice != "all" and not in_range:
        raise KDError(f'config key teacher.ensemble_features = {choice!r} must be "all" or a '
                      f"member index from 0 to {len(tc.ensemble) - 1}")  # fmt: skip
