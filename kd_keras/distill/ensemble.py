"""Teacher ensembles: several teachers taught as one, their tempered probabilities averaged.

`teacher.ensemble` lists the members (`.keras` files, SavedModel folders, keras-hub presets, or
run folders, whose teacher is taken). Each member is wrapped into its own view of the image
(`kd_keras.distill.teacher.teacher_view`), so members may differ in input size, pixel scaling,
output kind and class order. `build_ensemble` joins them into one functional model, saved as the
run's teacher: raw pixels in at the largest member size (each member resizes down to its own),
logits out whose softmax is the mean of the members' probabilities.

For distillation at temperature T the Distiller rebuilds that graph with `EnsembleLogits(T)`,
whose tempered softmax is exactly the mean of the members' tempered softmaxes, so every
logits loss (soft KD, DKD, hard KD) sees the averaged tempered probabilities. Feature matching
takes the feature map of every member, each through its own adapter (`ensemble_features =
"all"`), or of one chosen member (its index).
"""

from __future__ import annotations

import re
from pathlib import Path

import keras

from kd_keras import compat
from kd_keras.errors import KDError
from kd_keras.models.layers import EnsembleLogits, ResizeImages
from kd_keras.models.taps import feature_and_logits, image_size_of, model_output
from kd_keras.run.folder import RunFolder

ENSEMBLE_NAME = "teacher_ensemble"
_MEMBER = "member_{}"


def member_source(source: str) -> str:
    """The model file behind one `teacher.ensemble` entry: a run folder gives its teacher."""
    path = Path(source)
    if path.is_dir() and RunFolder(path).config_path.is_file():
        found = RunFolder(path).model_file("teacher")
        if found is None:
            raise KDError(f"teacher.ensemble entry {source} is a run folder without a teacher "
                          "model; finish its teacher stage or name a model file")  # fmt: skip
        return str(found)
    return source


def build_ensemble(members: list[keras.Model]) -> keras.Model:
    """One model of `members` (each on raw [0, 255] pixels, logits out, fixed square input):
    input at the largest member size, each member fed a resized copy, mean probabilities out."""
    if len(members) < 2:
        raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
    sizes = [image_size_of(m) for m in members]
    size = max(sizes)
    inputs = keras.Input((size, size, 3), name="images")
    logits = []
    for i, (member, own) in enumerate(zip(members, sizes)):
        x = _resized(inputs, own, i)
        wrapped = keras.Model(member.inputs, model_output(member), name=_MEMBER.format(i))
        logits.append(wrapped(x))
    return keras.Model(inputs, EnsembleLogits(name="ensemble_logits")(logits), name=ENSEMBLE_NAME)


def _resized(images, size: int, index: int):
    if images.shape[1] == size:
        return images
    return ResizeImages(size, name=f"member_{index}_resize")(images)


def ensemble_members(model: keras.Model | None) -> list[keras.Model] | None:
    """The members of an ensemble built by `build_ensemble` (in order); None for any other
    model."""
    if model is None or not model.outputs:
        return None
    if not isinstance(compat.producing_layer(model_output(model)), EnsembleLogits):
        return None
    found = {}
    for layer in model.layers:
        match = re.fullmatch(_MEMBER.format(r"(\d+)"), layer.name)
        if match and isinstance(layer, keras.Model):
            found[int(match.group(1))] = layer
    return [found[i] for i in sorted(found)]


def _member_tap(member: keras.Model, tap: str | None) -> str | None:
    """`tap` inside `member`: a name inside the user's model is prefixed with that model's
    name when the member is a view around it."""
    if not tap:
        return None
    first = tap.split(".", 1)[0]
    if any(layer.name == first for layer in member.layers):
        return tap
    nested = [layer for layer in member.layers if isinstance(layer, keras.Model)]
    return f"{nested[0].name}.{tap}" if len(nested) == 1 else tap


def distillation_outputs(
    model: keras.Model,
    temperature: float,
    features: str | int | None = None,
    feature_layer: str | None = None,
) -> tuple[keras.KerasTensor, dict]:
    """A new graph over the ensemble `model`'s members (weights shared): (its input, outputs),
    the outputs being `logits` at `temperature` (`EnsembleLogits`) and, when `features` is
    `"all"` or a member index, the feature maps: `feature_<i>` of every member, or `feature`
    of the chosen one."""
    members = ensemble_members(model)
    if members is None:
        raise ValueError(f"{model.name!r} is not an ensemble built by build_ensemble")
    if features is None or features == "all":
        tapped = list(range(len(members))) if features == "all" else []
    else:
        if not 0 <= int(features) < len(members):
            raise KDError(f"config key teacher.ensemble_features = {features} is not a member "
                          f"index (0 to {len(members) - 1}) or \"all\"")  # fmt: skip
        tapped = [int(features)]
    inputs = keras.Input(model.inputs[0].shape[1:], name="images")
    logits, out = [], {}
    for i, member in enumerate(members):
        x = _resized(inputs, image_size_of(member), i)
        if i in tapped:
            feature, z = feature_and_logits(member, _member_tap(member, feature_layer))
            feature, z = keras.Model(member.inputs, [feature, z], name=f"member_{i}_fx")(x)
            out["feature" if len(tapped) == 1 else f"feature_{i}"] = feature
        else:
            z = member(x)
        logits.append(z)
    out["logits"] = EnsembleLogits(temperature, name="ensemble_logits_at_t")(logits)
    return inputs, out
