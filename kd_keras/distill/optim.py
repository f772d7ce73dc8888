"""Optimizers and class weights."""

from __future__ import annotations

import keras
import numpy as np

from kd_keras.config import Config, TrainConfig
from kd_keras.distill.fused_updates import FusedAdam, FusedSGD


def make_optimizer(tc: TrainConfig, learning_rate: float, epochs: int, steps_per_epoch: int):
    """The configured optimizer and learning-rate schedule (decoupled decay only: coupled L2
    is a loss term, see the module docstring): Keras's Adam or SGD with one fused kernel per
    variable update (`kd_keras.distill.fused_updates`)."""
    total = max(1, epochs * steps_per_epoch)
    warmup = min(tc.warmup_epochs * steps_per_epoch, total - 1)
    if tc.schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if warmup else learning_rate,
            decay_steps=total - warmup,
            warmup_target=learning_rate if warmup else None,
            warmup_steps=warmup,
        )
    else:
        lr = learning_rate
    decay = tc.weight_decay if tc.weight_decay_mode == "decoupled" and tc.weight_decay else None
    if tc.optimizer == "sgd":
        return FusedSGD(lr, momentum=tc.momentum, weight_decay=decay)
    # "adam" with decoupled decay is AdamW: Keras 3 decouples decay in every optimizer
    return FusedAdam(lr, weight_decay=decay)


def class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """'balanced' weights n / (k * n_c), as in scikit-learn."""
    counts = np.bincount(labels, minlength=num_classes).astype("float64")
    return {c: float(len(labels) / (num_classes * counts[c])) if counts[c] else 0.0
            for c in range(num_classes)}  # fmt: skip


def learning_rate_key(stage: str, cfg: Config) -> str:
    """The config key that set a stage's learning rate (its own, or `train.learning_rate`)."""
    own = "teacher" if stage == "teacher" else "student"
    return f"{own}.learning_rate" if getattr(cfg, own).learning_rate is not None else (
        "train.learning_rate")  # fmt: skip
