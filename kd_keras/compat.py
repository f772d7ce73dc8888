"""The one place kd_keras touches private Keras / TensorFlow / tf2onnx names, each with the
reason and, where there is one, the upstream issue asking for a public API.

Everything else in kd_keras uses public APIs only (`tests/test_architecture.py` checks it); when an
upgrade of Keras or TensorFlow breaks something here, this module is where to look.
"""

from __future__ import annotations


def tf_onednn_enabled() -> bool:
    """Whether TensorFlow runs its oneDNN kernels in this process.

    Private: TensorFlow has no public query; its own start-up log line ("oneDNN custom
    operations are on") is printed from the same flag (`IsMklEnabled`, `util/port.cc`)."""
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())


def inbound_nodes(layer) -> list:
    """The graph nodes at which `layer` was called (Keras's `_inbound_nodes`).

    Private: Keras 3 has no public way to ask which call of a layer belongs to which
    functional graph (keras-team/keras#20267: "you'd be using a private API"; #23238); feature
    taps need the tensor a layer produced inside one enclosing model (`kd_keras.models.taps`),
    and training views must not be mistaken for it
    (`kd_keras.models.matmul_conv`)."""
    return list(layer._inbound_nodes)


def producing_layer(tensor):
    """The layer (operation) whose call produced a symbolic Keras tensor.

    Private (`KerasTensor._keras_history`): Keras 3 records it but exposes no public accessor
    (keras-team/keras#19881). Used to recognise the output layer of a saved teacher view or
    ensemble (`kd_keras.models.loading`, `kd_keras.distill.ensemble`)."""
    return tensor._keras_history.operation


def functional_graph(model):
    """The functional graph behind a model: a Sequential keeps one inside (`_functional`),
    a functional model is its own. Private: Keras 3 has no public handle on it; feature taps
    walk it (`kd_keras.models.taps`)."""
    return getattr(model, "_functional", None) or model


def can_run_through_graph(model) -> bool:
    """Whether `run_through_graph` works on `model` (a functional graph, nested or not)."""
    return hasattr(functional_graph(model), "_run_through_graph")


def run_through_graph(model, inputs, operation_fn):
    """Call a functional graph with `operation_fn` wrapping each layer call (Keras's private
    `Functional._run_through_graph`): how a feature tap reads a tensor inside a nested model
    without rebuilding it. Keras 3 has no public equivalent of Keras 2's `get_output_at` for
    nested or reused layers (keras-team/keras#23238, #20267, #16123)."""
    return functional_graph(model)._run_through_graph(inputs, operation_fn=operation_fn)


def application_module(name: str):
    """A `keras.applications` family's own module (`resnet`, `efficientnet`), whose building
    functions (`ResNet(stack_fn, ...)`, `EfficientNet(width, depth, ...)`) are not exported:
    the tiny teachers reuse them at small width so their layer names match the real models'.
    Private: `keras.applications` exports only the fixed-size constructors."""
    import importlib

    return importlib.import_module(f"keras.src.applications.{name}")


def all_sublayers(model) -> list:
    """Every layer inside `model`, nested models' layers included, without `model` itself
    (Keras's private `_flatten_layers`; public `model.layers` is one level only). Used to find
    every BatchNormalization for synchronised statistics (`kd_keras.distill.distribute`)."""
    return list(model._flatten_layers(include_self=False, recursive=True))


def in_multi_worker_mode(strategy) -> bool:
    """Whether a MultiWorkerMirroredStrategy really spans several workers (its private
    `extended._in_multi_worker_mode()`); a single-worker MWMS behaves like MirroredStrategy.
    tf.distribute has no public query (`kd_keras.distill.distribute`)."""
    return bool(strategy.extended._in_multi_worker_mode())


def explicit_strategy(model):
    """The tf.distribute strategy `model` was created under, or None when it was built outside
    any strategy scope (Keras's private `Trainer._distribute_strategy`; the public
    `distribute_strategy` falls back to the default strategy, so it cannot tell)."""
    return model._distribute_strategy


def symbolic_build(model, data_batch=None) -> None:
    """Keras's private `Trainer._symbolic_build`: build what is unbuilt (the optimizer) from a
    batch's spec.

    `kd_keras.distill.distiller.Distiller` overrides the private hook
    `_maybe_symbolic_build` (it must keep Keras's name to be called by `fit`): under
    MultiWorkerMirroredStrategy Keras 3.15's hook fails (keras-team/keras#20585) and it opens
    an extra dataset iterator. The override calls this with the strategy's scope entered."""
    model._symbolic_build(data_batch=data_batch)


def tf2onnx_optimizers() -> dict:
    """tf2onnx's graph-optimizer passes by name (private `tf2onnx.optimizer._get_optimizers`):
    `kd_keras.deploy.onnx` wraps each so memory is collected between passes; tf2onnx exposes
    only `optimize_graph`, which runs them all without that hook."""
    from tf2onnx import optimizer

    return optimizer._get_optimizers()


def tflite_converter_error() -> type[Exception]:
    """The exception `tf.lite.TFLiteConverter.convert` raises when conversion fails
    (`tensorflow.lite.python.convert_phase.ConverterError`, a direct subclass of Exception).
    Private: TensorFlow exports no public name for it, and catching Exception instead would report
    kd_keras's own bugs (in the representative dataset, say) as conversion failures."""
    from tensorflow.lite.python.convert_phase import ConverterError

    return ConverterError


_SLOT_LISTS = {"momentum": ("_momentums", "momentums"), "velocity": ("_velocities",)}


def optimizer_slots(optimizer, variable, *names: str) -> list:
    """The slot variables (`"momentum"`, `"velocity"`) a Keras Adam or SGD keeps for the trained
    `variable` (a replica's component under tf.distribute).

    Private: Keras 3 has no public slot lookup (Keras 2's `get_slot` is gone); its own
    optimizers find them with `_get_variable_index` in the lists `Adam._momentums`,
    `Adam._velocities`, `SGD.momentums`. `kd_keras.distill.fused_updates` passes them to
    TensorFlow's fused update kernels."""
    index = optimizer._get_variable_index(variable)
    found = []
    for name in names:
        attr = next(a for a in _SLOT_LISTS[name] if hasattr(optimizer, a))
        found.append(getattr(optimizer, attr)[index])
    return found
