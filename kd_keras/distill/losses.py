"""Distillation loss terms, each returning one value per sample (weights are applied later).

    loss = alpha * CE(y, s) + (1 - alpha) * KD(t, s) + beta * FEAT(f_t, adapter(f_s))

- CE: cross-entropy of the student's logits `s` against the hard labels `y`.
- KD, soft (Hinton et al., 2015, "Distilling the Knowledge in a Neural Network"):
  T^2 * KL(softmax(t / T) || softmax(s / T)); the T^2 factor keeps its gradients on the scale
  of the CE term as T changes.
- KD, hard (Touvron et al., 2021, "Training data-efficient image transformers", DeiT):
  CE(argmax t, s), the teacher's decision used as a label.
- KD, decoupled (Zhao et al., 2022, "Decoupled Knowledge Distillation", CVPR): the soft KD
  split into a target-class term (TCKD: KL between the binary [target, rest] probabilities)
  and a non-target-class term (NCKD: KL between the distributions over the other classes),
  weighted separately: T^2 * (alpha * TCKD + beta * NCKD). With two classes NCKD is 0.
- FEAT (Romero et al., 2015, "FitNets"): with `norm="none"`, the mean squared error between the
  teacher's feature map and the student's projected to the same shape; with `norm="l2"`, the
  squared distance between L2-normalised channel vectors, averaged over positions
  (in [0, 4]; independent of the features' scale and channel count, so beta transfers between
  teacher architectures).
- FEAT, attention transfer (Zagoruyko & Komodakis, 2017, "Paying More Attention to
  Attention"): spatial attention maps A = mean over channels of |F|^p (p = 2), flattened and
  L2-normalised; the mean squared difference of the teacher's and the student's (resized to
  the teacher's grid). Channel-free: no adapter is learned.

The KD and feature terms are registered by config name (`distill.mode`, `distill.feature_loss`):
one class per loss that declares exactly its own parameters, found with `kd_loss(name, ...)` /
`feature_loss(name, ...)`, whose errors list the valid names and, for a parameter the loss does
not declare (a misspelling), its valid parameters. `select_params` picks from a set of settings
the ones a loss declares (the Distiller passes each loss only those).
"""

from __future__ import annotations

import functools
import inspect

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


def weighted_mean(per_sample, sample_weight=None, count=None):
    """Mean over the batch of per-sample values times their weights (Keras's convention).

    With `count` (the global batch size when this batch is one replica's part of it), the sum
    divided by `count`: this part's share of the global-batch mean."""
    per_sample = ops.cast(per_sample, "float32")
    if sample_weight is not None:
        per_sample = per_sample * ops.cast(ops.reshape(sample_weight, (-1,)), "float32")
    return ops.mean(per_sample) if count is None else ops.sum(per_sample) / count


# ---------------------------------------------------------------- registries

KD_LOSSES: dict[str, type] = {}
FEATURE_LOSSES: dict[str, type] = {}


def _register(registry: dict[str, type], name: str):
    def wrap(cls: type) -> type:
        registry[name] = cls
        cls.name = name
        return cls

    return wrap


@functools.cache
def declared_params(cls: type) -> tuple[str, ...]:
    """The parameter names a loss class's constructor declares (read once per class)."""
    names = []
    for param in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            raise TypeError(f"loss {cls.__name__} must declare its parameters, not *{param.name}")
        names.append(param.name)
    return tuple(names)


def select_params(cls: type, settings: dict) -> dict:
    """The entries of `settings` that loss class `cls` declares."""
    return {k: settings[k] for k in declared_params(cls) if k in settings}


def _get(registry: dict[str, type], kind: str, name: str, **params):
    if name not in registry:
        raise ValueError(f"unknown {kind} loss {name!r}; valid: {', '.join(registry)}")
    cls = registry[name]
    unknown = sorted(set(params) - set(declared_params(cls)))
    if unknown:
        valid = ", ".join(declared_params(cls)) or "none"
        raise ValueError(f"{kind} loss {name!r} has no parameter {', '.join(map(repr, unknown))}; "
                         f"its parameters: {valid}")  # fmt: skip
    return cls(**params)


def kd_loss(name: str, **params):
    """The registered teacher-logits loss `name` (soft, hard, dkd) built with its parameters;
    it is called as `loss(labels, teacher_logits, student_logits)` -> per-sample values."""
    return _get(KD_LOSSES, "distillation", name, **params)


def feature_loss(name: str, **params):
    """The registered feature loss `name` (fitnet, attention) built with its parameters; it is
    called as `loss(teacher_feature, student_feature)` -> per-sample values."""
    return _get(FEATURE_LOSSES, "feature", name, **params)


@_register(KD_LOSSES, "soft")
class SoftKD:
    """Hinton et al. (2015): T^2 * KL(softmax(t/T) || softmax(s/T)) per sample."""

    def __init__(self, temperature: float = 4.0):
        self.temperature = float(temperature)

    def __call__(self, labels, teacher_logits, student_logits):
        return soft_kd(teacher_logits, student_logits, self.temperature)


@_register(KD_LOSSES, "hard")
class HardKD:
    """Touvron et al. (2021, DeiT): CE of the student against the teacher's argmax."""

    def __init__(self):
        pass

    def __call__(self, labels, teacher_logits, student_logits):
        return hard_kd(teacher_logits, student_logits)


@_register(KD_LOSSES, "dkd")
class DecoupledKD:
    """Zhao et al. (2022): T^2 * (alpha * TCKD + beta * NCKD) per sample (module docstring).

    Args:
        temperature: softmax temperature T.
        dkd_alpha: weight of the target-class term (the paper's alpha, 1.0).
        dkd_beta: weight of the non-target-class term (the paper's beta, 8.0 on CIFAR-100).
    """

    def __init__(self, temperature: float = 4.0, dkd_alpha: float = 1.0, dkd_beta: float = 8.0):
        self.temperature = float(temperature)
        self.alpha = float(dkd_alpha)
        self.beta = float(dkd_beta)

    def __call__(self, labels, teacher_logits, student_logits):
        t = ops.cast(teacher_logits, "float32") / self.temperature
        s = ops.cast(student_logits, "float32") / self.temperature
        target = ops.one_hot(ops.cast(ops.reshape(labels, (-1,)), "int32"), ops.shape(t)[-1])
        p_t, p_s = ops.softmax(t, axis=-1), ops.softmax(s, axis=-1)
        b_t = ops.stack([ops.sum(p_t * target, -1), ops.sum(p_t * (1 - target), -1)], -1)
        b_s = ops.stack([ops.sum(p_s * target, -1), ops.sum(p_s * (1 - target), -1)], -1)
        tckd = _kl(b_t, b_s)
        # non-target distributions: the target logit pushed to -inf before the softmax
        log_q_t = ops.log_softmax(t - 1000.0 * target, axis=-1)
        log_q_s = ops.log_softmax(s - 1000.0 * target, axis=-1)
        nckd = ops.sum(ops.exp(log_q_t) * (log_q_t - log_q_s) * (1 - target), axis=-1)
        return (self.temperature**2) * (self.alpha * tckd + self.beta * nckd)


def _kl(p, q, eps: float = 1e-7):
    p = ops.clip(p, eps, 1.0)
    q = ops.clip(q, eps, 1.0)
    return ops.sum(p * (ops.log(p) - ops.log(q)), axis=-1)


@_register(FEATURE_LOSSES, "fitnet")
class FitNet:
    """Romero et al. (2015): distance of the teacher's map and the adapted student map;
    `feature_norm` "l2" (unit channel vectors) or "none" (plain MSE). Needs the adapter."""

    needs_adapter = True

    def __init__(self, feature_norm: str = "l2"):
        self.norm = feature_norm

    def __call__(self, teacher_feature, student_feature):
        return feature_l2(teacher_feature, student_feature, self.norm)


@_register(FEATURE_LOSSES, "attention")
class AttentionTransfer:
    """Zagoruyko & Komodakis (2017): mean squared difference of the L2-normalised spatial
    attention maps mean_c |F|^p; the student's map is resized to the teacher's grid."""

    needs_adapter = False

    def __init__(self, p: int = 2):
        self.p = p

    def attention(self, feature, size=None):
        """(batch, h*w) L2-normalised attention vectors of a (batch, h, w, c) map."""
        a = ops.mean(ops.abs(ops.cast(feature, "float32")) ** self.p, axis=-1, keepdims=True)
        if size is not None and tuple(a.shape[1:3]) != tuple(size):
            a = ops.image.resize(a, size, interpolation="bilinear")
        a = ops.reshape(a, (ops.shape(a)[0], -1))
        return a / ops.sqrt(ops.sum(ops.square(a), axis=-1, keepdims=True) + 1e-12)

    def __call__(self, teacher_feature, student_feature):
        a_t = self.attention(teacher_feature)
        a_s = self.attention(student_feature, teacher_feature.shape[1:3])
        return ops.mean(ops.square(a_t - a_s), axis=-1)
