"""The Distiller: a `keras.Model` whose `train_step` trains a student from labels and a teacher.

One training engine for all three stages of a run: teacher fine-tuning and the no-distillation
baseline are the same model with `teacher=None, alpha=1, beta=0`.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from kd_keras import compat
from kd_keras.distill import distribute, ensemble, losses, mixup
from kd_keras.models.layers import CLS_LOGITS_LAYER, DIST_LOGITS_LAYER, resize_images
from kd_keras.models.matmul_conv import matmul_view
from kd_keras.models.taps import feature_and_logits, has_layer, model_output

TEACHER_PREFIX = "teacher_"  # input keys of cached teacher outputs: teacher_logits, ...

MODES = tuple(losses.KD_LOSSES)  # soft, hard, dkd
FEATURE_LOSSES = tuple(losses.FEATURE_LOSSES)  # fitnet, attention
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
    """Trains `student` with alpha * CE + (1 - alpha) * KD + beta * FEAT (see
    `kd_keras.distill.losses`).

    The teacher is frozen and always runs in inference mode; gradients reach only the student's
    and the feature adapter's variables. Sample weights (for example from
    `fit(class_weight=...)`) weight the CE term and, with `weight_distillation=True`, the KD and
    feature terms too. Each term is reported as a metric (`ce`, `kd`, `feat`); `loss` is what is
    optimised, regularisation included; `accuracy` is that of the deployed output, sample
    weights included. DeiT students (two heads) train their class-token head on labels and
    their distillation-token head on the teacher when both terms are on (0 < alpha < 1); with
    only one term (alpha = 0 or 1) that term trains the deployed output, the mean of both heads,
    so neither head is left untrained.

    Args:
        student: a model built by `kd_keras.models.registry` (raw pixels in, logits out).
        teacher: the teacher, or None for plain supervised training (alpha=1, beta=0).
        alpha: weight of the label CE term, in [0, 1].
        temperature: softmax temperature T of the soft KD term, > 0.
        beta: weight of the feature-matching term, >= 0 (0 turns it off).
        mode: the teacher-logits loss, a name in `losses.KD_LOSSES`: "soft" (T^2 KL on tempered
            probabilities), "hard" (CE on teacher argmax) or "dkd" (decoupled KD).
        feature_norm: "l2" or "none"; see `losses.feature_l2` (FitNet feature loss).
        feature_loss: a name in `losses.FEATURE_LOSSES`: "fitnet" (through the learned
            adapter) or "attention" (attention transfer, channel-free, no adapter).
        dkd_alpha, dkd_beta: DKD's target- and non-target-class weights.
        weight_distillation: apply sample weights to the KD and feature terms as well.
        logit_adjustment: per-class offsets added to the student's logits in the CE term only
            (Menon et al., 2021, "Long-tail learning via logit adjustment": tau * log prior),
            so the saved model's plain logits are corrected for the training class prior.
        l2_weight_decay: coupled L2 regularisation, (l2_weight_decay / 2) * ||w||^2 over the
            trained variables added to the loss (PyTorch's `weight_decay`); 0 turns it off.
        teacher_feature_layer, student_feature_layer: the feature taps, dotted through nested
            models (default: found automatically, see `kd_keras.models.taps.feature_and_logits`).
        ensemble_features: with a teacher ensemble (`kd_keras.distill.ensemble`), match the
            feature map of every member, each through its own adapter (`"all"`), or of member i
            only (i).
        mixup: MixUp strength a, 0 turns it off (`kd_keras.distill.mixup`: the teacher labels
            the mixed image; needs the teacher in the step, not cached outputs).
        mixup_seed: seed of the MixUp draws, stateless in (mixup_seed, step).

    Each model sees the batch at its own input size: images are resized (bilinear, antialiased)
    for the student and for the teacher when their input size differs from the batch's, so a
    teacher at 224 px can teach a student at 32 px. Inputs may also be a dict with `images` and
    precomputed teacher outputs (`teacher_logits`, `teacher_feature`: see
    `kd_keras.distill.teacher_cache.TeacherCache`); the teacher is then not run.

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
        feature_loss: str = "fitnet",
        dkd_alpha: float = 1.0,
        dkd_beta: float = 8.0,
        weight_distillation: bool = True,
        logit_adjustment: list[float] | None = None,
        l2_weight_decay: float = 0.0,
        teacher_feature_layer: str | None = None,
        student_feature_layer: str | None = None,
        ensemble_features: str | int = "all",
        mixup: float = 0.0,
        mixup_seed: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if l2_weight_decay < 0:
            raise ValueError(f"l2_weight_decay must be >= 0, got {l2_weight_decay}")
        if mixup < 0:
            raise ValueError(f"mixup must be >= 0, got {mixup}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if feature_norm not in FEATURE_NORMS:
            raise ValueError(f"feature_norm must be one of {FEATURE_NORMS}, got {feature_norm!r}")
        if feature_loss not in FEATURE_LOSSES:
            raise ValueError(f"feature_loss must be one of {FEATURE_LOSSES}, got {feature_loss!r}")
        # each loss gets the settings it declares, so a loss's own signature stays strict
        settings = {"temperature": temperature, "dkd_alpha": dkd_alpha, "dkd_beta": dkd_beta,
                    "feature_norm": feature_norm}  # fmt: skip
        self.kd_term = losses.kd_loss(
            mode, **losses.select_params(losses.KD_LOSSES[mode], settings)
        )
        self.feature_term = losses.feature_loss(
            feature_loss, **losses.select_params(losses.FEATURE_LOSSES[feature_loss], settings)
        )
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
        self.feature_loss = feature_loss
        self.dkd_alpha = float(dkd_alpha)
        self.dkd_beta = float(dkd_beta)
        self.weight_distillation = bool(weight_distillation)
        self.logit_adjustment = (
            [float(v) for v in logit_adjustment] if logit_adjustment is not None else None
        )
        self.l2_weight_decay = float(l2_weight_decay)
        self.teacher_feature_layer = teacher_feature_layer
        self.student_feature_layer = student_feature_layer
        self.ensemble_features = ensemble_features
        self.mixup = float(mixup)
        self.mixup_seed = int(mixup_seed)
        self.uses_teacher = teacher is not None and (alpha < 1.0 or beta > 0.0)
        if teacher is not None:
            teacher.trainable = False  # frozen whether or not a term uses it

        # Student graph: the deployed logits, the logits of the label term and of the teacher
        # term (different heads only for DeiT with both terms on), and the feature tap.
        split_heads = (
            has_layer(student, CLS_LOGITS_LAYER) and has_layer(student, DIST_LOGITS_LAYER)
            and self.uses_teacher and 0.0 < self.alpha < 1.0
        )  # fmt: skip
        s_feature = None
        logits = model_output(student)
        if self.beta > 0:  # taps re-wired through nested models come with their own logits
            s_feature, logits = feature_and_logits(student, student_feature_layer)
        s_outputs = {
            "logits": logits,
            "ce_logits": student.get_layer(CLS_LOGITS_LAYER).output if split_heads else logits,
            "kd_logits": student.get_layer(DIST_LOGITS_LAYER).output if split_heads else logits,
        }
        t_inputs, t_outputs = self._teacher_outputs(teacher, teacher_feature_layer,
                                                    ensemble_features)  # fmt: skip
        # one teacher feature map ("feature"), or one per ensemble member ("feature_<i>")
        self.feature_keys = sorted(k for k in t_outputs if k.startswith("feature"))
        self.adapters = []
        if self.beta > 0:
            s_outputs["feature"] = s_feature
        if self.beta > 0 and self.feature_term.needs_adapter:
            for key in self.feature_keys:
                t_shape = t_outputs[key].shape
                name = "adapter" + key[len("feature") :]
                adapter = FeatureAdapter(t_shape[-1], t_shape[1:3], name=name)
                adapter.build(s_feature.shape)
                self.adapters.append(adapter)
        # both graphs compute their matrix-product convolutions as matrix products (same
        # variables; see kd_keras.models.matmul_conv): several times faster on small feature maps
        self._student_graph = matmul_view(
            keras.Model(student.inputs, s_outputs, name="student_graph")
        )
        self._teacher_graph = matmul_view(
            keras.Model(t_inputs, t_outputs, name="teacher_graph") if t_outputs else None
        )

        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.ce_tracker = keras.metrics.Mean(name="ce")
        self.kd_tracker = keras.metrics.Mean(name="kd")
        self.feat_tracker = keras.metrics.Mean(name="feat")
        # weighted accuracy of the global batch, batch by batch: sum(hit * w) / sum(w)
        self.accuracy_tracker = keras.metrics.Mean(name="accuracy")
        self.built = True  # every variable exists: checkpoints can save and restore it

    @property
    def metrics(self):
        trackers = [self.loss_tracker, self.ce_tracker]
        if self.uses_teacher and self.alpha < 1.0:
            trackers.append(self.kd_tracker)
        if self.beta > 0:
            trackers.append(self.feat_tracker)
        return trackers + [self.accuracy_tracker]

    @property
    def trained_variables(self) -> list:
        """What the optimizer updates: the student's and the adapters' trainable variables."""
        adapters = [v for a in self.adapters for v in a.trainable_variables]
        return list(self.student.trainable_variables) + adapters

    def _teacher_outputs(self, teacher, feature_layer, ensemble_features) -> tuple:
        """(input, outputs) of the teacher graph: `logits` and, with feature matching, the
        feature map(s); an ensemble's logits average its members' probabilities at T."""
        if not self.uses_teacher:
            return None, {}
        if ensemble.ensemble_members(teacher):
            features = ensemble_features if self.beta > 0 else None
            return ensemble.distillation_outputs(teacher, self.temperature, features,
                                                 feature_layer)  # fmt: skip
        if self.beta > 0:
            feature, logits = feature_and_logits(teacher, feature_layer)
            return teacher.inputs, {"logits": logits, "feature": feature}
        return teacher.inputs, {"logits": model_output(teacher)}

    def call(self, inputs, training=None):
        images, _ = self._split_inputs(inputs)
        return self.student(self._at_size(images, self.student), training=training)

    def compute_terms(
        self, y, student_out, teacher_out, sample_weight=None, count=None, mix=None
    ) -> dict:
        """The loss and its weighted terms for one batch (scalar tensors).

        `student_out` and `teacher_out` are the dicts of `_student_graph` and `teacher_outputs`.
        `loss` includes the regularisation losses (the student's own and coupled L2). With
        `count`, the global batch size when this batch is one replica's part of it, every term
        is this replica's share (weighted sum / count; regularisation / replicas): the shares
        sum over the replicas to the terms of the global batch (`kd_keras.distill.distribute`).
        With `mix`, the (partner labels, per-image weights lam) of a MixUp batch
        (`mix_batch`), the CE term is lam * CE(y) + (1 - lam) * CE(partner labels); pass the
        mixed sample weights.
        """
        ce_logits, kd_logits = student_out["ce_logits"], student_out["kd_logits"]
        kd_weight = sample_weight if self.weight_distillation else None
        if self.logit_adjustment is not None:
            ce_logits = ce_logits + ops.convert_to_tensor(self.logit_adjustment, "float32")
        per_image = mixup.mixed_cross_entropy(y, ce_logits, mix)
        ce = losses.weighted_mean(per_image, sample_weight, count)
        total = self.alpha * ce
        terms = {"ce": ce}
        if self.uses_teacher and self.alpha < 1.0:
            kd = self.kd_term(y, teacher_out["logits"], kd_logits)
            terms["kd"] = losses.weighted_mean(kd, kd_weight, count)
            total = total + (1.0 - self.alpha) * terms["kd"]
        if self.beta > 0:  # the mean over the teacher feature maps (ensemble members)
            feats = []
            for i, key in enumerate(self.feature_keys):
                s_feature = student_out["feature"]
                if self.adapters:
                    s_feature = self.adapters[i](s_feature)
                feats.append(self.feature_term(teacher_out[key], s_feature))
            feat = feats[0] if len(feats) == 1 else ops.mean(ops.stack(feats), axis=0)
            terms["feat"] = losses.weighted_mean(feat, kd_weight, count)
            total = total + self.beta * terms["feat"]
        reg = self._regularization()
        terms["loss"] = total + (reg if count is None else reg / distribute.num_replicas())
        return terms

    def _regularization(self):
        reg = ops.sum(self.student.losses) if self.student.losses else 0.0
        if self.l2_weight_decay > 0:
            squares = [ops.sum(ops.square(v)) for v in self.trained_variables]
            reg = reg + 0.5 * self.l2_weight_decay * ops.sum(ops.stack(squares))
        return reg

    @staticmethod
    def _at_size(images, model: keras.Model):
        """`images` resized to `model`'s input size when it differs (static shapes)."""
        want = tuple(model.inputs[0].shape[1:3])
        if None in want or tuple(images.shape[1:3]) == want:
            return images
        return resize_images(images, want)

    def _split_inputs(self, x):
        """(images, cached teacher outputs or None) of a batch's inputs."""
        if isinstance(x, dict):
            cached = {k[len(TEACHER_PREFIX) :]: v for k, v in x.items()
                      if k.startswith(TEACHER_PREFIX)}  # fmt: skip
            return x["images"], cached or None
        return x, None

    @property
    def teacher_graph(self):
        """The teacher's functional graph with the outputs distillation reads (logits and
        feature taps), or None when every teacher output comes from a cache."""
        return self._teacher_graph

    def student_outputs(self, images, training: bool) -> dict:
        """The student's outputs (logits and feature taps) on a batch of images."""
        return self._student_graph(self._at_size(images, self.student), training=training)

    def teacher_outputs(self, x) -> dict:
        """The teacher's outputs on a batch (images, or images plus cached teacher outputs),
        without gradients."""
        images, cached = self._split_inputs(x)
        if cached is not None:
            return cached
        if self._teacher_graph is None:
            return {}
        out = self._teacher_graph(self._at_size(images, self.teacher), training=False)
        return {k: tf.stop_gradient(v) for k, v in out.items()}

    def _replica_terms(self, y, student_out, teacher_out, sample_weight, mix=None) -> dict:
        """This replica's shares of the global batch's terms (the terms on one device)."""
        count = distribute.global_count(y)
        return self.compute_terms(y, student_out, teacher_out, sample_weight, count=count, mix=mix)

    def mix_batch(self, images, y, sample_weight, step) -> tuple:
        """MixUp of one batch at this Distiller's strength and seed (`kd_keras.distill.mixup`):
        (mixed images, mixed sample weights, (partner labels, lam))."""
        return mixup.mix_batch(images, y, sample_weight, self.mixup, self.mixup_seed, step)

    def _update_metrics(self, y, student_out, shares, sample_weight):
        """Every tracker gets the global batch's value, whichever replica updates it."""
        hits = keras.metrics.sparse_categorical_accuracy(y, student_out["logits"])
        hits = ops.reshape(ops.cast(hits, "float32"), (-1,))
        w = ops.ones_like(hits) if sample_weight is None else ops.reshape(sample_weight, (-1,))
        w = ops.cast(w, "float32")
        terms, hit_sum, weight = distribute.replica_sum((shares, ops.sum(hits * w), ops.sum(w)))
        for tracker in self.metrics[:-1]:
            tracker.update_state(terms[tracker.name])
        self.accuracy_tracker.update_state(ops.divide_no_nan(hit_sum, weight), weight)
        return distribute.step_logs({m.name: m.result() for m in self.metrics})

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Under a strategy, Keras 3.15's TF `fit` draws a first batch here and averages it over
        the replicas to build what is unbuilt. Under MultiWorkerMirroredStrategy that fails
        ("Attempt to convert a value (PerReplica...) to a Tensor": keras-team/keras#20585), and
        it opens an extra dataset iterator, shifting the shuffle and augmentation streams. The
        Distiller is built at construction: build only what is left (the optimizer). Documented in
        `kd_keras.compat.symbolic_build` (an override of a private hook keeps its name).
        Without a strategy the optimizer is built here from `trained_variables`, before the
        first step is traced."""
        if compat.explicit_strategy(self) is None:
            # the optimizer's slots exist before the first step is traced: a tf.function that
            # creates variables is traced twice (once to create them, once to run), which
            # doubled every stage's start-up cost
            if self.optimizer is not None and not self.optimizer.built:
                self.optimizer.build(self.trained_variables)
            return
        with self.distribute_strategy.scope():
            compat.symbolic_build(self, data_batch=data_batch)

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        images, cached = self._split_inputs(x)
        mix = None
        if self.mixup > 0:
            if cached is not None:
                raise ValueError("MixUp needs the teacher to label each mixed image: train "
                                 "without cached teacher outputs")  # fmt: skip
            images, sample_weight, mix = self.mix_batch(images, y, sample_weight,
                                                        self.optimizer.iterations)  # fmt: skip
            x = images  # the teacher sees the mixed images too
        teacher_out = self.teacher_outputs(x)
        variables = self.trained_variables
        with tf.GradientTape() as tape:
            student_out = self.student_outputs(images, training=True)
            shares = self._replica_terms(y, student_out, teacher_out, sample_weight, mix)
            # float16 training: a LossScaleOptimizer scales here and unscales in apply
            scaled = self.optimizer.scale_loss(shares["loss"])
        # Keras 3's TF optimizer SUMS the replicas' gradients; the shares sum to the global loss
        grads = tape.gradient(scaled, variables)
        self.optimizer.apply_gradients(zip(grads, variables))
        return self._update_metrics(y, student_out, shares, sample_weight)

    def test_step(self, data):
        """The same terms and metrics in inference mode (`evaluate`, validation data)."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        student_out = self.student_outputs(self._split_inputs(x)[0], training=False)
        shares = self._replica_terms(y, student_out, self.teacher_outputs(x), sample_weight)
        return self._update_metrics(y, student_out, shares, sample_weight)

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
            "feature_loss": self.feature_loss,
            "dkd_alpha": self.dkd_alpha,
            "dkd_beta": self.dkd_beta,
            "weight_distillation": self.weight_distillation,
            "logit_adjustment": self.logit_adjustment,
            "l2_weight_decay": self.l2_weight_decay,
            "teacher_feature_layer": self.teacher_feature_layer,
            "student_feature_layer": self.student_feature_layer,
            "ensemble_features": self.ensemble_features,
            "mixup": self.mixup,
            "mixup_seed": self.mixup_seed,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["student"] = keras.saving.deserialize_keras_object(config["student"])
        if config.get("teacher") is not None:
            config["teacher"] = keras.saving.deserialize_keras_object(config["teacher"])
        return cls(**config)
