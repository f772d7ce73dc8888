"""Loading saved models: safe-mode load_model, own teachers (SavedModel files, presets) and their
declared input scaling and outputs.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import keras

from kd_keras import compat
from kd_keras.errors import KDError
from kd_keras.io import sha256_of
from kd_keras.models.backbones import preset_errors

# importing kd_keras.models.layers registers the layers kd_keras writes, for load_model
from kd_keras.models.layers import ImagePreprocessing
from kd_keras.models.taps import all_layers, model_output

# What `keras.saving.load_model` raised on broken `.keras` archives (tried one by one): KeyError
# (no config.json in the zip), ValueError (bad JSON, unknown keyword arguments, no weights file,
# an unsafe Lambda), TypeError (a class it cannot locate or deserialise), OSError (a truncated or
# foreign weights file, from h5py), BadZipFile (a corrupt zip member); KDError is a kd_keras
# layer refusing its config. Any other type is a bug and keeps its traceback.
KERAS_LOAD_ERRORS = (KeyError, ValueError, TypeError, OSError, zipfile.BadZipFile, KDError)


def load_model(path: str | Path, what: str = "model") -> keras.Model:
    """Load a `.keras` file, always in Keras's safe mode, with a clear error when it is missing,
    unreadable, or would need unsafe loading (a `Lambda` layer's Python code, Keras's own
    `TFSMLayer`): such a file is refused, never run. A teacher view around a SavedModel holds
    `SavedModelTeacher` (below), which loads only a SavedModel the run checked."""
    import keras_hub  # noqa: F401  (registers keras-hub layers)

    path = Path(path)
    if not path.is_file():
        raise KDError(f"{what} file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise KDError(f"{what} file {path} could not be loaded: it is not a .keras archive "
                      "(corrupt, truncated or another format)")  # fmt: skip
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except KERAS_LOAD_ERRORS as err:
        ours = _kd_error_in(err)
        if ours is not None:  # raised by a kd_keras layer while loading: already one line
            raise KDError(f"{what} file {path}: {ours}") from err
        unsafe = re.search(r"deserialization of an? `(\w+)`", str(err))
        if unsafe:
            raise KDError(
                f"{what} file {path} holds a {unsafe.group(1)} layer, which would run code from "
                "the file: kd_keras loads models only in Keras's safe mode. Rebuild the model "
                "without it (a registered layer with get_config instead of a Lambda), or as a "
                "SavedModel folder named by teacher.path"
            ) from err
        missing = re.search(r"Could not locate (?:class|function) '([^']+)'", str(err))
        if missing:
            raise KDError(
                f"{what} file {path} needs the custom class {missing.group(1)!r}, which is not "
                "registered: import the module that defines it (decorated with "
                "@keras.saving.register_keras_serializable()) before loading"
            ) from err
        reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise KDError(f"{what} file {path} could not be loaded: {reason}") from err


def _kd_error_in(err: BaseException) -> KDError | None:
    """The KDError that caused `err` (Keras wraps errors raised while deserialising)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KDError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


SCALINGS = ("auto", "raw", "unit", "symmetric", "caffe", "torch")


# config name -> ImagePreprocessing mode
SCALING_MODE = {"raw": "none", "unit": "unit", "symmetric": "symmetric", "caffe": "caffe",
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
        sha256: the folder's fingerprint (`kd_keras.run.folder.sha256_of`); None computes it.
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


def load_teacher(source: str) -> keras.Model:
    """The model named by `teacher.path`: a `.keras` file, a SavedModel folder or a keras-hub
    preset handle, as a Keras model with one output."""

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
    except preset_errors() as err:  # network and format errors
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
    # what it raised on broken folders: OSError (no or an unparsable saved_model.pb, missing
    # variables), IndexError (truncated variables); ValueError and op errors from its own checks
    except (OSError, ValueError, IndexError, tf.errors.OpError) as err:
        raise KDError(f"teacher.path {path} is not a readable SavedModel: {err}") from err
    try:
        signature = loaded.signatures["serving_default"]
    except KeyError as err:  # a SavedModel without a serving signature
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
    layer = compat.producing_layer(model_output(model))
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
