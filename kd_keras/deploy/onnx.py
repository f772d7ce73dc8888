"""ONNX conversion (tf2onnx), file metadata, and the parity check against the Keras model."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from kd_keras import compat
from kd_keras.errors import KDError
from kd_keras.evaluation.metrics import choose_threshold
from kd_keras.io import atomic_write
from kd_keras.models.taps import image_size_of
from kd_keras.prog import version
from kd_keras.runtimes import (
    INPUT_NAME,
    LOGITS,
    PROBABILITIES,
    compare_logits,
    output_shapes,
    predict,
    softmax,
)

INPUT_DESCRIPTION = "0-255 RGB NHWC"


SOFTMAX_NODE = "kd_keras_probabilities"


def _erfc_as_one_minus_erf(ctx, node, name, args):
    """tf2onnx 1.17 has no handler for Erfc, which TensorFlow's exact GELU (ViT, DeiT) lowers
    to; ONNX has Erf, and erfc(x) = 1 - erf(x)."""
    from tf2onnx import utils

    node.type = "Erf"
    dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(node.output[0]))
    one = ctx.make_const(utils.make_name(f"{name}/one"), np.array(1, dtype))
    ctx.insert_new_node_on_output(
        "Sub", node.output[0], name=utils.make_name(f"{name}/one_minus"),
        inputs=[one.output[0], node.output[0]],
    )  # fmt: skip
    return node


CUSTOM_OP_HANDLERS = {"Erfc": (_erfc_as_one_minus_erf, [])}


def _collecting_optimizers():
    """tf2onnx's own ONNX optimizers, each collecting garbage before it starts.

    tf2onnx deep-copies the whole graph (weights included) before every optimizer of every
    pass, and each replaced copy is a reference cycle that only a full garbage collection
    frees — which a process holding TensorFlow and Keras objects rarely runs. Uncollected, the
    copies piled up to 7.3 GB for a 224 px ResNet50 (94 MB of weights) and 2.2 GB for ResNet18;
    collected before each optimizer, two copies are alive at a time."""
    import gc
    from collections import OrderedDict

    def collecting(factory):
        def make():
            gc.collect()
            return factory()

        return make

    return OrderedDict((name, collecting(f)) for name, f in compat.tf2onnx_optimizers().items())


@contextlib.contextmanager
def _frozen_heap():
    """Full garbage collections at the cost of young objects only: what exists when the block
    starts (TensorFlow, Keras, the model) is moved out of the collector's view (`gc.freeze`)
    and given back afterwards."""
    import gc

    gc.collect()
    mine = gc.get_freeze_count() == 0  # never unfreeze what the caller froze
    if mine:
        gc.freeze()
    try:
        yield
    finally:
        if mine:
            gc.unfreeze()
        gc.collect()


@contextlib.contextmanager
def quiet_loggers(*names: str):
    loggers = [logging.getLogger(n or None) for n in names]  # "" is the root logger
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def set_onnx_metadata(model_proto, metadata: dict[str, Any]) -> None:
    props = {p.key: p.value for p in model_proto.metadata_props}
    for key, value in metadata.items():
        if value is not None:
            props[key] = value if isinstance(value, str) else json.dumps(value)
    del model_proto.metadata_props[:]
    for key, value in props.items():
        entry = model_proto.metadata_props.add()
        entry.key, entry.value = key, value


def _finish_graph(model_proto) -> None:
    """Name the single output `logits`, add `probabilities`, call the batch dimension `batch`."""
    import onnx

    graph = model_proto.graph
    if len(graph.output) != 1:
        names = [o.name for o in graph.output]
        raise KDError(f"expected a model with one logits output, the ONNX graph has {names}")
    old = graph.output[0].name
    if old != LOGITS:
        for node in graph.node:
            node.output[:] = [LOGITS if o == old else o for o in node.output]
            node.input[:] = [LOGITS if i == old else i for i in node.input]
        graph.output[0].name = LOGITS
    for value in (graph.input[0], graph.output[0]):
        dim = value.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_value")
        dim.dim_param = "batch"
    graph.node.append(
        onnx.helper.make_node("Softmax", [LOGITS], [PROBABILITIES], axis=-1, name=SOFTMAX_NODE)
    )
    probs = graph.output.add()
    probs.CopyFrom(graph.output[0])
    probs.name = PROBABILITIES


def to_onnx(
    model,
    path: str | os.PathLike,
    opset: int = 17,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Convert a Keras model (input `images`, output logits) to an ONNX file, written atomically.

    The input signature has a free batch dimension and the model's fixed image size.
    """
    import onnx
    import tensorflow as tf
    import tf2onnx

    size = image_size_of(model)
    spec = (tf.TensorSpec((None, size, size, 3), tf.float32, name=INPUT_NAME),)
    with quiet_loggers("tf2onnx", "tensorflow"), _frozen_heap():
        try:
            model_proto, _ = tf2onnx.convert.from_keras(
                model, input_signature=spec, opset=opset, custom_op_handlers=CUSTOM_OP_HANDLERS,
                optimizers=_collecting_optimizers(),
            )  # fmt: skip
        # tf2onnx's checks (`make_sure`) raise ValueError, its op handlers RuntimeError and
        # NotImplementedError; tracing the model raises ValueError or op errors. Any other type
        # (in kd_keras's custom op handlers or optimizer wrappers, say) is a bug.
        except (ValueError, RuntimeError, tf.errors.OpError) as err:
            raise KDError(f"tf2onnx could not convert {model.name!r}: {err}") from err
    _finish_graph(model_proto)
    set_onnx_metadata(model_proto, metadata or {})
    onnx.checker.check_model(model_proto)
    return atomic_write(path, lambda tmp: onnx.save(model_proto, str(tmp)))


def model_metadata(
    class_names: list[str],
    image_size: int,
    threshold: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The metadata_props every exported file carries."""
    rule = (
        f"class 1 if probabilities[:, 1] >= {threshold} else class 0"
        if threshold is not None
        else "argmax(logits)"
    )
    return {
        "class_names": json.dumps(class_names),
        "image_size": str(image_size),
        "input": f"{INPUT_NAME}: float32 [batch, {image_size}, {image_size}, 3]",
        "input_range": INPUT_DESCRIPTION,
        "outputs": f"{LOGITS}: float32 [batch, {len(class_names)}]; {PROBABILITIES}: softmax",
        "decision_threshold": None if threshold is None else str(threshold),
        "decision_rule": rule,
        "kd_keras_version": version(),
        **{k: str(v) for k, v in extra.items() if v is not None},
    }


def update_metadata(path: str | os.PathLike, metadata: dict[str, Any]) -> None:
    """Merge `metadata` into an ONNX file's metadata_props (rewritten atomically)."""
    import onnx

    model = onnx.load(str(path))
    set_onnx_metadata(model, metadata)
    atomic_write(path, lambda tmp: onnx.save(model, str(tmp)))


def own_threshold(fn, val_batches, val_labels: np.ndarray, fp32_threshold: float | None):
    """An INT8 file's own decision threshold: chosen by `choose_threshold` on its own validation
    probabilities when its FP32 model has a threshold; None (argmax) otherwise."""
    if fp32_threshold is None:
        return None
    return float(choose_threshold(val_labels, softmax(predict(fn, val_batches))))


def check_parity(
    keras_logits: np.ndarray, onnx_logits: np.ndarray, tolerance: float, session=None
) -> dict[str, Any]:
    """PASS when every logit is within `tolerance` of Keras's (absolute difference)."""
    result = compare_logits(keras_logits, onnx_logits)
    result["tolerance"] = tolerance
    result["passed"] = bool(result["max_abs_diff"] <= tolerance)
    result["status"] = "PASS" if result["passed"] else "FAIL"
    if session is not None:
        result["outputs"] = output_shapes(session)
    return result
