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

from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from kd_keras.errors import KDError, sha256_of
from kd_keras.models import ImagePreprocessing, all_layers, model_output

SCALINGS = ("auto", "raw", "unit", "symmetric", "caffe", "torch")
# config name -> ImagePreprocessing mode
_SCALING_MODE = {"raw": "none", "unit": "unit", "symmetric": "symmetric", "caffe": "caffe",
                 "torch": "imagenet"}  # fmt: skip
SCALING_HELP = "raw [0,255], unit [0,1], symmetric [-1,1], caffe (BGR mean), torch (mean/std)"
# keras.applications model names -> the scaling their ImageNet weights expect (their
# `preprocess_input`); families that normalise inside the model (EfficientNet, ConvNeXt,
# EfficientNetV2) are recognised by their Rescaling/Normalization layers instead.
_APPLICATION_SCALING = (
    ("resnet50v2", "symmetric"), ("resnet101v2", "symmetric"), ("resnet152v2", "symmetric"),
    ("resnet", "caffe"), ("vgg", "caffe"), ("mobilenet", "symmetric"),
    ("inception", "symmetric"), ("xception", "symmetric"), ("nasnet", "symmetric"),
    ("densenet", "torch"),
)  # fmt: skip
PRESET_PREFIXES = ("kaggle://", "hf://", "modelscope://")


@keras.saving.register_keras_serializable(package="kd_keras")
class ProbabilitiesToLogits(keras.layers.Layer):
    """log(p): logits of a model that outputs probabilities (softmax(log p) = p)."""

    def call(self, p):
        return keras.ops.log(keras.ops.maximum(keras.ops.cast(p, "float32"), 1e-12))


@keras.saving.register_keras_serializable(package="kd_keras")
class SelectClasses(keras.layers.Layer):
    """Re-orders the last axis: output class i is input column `order[i]`."""

    def __init__(self, order: list[int], **kwargs):
        super().__init__(**kwargs)
        self.order = [int(i) for i in order]

    def call(self, x):
        return keras.ops.take(x, np.asarray(self.order, "int32"), axis=-1)

    def get_config(self):
        return {**super().get_config(), "order": self.order}


# SavedModel folders this process may load (resolved path -> sha256 of the folder's files)
_TRUSTED_SAVED_MODELS: dict[str, str] = {}


def trust_saved_model(path: str | Path, sha256: str) -> None:
    """Allow `SavedModelTeacher` to load the SavedModel folder `path` while its files hash to
    `sha256` (called for a `teacher.path` the user configured, or a run's recorded one)."""
    _TRUSTED_SAVED_MODELS[str(Path(path).resolve())] = sha256


@keras.saving.register_keras_serializable(package="kd_keras")
class SavedModelTeacher(keras.layers.TFSMLayer):
    """A TensorFlow SavedModel's serving signature as a layer with one output.

    Unlike `TFSMLayer`, it is saved with the SavedModel's sha256 and loads in Keras's safe mode,
    but only a SavedModel passed to `trust_saved_model` with that fingerprint; any other (a
    `.keras` file from elsewhere naming some folder, or a SavedModel changed since the run
    checked it) is refused with a `KDError`.

    Args:
        filepath: the SavedModel folder.
        call_endpoint: the signature to call.
        sha256: the folder's fingerprint (`kd_keras.run.sha256_of`); None computes it.
        output: the key of the signature's output to return (None: its only output).

    Example:
        >>> trust_saved_model("teacher_sm", sha256_of("teacher_sm"))
        >>> layer = SavedModelTeacher("teacher_sm")
    """

    def __init__(self, filepath: str, call_endpoint: str = "serving_default",
                 sha256: str | None = None, output: str | None = None, **kwargs):  # fmt: skip

        kwargs.pop("call_training_endpoint", None)
        path = str(Path(filepath).resolve())
        trusted = _TRUSTED_SAVED_MODELS.get(path)
        if trusted is None or (sha256 is not None and sha256 != trusted):
            raise KDError(
                f"refused to load the TensorFlow SavedModel {path} (a graph that may run any "
                "TensorFlow op): kd_keras loads a SavedModel only as the teacher.path of the "
                "config being distilled, or of the run folder that recorded its sha256; use the "
                "model through that run folder, or distil again with teacher.path set to it"
            )
        if not Path(path).is_dir() or sha256_of(path) != trusted:
            raise KDError(
                f"the SavedModel {path} changed (or is gone) since it was checked (sha256 "
                f"{trusted[:12]}...); restore it, or distil again with --overwrite"
            )
        super().__init__(path, call_endpoint=call_endpoint, **kwargs)
        self.sha256 = trusted
        self.output_key = output

    def call(self, inputs, training=False):
        out = super().call(inputs, training=False)
        if isinstance(out, dict):
            out = out[self.output_key] if self.output_key else next(iter(out.values()))
        return out

    def get_config(self):
        config = {**super().get_config(), "sha256": self.sha256, "output": self.output_key}
        config.pop("call_training_endpoint", None)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None, safe_mode=None):
        """Safe in safe mode: the constructor loads only a trusted, unchanged SavedModel."""
        return cls(**config)


def saved_models_in(model: keras.Model) -> dict[str, str]:
    """The SavedModel folders inside `model` (a teacher view or an ensemble): path -> sha256."""
    return {layer.filepath: layer.sha256 for layer in all_layers(model)
            if isinstance(layer, SavedModelTeacher)}  # fmt: skip


# ---------------------------------------------------------------- loading


def load_teacher(source: str) -> keras.Model:
    """The model named by `teacher.path`: a `.keras` file, a SavedModel folder or a keras-hub
    preset handle, as a Keras model with one output."""
    from kd_keras.models import load_model

    path = Path(source)
    if source.startswith(PRESET_PREFIXES) or (path.is_dir() and _is_preset(path)):
        return _load_preset(source)
    if path.is_dir():
        if not (path / "saved_model.pb").is_file():
            raise KDError(
                f"teacher.path {path} is a folder but neither a SavedModel (no saved_model.pb) "
                "nor a keras-hub preset (no config.json)"
            )
        return _load_saved_model(path)
    if not path.is_file():
        raise KDError(f"teacher.path file not found: {path}")
    if path.suffix != ".keras":
        raise KDError(
            f"teacher.path {path} is not a .keras file; save the model with model.save("
            "'teacher.keras') or as a SavedModel folder (model.export(folder))"
        )
    model = load_model(path, "teacher.path")
    if not model.inputs or not model.outputs:
        raise KDError(
            f"teacher.path {path} holds a subclassed model with no known input shape; save it "
            "as a functional model or a SavedModel folder"
        )
    model_output(model)  # exactly one output
    return model


def _is_preset(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "metadata.json").is_file()


def _load_preset(handle: str) -> keras.Model:
    """A keras-hub ImageClassifier preset, as a model on raw pixels (its own image converter
    inside), so `input_scaling = "raw"` applies."""
    import keras_hub

    try:
        classifier = keras_hub.models.ImageClassifier.from_preset(handle)
    except Exception as err:  # network and format errors surface as many types
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err)
        raise KDError(
            f"could not load the keras-hub preset teacher.path = {handle!r} ({reason}); without "
            "internet, download it on a connected machine and point teacher.path at its folder"
        ) from err
    converter = classifier.preprocessor.image_converter if classifier.preprocessor else None
    size = tuple(converter.image_size) if converter is not None and converter.image_size else None
    inputs = keras.Input((*(size or (None, None)), 3), name="images")
    x = converter(inputs) if converter is not None else inputs
    return keras.Model(inputs, classifier(x), name=classifier.name)


def _load_saved_model(path: Path) -> keras.Model:
    """The SavedModel the user configured (trusted at its current sha256) as a Keras model."""
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(str(path))
        signature = loaded.signatures["serving_default"]
    except Exception as err:  # TensorFlow raises many types for unreadable folders
        raise KDError(f"teacher.path {path} is not a readable SavedModel: {err}") from err
    specs = tf.nest.flatten(signature.structured_input_signature)
    if len(specs) != 1 or specs[0].shape.rank != 4:
        raise KDError(
            f"teacher.path {path}: the serving signature must take one image batch "
            f"(batch, h, w, 3); it takes {[str(s.shape) for s in specs]}"
        )
    outputs = sorted(signature.structured_outputs) if isinstance(
        signature.structured_outputs, dict) else [None]  # fmt: skip
    if len(outputs) != 1:
        raise KDError(f"teacher.path {path}: the signature has outputs {outputs}; one needed")
    trust_saved_model(path, sha256_of(path))
    layer = SavedModelTeacher(str(path), output=outputs[0], name="saved_model")
    inputs = keras.Input(tuple(specs[0].shape[1:]), name="images")
    return keras.Model(inputs, layer(inputs), name=path.name)


# ---------------------------------------------------------------- the teacher's view


def _leading_layers(model, depth: int = 4) -> list:
    """The first few layers after the input, descending into a leading nested model."""
    out = []
    for layer in getattr(model, "layers", []):
        if isinstance(layer, keras.layers.InputLayer):
            continue
        out.append(layer)
        if isinstance(layer, keras.Model):
            out += _leading_layers(layer, depth)
        if len(out) >= depth:
            break
    return out[:depth]


def declared_scaling(model: keras.Model) -> str | None:
    """The input scaling `model` declares, where it can be read: kd_keras models and models
    that rescale inside (a Rescaling/Normalization layer first) take raw pixels;
    keras.applications families are recognised by name. None when unknown."""
    layers = all_layers(model)
    if any(isinstance(layer, ImagePreprocessing) for layer in layers):
        return "raw"
    scaling_layers = (keras.layers.Rescaling, keras.layers.Normalization)
    if any(isinstance(layer, scaling_layers) for layer in _leading_layers(model)):
        return "raw"
    for layer in [model, *layers]:
        name = layer.name.lower()
        for prefix, scaling in _APPLICATION_SCALING:
            if name.startswith(prefix):
                return scaling
    return None


def declared_outputs(model: keras.Model) -> str:
    """`"probabilities"` when the model ends in a softmax, else `"logits"`."""
    layer = model_output(model)._keras_history.operation
    activation = getattr(layer, "activation", None)
    if isinstance(layer, keras.layers.Softmax) or activation is keras.activations.softmax:
        return "probabilities"
    return "logits"


def input_size(model: keras.Model) -> int | None:
    """The model's fixed square input size, None when free."""
    shape = model.inputs[0].shape
    if len(shape) != 4:
        raise KDError(f"teacher {model.name!r} takes {tuple(shape)} inputs, not image batches")
    if shape[1] is not None and shape[2] is not None and shape[1] != shape[2]:
        raise KDError(f"teacher {model.name!r} takes {shape[1]}x{shape[2]} images; only square "
                      "inputs are supported")  # fmt: skip
    return shape[1]


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
        x = ImagePreprocessing(_SCALING_MODE[view.scaling], name="teacher_scaling")(x)
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
    from kd_keras.ensemble import build_ensemble, member_source

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
    from kd_keras.data import make_dataset
    from kd_keras.evaluate import classification_metrics
    from kd_keras.inference import keras_predictor, predict_probs

    val = make_dataset(splits.val, view.image_size, batch_size, labels=False, cache=False)
    probs = predict_probs(keras_predictor(model), val, f"the teacher ({name})")
    metrics = classification_metrics(splits.val.labels, probs, splits.class_names)
    auc = "n/a" if metrics["roc_auc"] is None else f"{metrics['roc_auc']:.3f}"
    line = (f"teacher check on validation ({name}; {len(splits.val)} images, {view.describe()}): "
            f"balanced accuracy {metrics['balanced_accuracy']:.3f}, AUC {auc}")  # fmt: skip
    print(line)
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


# ---------------------------------------------------------------- caching


class TeacherCache:
    """The frozen teacher's outputs for every training image, computed once.

    The teacher sees each image under deterministic preprocessing (no augmentation), at the
    training pipeline's size, through the same Distiller code that would run it per step, so
    cached and uncached losses are equal on un-augmented batches. `storage = "memory"` keeps
    numpy arrays; `"disk"` memory-maps them in `folder` (for sets larger than RAM).

    Args:
        distiller: the Distiller whose teacher (and feature tap) to run.
        split: the training split.
        image_size: the training pipeline's image size.
        batch_size: batch size of the one pass over the split.
        storage: `"memory"` or `"disk"`.
        folder: where `"disk"` writes its `.npy` files.
    """

    def __init__(self, distiller, split, image_size: int, batch_size: int,
                 storage: str = "memory", folder: Path | None = None):  # fmt: skip
        from kd_keras.data import make_dataset

        if storage not in ("memory", "disk"):
            raise ValueError(f"storage must be 'memory' or 'disk', got {storage!r}")
        if storage == "disk" and folder is None:
            raise ValueError("storage 'disk' needs a folder")
        ds = make_dataset(split, image_size, batch_size, labels=False, cache=False)
        self.arrays: dict[str, np.ndarray] = {}
        start = 0
        for batch in ds:
            out = {k: np.asarray(v) for k, v in distiller._teacher_forward(batch).items()}
            if not self.arrays:
                for key, value in out.items():
                    shape = (len(split), *value.shape[1:])
                    if storage == "memory":
                        self.arrays[key] = np.empty(shape, "float32")
                    else:
                        folder.mkdir(parents=True, exist_ok=True)
                        self.arrays[key] = np.lib.format.open_memmap(
                            folder / f"{key}.npy", mode="w+", dtype="float32", shape=shape
                        )
            for key, value in out.items():
                self.arrays[key][start : start + len(value)] = value
            start += len(next(iter(out.values())))
        for value in self.arrays.values():
            if isinstance(value, np.memmap):
                value.flush()
        self.storage = storage

    @property
    def nbytes(self) -> int:
        """Size of the cached outputs."""
        return sum(int(v.nbytes) for v in self.arrays.values())

    def lookup(self, indices) -> dict:
        """tf ops: the cached outputs of a batch of split indices, keyed `teacher_<name>`.

        Rows are gathered by numpy (memory or memory-mapped file): a large array captured as a
        TensorFlow constant in a tf.data function is copied on every call."""
        import tensorflow as tf

        from kd_keras.distiller import TEACHER_PREFIX

        out = {}
        for key, array in self.arrays.items():
            value = tf.numpy_function(lambda i, a=array: np.asarray(a[i], "float32"), [indices],
                                      tf.float32)  # fmt: skip
            value.set_shape((None, *array.shape[1:]))
            out[TEACHER_PREFIX + key] = value
        return out
