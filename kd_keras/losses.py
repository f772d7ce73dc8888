"""Distillation loss terms, each returning one value per sample (weights are applied later).

    loss = alpha * CE(y, s) + (1 - alpha) * KD(t, s) + beta * FEAT(f_t, adapter(f_s))

- CE: cross-entropy of the student's logits `s` against the hard labels `y`.
- KD, soft (Hinton et al., 2015, "Distilling the Knowledge in a Neural Network"):
  T^2 * KL(softmax(t / T) || softmax(s / T)); the T^2 factor keeps its gradients on the scale
  of the CE term as T changes.
- KD, hard (Touvron et al., 2021, "Training data-efficient image transformers", DeiT):
  CE(argmax t, s), the teacher's decision used as a label.
- FEAT (Romero et al., 2015, "FitNets"): with `norm="none"`, the mean squared error between the
  teacher's feature map and the student's projected to the same shape; with `norm="l2"`, the
  squared distance between L2-normalised channel vectors, averaged over positions
  (in [0, 4]; independent of the features' scale and channel count, so beta transfers between
  teacher architectures).
"""

from __future__ import annotations

import keras
from keras import ops


def cross_entropy(labels, logits):
    """Per-sample CE of integer `labels` against `logits`."""
    return keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)


def soft_kd(teacher_logits, student_logits, temperature: float):
    """Per-sample T^2 * KL(softmax(t/T) || softmax(s/T))."""
    log_p_t = ops.log_softmax(teacher_logits / temperature, axis=-1)
    log_p_s = ops.log_softmax(student_logits / temperature, axis=-1)
    kl = ops.sum(ops.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
    return (temperature**2) * kl


def hard_kd(teacher_logits, student_logits):
    """Per-sample CE of the student against the teacher's argmax."""
    return cross_entropy(ops.argmax(teacher_logits, axis=-1), student_logits)


def feature_l2(teacher_feature, student_feature, norm: str = "l2"):
    """Per-sample feature distance of two (batch, h, w, c) maps (see the module docstring)."""
    teacher_feature = ops.cast(teacher_feature, "float32")
    student_feature = ops.cast(student_feature, "float32")
    if norm == "l2":
        diff = ops.square(_l2_normalize(teacher_feature) - _l2_normalize(student_feature))
        per_position = ops.sum(diff, axis=-1)
    else:
        per_position = ops.mean(ops.square(teacher_feature - student_feature), axis=-1)
    return ops.mean(ops.reshape(per_position, (ops.shape(per_position)[0], -1)), axis=-1)


def _l2_normalize(x, eps: float = 1e-6):
    return x / ops.sqrt(ops.sum(ops.square(x), axis=-1, keepdims=True) + eps)


def weighted_mean(per_sample, sample_weight=None):
    """Mean over the batch of per-sample values times their weights (Keras's convention)."""
    per_sample = ops.cast(per_sample, "float32")
    if sample_weight is None:
        return ops.mean(per_sample)
    return ops.mean(per_sample * ops.cast(ops.reshape(sample_weight, (-1,)), "float32"))
