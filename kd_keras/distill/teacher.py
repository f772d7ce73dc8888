"""The user's own teacher: loading it, its own view of the image, checking it, caching it.

A teacher fine-tuned elsewhere may take another input size, another pixel scaling and give
probabilities rather than logits. `teacher_view` wraps it into kd_keras's model contract (raw
[0, 255] RGB pixels in at its own size, logits in the data's class order out), so the Distiller,
evaluation and export treat it like any teacher this project built; the Distiller resizes each
batch to every model's own input size, so teacher and student resolutions may differ.

Sources (`teacher.path`):
- a Keras 3 `.keras` file: functional, sequential or subclassed-with-config; its single output
  may be a tensor or a one-element list;
- a TensorFlow SavedModel folder (through `SavedModelTeacher`, a `keras.layers.TFSMLayer` that
  loads only a SavedModel this process was told to trust, by its path and sha256: the
  `teacher.path` of the config being distilled, or of the run folder that recorded its
  fingerprint. A SavedModel is a TensorFlow graph that may run any TensorFlow op; a `.keras`
  file alone can never make kd_keras load one);
- a keras-hub image-classifier preset (`kaggle://...`, `hf://...`, or a local preset folder),
  which downloads on a machine with internet and fails fast without it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import keras

from kd_keras.data.pipeline import make_dataset
from kd_keras.distill.ensemble import build_ensemble, member_source
from kd_keras.errors import KDError
from kd_keras.evaluation.metrics import classification_metrics
from kd_keras.models.layers import ImagePreprocessing, ProbabilitiesToLogits, SelectClasses
from kd_keras.models.loading import (
    SCALING_HELP,
    SCALING_MODE,
    declared_outputs,
    declared_scaling,
    input_size,
    load_teacher,
)
from kd_keras.models.taps import model_output
from kd_keras.runtimes import keras_predictor, predict_probs

# ---------------------------------------------------------------- the teacher's view

logger = logging.getLogger(__name__)


@dataclass
class TeacherView:
    """How a user's teacher sees an image: resolved size, scaling, output kind, class order."""

    image_size: int
    scaling: str
    outputs: str
    class_order: list[int] | None

    def describe(self) -> str:
        """One log line."""
        order = f", classes re-ordered {self.class_order}" if self.class_order else ""
        return f"{self.image_size} px, input scaling {self.scaling}, outputs {self.outputs}{order}"


def resolve_view(model: keras.Model, cfg, class_names: list[str]) -> TeacherView:
    """The view of `model` the config asks for, with `auto` values read from the model."""
    tc = cfg.teacher
    own = input_size(model)
    size = tc.image_size or own or cfg.data.image_size
    if own is not None and tc.image_size and tc.image_size != own:
        raise KDError(
            f"config key teacher.image_size = {tc.image_size} but the teacher takes {own} px "
            "images; leave teacher.image_size = 0 to use the teacher's own size"
        )
    scaling = tc.input_scaling
    if scaling == "auto":
        scaling = declared_scaling(model)
        if scaling is None:
            raise KDError(
                f"cannot tell which input scaling teacher {model.name!r} expects; set "
                f"teacher.input_scaling to one of: {SCALING_HELP}"
            )
    outputs = declared_outputs(model) if tc.outputs == "auto" else tc.outputs
    n = int(model_output(model).shape[-1])
    if n != len(class_names):
        raise KDError(
            f"teacher.path model outputs {n} classes but the data has {len(class_names)} "
            f"({class_names})"
        )
    order = None
    if tc.class_order:
        unknown = [c for c in tc.class_order if c not in class_names]
        if unknown or sorted(tc.class_order) != sorted(class_names):
            raise KDError(
                f"config key teacher.class_order = {tc.class_order} must list each data class "
                f"{class_names} once, in the order of the teacher's outputs"
            )
        order = [tc.class_order.index(c) for c in class_names]
        order = None if order == list(range(n)) else order
    return TeacherView(int(size), scaling, outputs, order)


def teacher_view(model: keras.Model, view: TeacherView) -> keras.Model:
    """`model` behind kd_keras's contract: raw [0, 255] RGB at `view.image_size` in, logits in
    the data's class order out. A model that already fits is returned unchanged."""
    identity = (view.scaling == "raw" and view.outputs == "logits" and view.class_order is None
                and input_size(model) == view.image_size)  # fmt: skip
    if identity:
        return model
    inputs = keras.Input((view.image_size, view.image_size, 3), name="images")
    x = inputs
    if view.scaling != "raw":
        x = ImagePreprocessing(SCALING_MODE[view.scaling], name="teacher_scaling")(x)
    out = model(x)
    out = out[0] if isinstance(out, (list, tuple)) else out
    if view.outputs == "probabilities":
        out = ProbabilitiesToLogits(name="teacher_logits")(out)
    if view.class_order is not None:
        out = SelectClasses(view.class_order, name="teacher_class_order")(out)
    return keras.Model(inputs, out, name=f"{model.name}_view")


def prepare_teacher(cfg, splits, check: bool, force: bool = False) -> tuple:
    """The user's teacher (`teacher.path`) or teacher ensemble (`teacher.ensemble`) behind
    kd_keras's model contract: (model, feature tap inside it, one-line description). With
    `check`, each teacher is checked on validation first (`check_teacher`)."""
    tc = cfg.teacher
    sources = [tc.path] if tc.path else [member_source(s) for s in tc.ensemble]
    views, lines = [], []
    for source in sources:
        model = load_teacher(source)
        view = resolve_view(model, cfg, splits.class_names)
        wrapped = teacher_view(model, view)
        if check:
            check_teacher(wrapped, view, splits, cfg.data.batch_size, force, name=source)
        views.append((model, wrapped))
        lines.append(f"{source} ({view.describe()})")
    if tc.path:
        (model, wrapped), tap = views[0], tc.feature_layer
        if wrapped is not model and tap:  # the tap path is the user's model's
            tap = f"{model.name}.{tap}"
        return wrapped, tap, lines[0]
    ensemble = build_ensemble([wrapped for _, wrapped in views])
    if check:
        size = input_size(ensemble)
        check_teacher(ensemble, TeacherView(size, "raw", "logits", None), splits,
                      cfg.data.batch_size, force, name=f"the ensemble of {len(views)}")  # fmt: skip
    described = "; ".join(f"[{i}] {line}" for i, line in enumerate(lines))
    return ensemble, tc.feature_layer, f"ensemble of {len(views)}: {described}"


# ---------------------------------------------------------------- checks


def check_teacher(
    model: keras.Model,
    view: TeacherView,
    splits,
    batch_size: int,
    force: bool = False,
    name: str = "teacher.path",
) -> dict:
    """Evaluate the teacher (its view) on the validation split before any training; a teacher
    no better than chance (balanced accuracy <= 1/k + 0.05) stops the run unless `force`.
    `name` says which teacher in messages (an ensemble checks each member)."""
    val = make_dataset(splits.val, view.image_size, batch_size, labels=False, cache=False)
    probs = predict_probs(keras_predictor(model), val, f"the teacher ({name})")
    metrics = classification_metrics(splits.val.labels, probs, splits.class_names)
    auc = "n/a" if metrics["roc_auc"] is None else f"{metrics['roc_auc']:.3f}"
    line = (f"teacher check on validation ({name}; {len(splits.val)} images, {view.describe()}): "
            f"balanced accuracy {metrics['balanced_accuracy']:.3f}, AUC {auc}")  # fmt: skip
    logger.info(line)
    chance = 1.0 / splits.num_classes
    if metrics["balanced_accuracy"] <= chance + 0.05 and not force:
        raise KDError(
            f"the teacher {name} is no better than chance on validation (balanced accuracy "
            f"{metrics['balanced_accuracy']:.3f}, AUC {auc}). Likely causes: the wrong "
            f"teacher.input_scaling (now {view.scaling!r}; one of {SCALING_HELP}), the wrong "
            f"teacher.image_size (now {view.image_size}), or a different class order "
            f"(teacher.class_order). Use --force to distil from it anyway"
        )
    return metrics
