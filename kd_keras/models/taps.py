"""Feature taps: where a model's intermediate feature map is, and the graph surgery that exposes it
beside the logits; small graph queries.
"""

from __future__ import annotations

import re
import weakref

import keras

from kd_keras import compat
from kd_keras.archs import ARCHS
from kd_keras.errors import KDError
from kd_keras.models.layers import TokenGrid

# Feature taps of the registered architectures, tried in order: (layer-name pattern, output
# index of a nested model, leading tokens to drop before re-shaping a token sequence to its grid;
# None = already a feature map). The last layer matching a pattern is the tap, so deeper or
# shallower variants of a family (ResNet101, a tiny EfficientNet) find their own stage output.
# `kd_taps` is the [feature, logits] model inside a teacher view (kd_keras.distill.teacher).
FEATURE_TAPS = (
    (r"kd_taps", 0, None),  # a user's teacher wrapped by kd_keras.distill.teacher.teacher_view
    *(arch.tap for arch in ARCHS.values()),  # the registered architectures' (kd_keras.archs)
)


# graph nodes that training views (kd_keras.models.matmul_conv) added to a model's shared layers:
# graph surgery on the model itself (feature taps) must not follow them into a view's graph
VIEW_NODES: weakref.WeakSet = weakref.WeakSet()


def _graph_output(layer: keras.layers.Layer):
    """The layer's output inside the enclosing model's graph (not a nested model's own)."""
    nodes = [node for node in compat.inbound_nodes(layer) if node not in VIEW_NODES]
    outputs = nodes[-1].output_tensors if nodes else layer.output
    return outputs[0] if isinstance(outputs, (list, tuple)) and len(outputs) == 1 else outputs


def model_output(model: keras.Model):
    """The single output tensor of a classifier, also when Keras gives it as a one-element list
    (common for `.keras` files of functional models)."""
    outputs = model.outputs
    if len(outputs) != 1:
        raise KDError(f"model {model.name!r} has {len(outputs)} outputs; a classifier needs one")
    return outputs[0]


def _graph(model: keras.Model):
    """The functional graph behind a model (a Sequential keeps one inside)."""
    return compat.functional_graph(model)


def _is_spatial(tensor, image_channels: int = 3) -> bool:
    shape = tuple(tensor.shape) if hasattr(tensor, "shape") else ()
    return len(shape) == 4 and shape[-1] not in (None, image_channels)


def tap_candidates(model: keras.Model, prefix: str = "") -> list[str]:
    """Names (dotted through nested models) of the layers with a spatial (4-D) output."""
    names = []
    for layer in _graph(model).layers:
        if isinstance(layer, keras.Model) and compat.can_run_through_graph(layer):
            names += tap_candidates(layer, f"{prefix}{layer.name}.")
        try:
            out = _graph_output(layer)
        except (AttributeError, IndexError, ValueError):
            continue
        if not isinstance(out, (list, tuple, dict)) and _is_spatial(out):
            names.append(prefix + layer.name)
    return names


def _split_path(model: keras.Model, path: str, full: str) -> tuple[str, str | None]:
    """(first layer name, rest) of a dotted path; layer names may contain dots themselves
    ("mobilenetv2_1.00_224"), so the longest matching layer name wins."""
    names = [layer.name for layer in _graph(model).layers]
    matches = [n for n in names if path == n or path.startswith(n + ".")]
    if not matches:
        shown = ", ".join(tap_candidates(model)[-12:]) or "none"
        raise KDError(
            f"feature layer {full!r} not found in model {model.name!r}; layers with a spatial "
            f"output (last 12): {shown}"
        )
    name = max(matches, key=len)
    return name, (path[len(name) + 1 :] or None)


def _tap_through(model: keras.Model, name: str, rest: str, full: str, inputs):
    """Re-run `model`'s graph on `inputs`, replacing its nested model `name` by one that also
    returns the inner layer `rest`: (feature, model output), in one pass."""
    sub = _graph(model).get_layer(name)
    if not isinstance(sub, keras.Model):
        raise KDError(f"feature layer {full!r}: {name!r} is not a nested model")
    inner_feature, inner_out = _tap(sub, rest, full)
    taps = keras.Model(sub.inputs, [inner_feature, inner_out], name=f"{sub.name}_taps")
    captured = {}

    def operation(op):
        if op is not sub:
            return op

        def run(*args, **kwargs):
            feature, out = taps(*args, **kwargs)
            captured["feature"] = feature
            return out

        return run

    out = compat.run_through_graph(model, inputs, operation)
    out = out[0] if isinstance(out, (list, tuple)) else out
    return captured["feature"], out


def _tap(model: keras.Model, path: str, full: str):
    """(feature, output) of `model` on its own inputs for a dotted layer path."""
    name, rest = _split_path(model, path, full)
    if rest is None:
        return _graph_output(_graph(model).get_layer(name)), model_output(model)
    return _tap_through(model, name, rest, full, model.inputs)


def feature_and_logits(model: keras.Model, layer: str | None = None):
    """Symbolic (feature map (batch, h, w, c), logits) of `model`, on `model.inputs`.

    `layer` names the tap (dotted through nested models: `"resnet50.conv4_block6_out"`); else
    the registered architectures' taps (`FEATURE_TAPS`), else the last layer with a spatial
    output, nested models included. A model with no spatial feature map (one that only outputs
    logits) raises `KDError`: distil its logits only (`distill.beta = 0`).
    """
    if layer:
        feature, logits = _tap(model, layer, layer)
        if not _is_spatial(feature, image_channels=-1):
            raise KDError(f"feature layer {layer!r} of {model.name!r} is not a (batch, h, w, c) "
                          f"map (shape {tuple(feature.shape)})")  # fmt: skip
        return feature, logits
    graph = _graph(model)
    for pattern, index, skip in FEATURE_TAPS:
        matches = [lay for lay in graph.layers if re.fullmatch(pattern, lay.name)]
        if not matches:
            continue
        name = matches[-1].name
        out = _graph_output(matches[-1])
        if index is not None:
            out = out[index]
        if skip is not None:
            grid = int(round((out.shape[1] - skip) ** 0.5))
            out = TokenGrid(skip=skip, grid=grid, name=f"{name}_grid")(out)
        return out, model_output(model)
    candidates = tap_candidates(model)
    if candidates:
        return _tap(model, candidates[-1], candidates[-1])
    raise KDError(
        f"model {model.name!r} has no spatial feature map to match (it may output logits only); "
        "set distill.beta = 0 to distil its logits only, or name a layer in "
        "teacher.feature_layer / student.feature_layer"
    )


def all_layers(model) -> list:
    """Every layer of `model`, nested models' layers included (depth first, outer first)."""
    layers = []
    for layer in getattr(model, "layers", []):
        layers.append(layer)
        if isinstance(layer, keras.Model):
            layers += all_layers(layer)
    return layers


def set_batchnorm_momentum(model: keras.Model, momentum: float) -> int:
    """Set the moving-statistics momentum of every BatchNormalization layer of `model` (nested
    models included); returns how many. Keras's default, 0.99, averages over ~100 steps: over a
    short CPU schedule the inference-mode statistics lag the weights (an EfficientNetB3 trained
    5 epochs at 32 px predicted one class at the default rule; re-estimating its statistics
    raised validation balanced accuracy at 0.5 from 0.500 to 0.871)."""
    layers = [lay for lay in all_layers(model) if isinstance(lay, keras.layers.BatchNormalization)]
    for layer in layers:
        layer.momentum = float(momentum)
    return len(layers)


def has_layer(model: keras.Model, name: str) -> bool:
    """Whether `model` has a (top-level) layer called `name`."""
    return any(layer.name == name for layer in model.layers)


def image_size_of(model: keras.Model) -> int:
    """The fixed square input size of `model`."""
    shape = model.inputs[0].shape
    if shape[1] is None:
        raise KDError(f"model {model.name!r} has no fixed input size")
    return int(shape[1])
