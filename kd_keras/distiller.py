"""The Distiller: a `keras.Model` whose `train_step` trains a student from labels and a teacher.

One training engine for all three stages of a run: teacher fine-tuning and the no-distillation
baseline are the same model with `teacher=None, alpha=1, beta=0`.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from kd_keras import losses
from kd_keras.models import CLS_LOGITS_LAYER, DIST_LOGITS_LAYER, feature_tensor, has_layer

MODES = ("soft", "hard")
FEATURE_NORMS = ("none", "l2")


@keras.saving.register_keras_serializable(package="kd_keras")
class FeatureAdapter(keras.layers.Layer):
    """Projects a student feature map onto the teacher's: 1x1 conv to the teacher's channels, then
    bilinear resize to the teacher's grid (a no-op when the grids already match).

    Args:
        channels: teacher feature channels.
        size: teacher feature grid (height, width).
    """

    def __init__(self, channels: int, size: tuple[int, int], **kwargs):
        super().__init__(**kwargs)
        if channels < 1:
            raise ValueError(f"channels must be positive, got {channels}")
        self.channels = int(channels)
        self.size = (int(size[0]), int(size[1]))
        self.project = keras.layers.Conv2D(self.channels, 1, name="project")

    def build(self, input_shape):
        self.project.build(input_shape)

    def call(self, x):
        x = self.project(x)
        if tuple(x.shape[1:3]) != self.size:
            x = ops.image.resize(x, self.size, interpolation="bilinear")
        return x

    def get_config(self):
        return {**super().get_config(), "channels": self.channels, "size": list(self.size)}


@keras.saving.register_keras_serializable(package="kd_keras")
class Distiller(keras.Model):
    """Trains `student` with alpha * CE + (1 - alpha) * KD + beta * FEAT (see `kd_keras.losses`).

    The teacher is frozen and always runs in inference mode. Sample weights (for example from
    `fit(class_weight=...)`) weight the CE term and, with `weight_distillation=True`, the KD and
    feature terms too. Each term is reported as a metric (`ce`, `kd`, `feat`). DeiT students
    train their class-token head on labels and their distillation-token head on the teacher.

    Args:
        student: a model built by `kd_keras.models` (raw pixels in, logits out).
        teacher: the teacher, or None for plain supervised training (alpha=1, beta=0).
        alpha: weight of the label CE term, in [0, 1].
        temperature: softmax temperature T of the soft KD term, > 0.
        beta: weight of the feature-matching term, >= 0 (0 turns it off).
        mode: "soft" (T^2 KL on tempered probabilities) or "hard" (CE on teacher argmax).
        feature_norm: "l2" or "none"; see `losses.feature_l2`.
        weight_distillation: apply sample weights to the KD and feature terms as well.
        logit_adjustment: per-class offsets added to the student's logits in the CE term only
            (Menon et al., 2021, "Long-tail learning via logit adjustment": tau * log prior),
            so the saved model's plain logits are corrected for the training class prior.

    Example:
        >>> d = Distiller(student, teacher, alpha=0.5, temperature=4.0, beta=1.0)
        >>> d.compile(optimizer="sgd")
        >>> d.fit(train_ds, epochs=1)  # then d.student.save("student.keras")
    """

    def __init__(
        self,
        student: keras.Model,
        teacher: keras.Model | None = None,
        alpha: float = 0.5,
        temperature: float = 4.0,
        beta: float = 0.0,
        mode: str = "soft",
        feature_norm: str = "l2",
        weight_distillation: bool = True,
        logit_adjustment: list[float] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if feature_norm not in FEATURE_NORMS:
            raise ValueError(f"feature_norm must be one of {FEATURE_NORMS}, got {feature_norm!r}")
        if teacher is None and (alpha < 1.0 or beta > 0.0):
            raise ValueError(
                f"a teacher is needed when alpha < 1 or beta > 0 (alpha={alpha}, beta={beta})"
            )
        self.student = student
        self.teacher = teacher
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.beta = float(beta)
        self.mode = mode
        self.feature_norm = feature_norm
        self.weight_distillation = bool(weight_distillation)
        self.logit_adjustment = (
            [float(v) for v in logit_adjustment] if logit_adjustment is not None else None
        )
        self.uses_teacher = teacher is not None and (alpha < 1.0 or beta > 0.0)

        # Student graph: [feature?, logits for the label term, logits for the teacher term].
        # DeiT: class head on labels, distillation head on the teacher. Without a KD term both
        # heads train on labels through the averaged output, which is what gets deployed.
        split_heads = (
            has_layer(student, CLS_LOGITS_LAYER) and has_layer(student, DIST_LOGITS_LAYER)
            and self.uses_teacher and self.alpha < 1.0
        )  # fmt: skip
        ce_logits = student.get_layer(CLS_LOGITS_LAYER).output if split_heads else student.output
        kd_logits = student.get_layer(DIST_LOGITS_LAYER).output if split_heads else student.output
        s_outputs = [ce_logits, kd_logits]
        t_outputs = []
        self.adapter = None
        if self.uses_teacher:
            teacher.trainable = False
            t_outputs = [teacher.output]
        if self.beta > 0:
            t_feature = feature_tensor(teacher)
            s_feature = feature_tensor(student)
            t_outputs.append(t_feature)
            s_outputs.append(s_feature)
            self.adapter = FeatureAdapter(t_feature.shape[-1], t_feature.shape[1:3], name="adapter")
            self.adapter.build(s_feature.shape)
        self._student_graph = keras.Model(student.input, s_outputs, name="student_graph")
        self._teacher_graph = (
            keras.Model(teacher.input, t_outputs, name="teacher_graph") if t_outputs else None
        )

        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.ce_tracker = keras.metrics.Mean(name="ce")
        self.kd_tracker = keras.metrics.Mean(name="kd")
        self.feat_tracker = keras.metrics.Mean(name="feat")
        self.accuracy_tracker = keras.metrics.SparseCategoricalAccuracy(name="accuracy")

    @property
    def metrics(self):
        trackers = [self.loss_tracker, self.ce_tracker, self.accuracy_tracker]
        if self.uses_teacher:
            trackers.insert(2, self.kd_tracker)
        if self.beta > 0:
            trackers.insert(3, self.feat_tracker)
        return trackers

    def call(self, inputs, training=None):
        return self.student(inputs, training=training)

    def compute_terms(self, y, student_out, teacher_out, sample_weight=None) -> dict:
        """The loss and its weighted terms for one batch (tensors; scalar each)."""
        ce_logits, kd_logits = student_out[0], student_out[1]
        kd_weight = sample_weight if self.weight_distillation else None
        if self.logit_adjustment is not None:
            ce_logits = ce_logits + ops.convert_to_tensor(self.logit_adjustment, "float32")
        ce = losses.weighted_mean(losses.cross_entropy(y, ce_logits), sample_weight)
        total = self.alpha * ce
        terms = {"ce": ce}
        if self.uses_teacher and self.alpha < 1.0:
            t_logits = teacher_out[0]
            if self.mode == "soft":
                kd = losses.soft_kd(t_logits, kd_logits, self.temperature)
            else:
                kd = losses.hard_kd(t_logits, kd_logits)
            terms["kd"] = losses.weighted_mean(kd, kd_weight)
            total = total + (1.0 - self.alpha) * terms["kd"]
        if self.beta > 0:
            projected = self.adapter(student_out[2])
            feat = losses.feature_l2(teacher_out[-1], projected, self.feature_norm)
            terms["feat"] = losses.weighted_mean(feat, kd_weight)
            total = total + self.beta * terms["feat"]
        terms["loss"] = total
        return terms

    def _teacher_forward(self, x):
        if self._teacher_graph is None:
            return []
        out = self._teacher_graph(x, training=False)
        return [tf.stop_gradient(o) for o in (out if isinstance(out, (list, tuple)) else [out])]

    def _update_metrics(self, y, student_out, terms, sample_weight):
        self.loss_tracker.update_state(terms["loss"])
        self.ce_tracker.update_state(terms["ce"])
        if "kd" in terms:
            self.kd_tracker.update_state(terms["kd"])
        if "feat" in terms:
            self.feat_tracker.update_state(terms["feat"])
        self.accuracy_tracker.update_state(y, student_out[0])
        return {m.name: m.result() for m in self.metrics}

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        teacher_out = self._teacher_forward(x)
        with tf.GradientTape() as tape:
            student_out = self._student_graph(x, training=True)
            terms = self.compute_terms(y, student_out, teacher_out, sample_weight)
            loss = terms["loss"]
            if self.student.losses:
                loss = loss + ops.sum(self.student.losses)
        variables = self.trainable_variables
        grads = tape.gradient(loss, variables)
        self.optimizer.apply_gradients(zip(grads, variables))
        return self._update_metrics(y, student_out, terms, sample_weight)

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        student_out = self._student_graph(x, training=False)
        terms = self.compute_terms(y, student_out, self._teacher_forward(x), sample_weight)
        return self._update_metrics(y, student_out, terms, sample_weight)

    def get_config(self):
        return {
            **super().get_config(),
            "student": keras.saving.serialize_keras_object(self.student),
            "teacher": keras.saving.serialize_keras_object(self.teacher) if self.teacher else None,
            "alpha": self.alpha,
            "temperature": self.temperature,
            "beta": self.beta,
            "mode": self.mode,
            "feature_norm": self.feature_norm,
            "weight_distillation": self.weight_distillation,
            "logit_adjustment": self.logit_adjustment,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["student"] = keras.saving.deserialize_keras_object(config["student"])
        if config.get("teacher") is not None:
            config["teacher"] = keras.saving.deserialize_keras_object(config["teacher"])
        return cls(**config)
