"""Export trained models to ONNX and TFLite (FP32 and INT8) and check every file against its
Keras model.

One call, `export_run`, turns a run folder into deployable files under `export/<run name>/`:

- `<model>.onnx`: FP32, converted with tf2onnx from an explicit input signature (Keras's own ONNX
  export fails on EfficientNet and ViT). Input `images`: float32 RGB pixels in [0, 255], NHWC, at
  the trained size, any batch. Outputs `logits` and `probabilities` (softmax of the logits).
  Metadata (`metadata_props`) carry the class names, image size, input range, decision threshold,
  source run and kd_keras version, so a file explains itself without the run folder.
- `<model>.int8.onnx` (with `int8=True`): ONNX Runtime quantization. Convolution-dominated graphs
  (ResNet, EfficientNet) get static QDQ quantization, per-channel, calibrated on
  `export.calibration_samples` images from the TRAIN split (dynamic quantization made conv nets
  slower than FP32 here). Attention-dominated graphs (ViT, DeiT) get dynamic quantization of their
  MatMul/Gemm weights (about 2x faster than FP32 on ViT-small; no calibration). The choice is read
  from the ONNX graph itself (`quantization_method`), not from model names, so a new architecture
  needs no list to be updated. Weights are 7-bit (`reduce_range`, `INT8_RECIPE`): a file is
  exported once and run on CPUs nobody knows in advance, and without VNNI (AVX2, AVX-512
  without VNNI) ONNX Runtime's U8S8 kernels sum pairs of products in 16 bits, which 8-bit
  weights can saturate (measured on an AVX2 host: student argmax agreement 93.3% instead of
  99.7%). The metadata (`int8_recipe`, `int8_checked_on`) and export.json record the recipe
  and the CPU and ISA level its rows were measured on; on a CPU without VNNI the export says
  INT8 is not expected to be faster than FP32 there.
- `<model>.tflite`, `<model>.int8.tflite` (format `tflite`): see `kd_keras.tflite` (same
  interface, metadata, parity check and INT8 threshold rule).
- `export.json`: per file, the parity check and the test-split metrics.

Metadata also carry the *preprocessing recipe* of the training images (`preprocessing`, JSON;
`kd_keras.predict.preprocessing_recipe`), so `predict` makes inputs from image files the same way.
An INT8 file chooses its own decision threshold on its own validation probabilities (the rule
evaluation used for the FP32 model, `choose_threshold`) when the FP32 model has one, and records
it in its metadata; its test metrics use it and sit beside the FP32 file's.

Parity: ONNX Runtime and Keras run on the same real images (the whole test split by default);
the FP32 file passes when the largest absolute logit difference is within the tolerance
(`export.tolerance`, 1e-4). A file that fails is deleted and `KDError` is raised: a file that
disagrees with its model must never look like a finished export. INT8 files are expected to
differ; their test metrics are reported next to the FP32 ones instead.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from kd_keras.errors import KDError, atomic_write, check_writable_dir, write_json
from kd_keras.host import peak_rss_mb
from kd_keras.inference import (
    INPUT_NAME,
    LOGITS,
    PROBABILITIES,
    compare_logits,
    console,
    keras_predictor,
    onnx_predictor,
    onnx_session,
    output_shapes,
    predict,
    printer,
    size_mb,
)
from kd_keras.run import MODEL_STAGES, RunFolder, artefact_path

FORMATS = ("onnx", "tflite")
INPUT_DESCRIPTION = "0-255 RGB NHWC"
SOFTMAX_NODE = "kd_keras_probabilities"


def kd_keras_version() -> str:
    """The installed kd_keras version (recorded in every exported file)."""
    try:
        return importlib.metadata.version("kd_keras")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------- conversion


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

    from tf2onnx import optimizer

    def collecting(factory):
        def make():
            gc.collect()
            return factory()

        return make

    return OrderedDict((name, collecting(f)) for name, f in optimizer._get_optimizers().items())


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
def _quiet_loggers(*names: str):
    loggers = [logging.getLogger(n or None) for n in names]  # "" is the root logger
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _set_metadata(model_proto, metadata: dict[str, Any]) -> None:
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

    from kd_keras.models import image_size_of

    size = image_size_of(model)
    spec = (tf.TensorSpec((None, size, size, 3), tf.float32, name=INPUT_NAME),)
    with _quiet_loggers("tf2onnx", "tensorflow"), _frozen_heap():
        try:
            model_proto, _ = tf2onnx.convert.from_keras(
                model, input_signature=spec, opset=opset, custom_op_handlers=CUSTOM_OP_HANDLERS,
                optimizers=_collecting_optimizers(),
            )  # fmt: skip
        except Exception as err:
            raise KDError(f"tf2onnx could not convert {model.name!r}: {err}") from err
    _finish_graph(model_proto)
    _set_metadata(model_proto, metadata or {})
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
        "kd_keras_version": kd_keras_version(),
        **{k: str(v) for k, v in extra.items() if v is not None},
    }


def update_metadata(path: str | os.PathLike, metadata: dict[str, Any]) -> None:
    """Merge `metadata` into an ONNX file's metadata_props (rewritten atomically)."""
    import onnx

    model = onnx.load(str(path))
    _set_metadata(model, metadata)
    atomic_write(path, lambda tmp: onnx.save(model, str(tmp)))


def own_threshold(fn, val_batches, val_labels: np.ndarray, fp32_threshold: float | None):
    """An INT8 file's own decision threshold: chosen by `choose_threshold` on its own validation
    probabilities when its FP32 model has a threshold; None (argmax) otherwise."""
    if fp32_threshold is None:
        return None
    from kd_keras.evaluate import choose_threshold
    from kd_keras.inference import softmax

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


# ---------------------------------------------------------------- INT8


# Measured on a 2-core AVX-512 VNNI CPU, ONNX Runtime 1.31, 224 px, batch 1 (README): U8S8
# static QDQ runs ResNet18 at 0.47x and ResNet50 at 0.38x of FP32; dynamic MatMul INT8 runs
# ViT/DeiT-small at 0.49-0.62x; every INT8 variant of EfficientNetB3 was 1.24-3.0x SLOWER.
NO_GAIN_REASON = (
    "no INT8 file: INT8 is slower than FP32 on this graph here — its {sigmoids} Sigmoid nodes "
    "(swish activations, squeeze-excite) become QLinearSigmoid/QLinearMul, which cost more than "
    "the Conv time INT8 saves (EfficientNetB3 measured at 1.24-1.29x FP32 latency); the FP32 "
    "file is the fast one"
)


def quantization_method(onnx_path: str | os.PathLike) -> str:
    """How to quantize a graph, read from its operators (not from model names):

    - `"dynamic"` for attention-dominated graphs (more MatMul/Gemm than Conv nodes: ViT and DeiT
      have four per block and a single patch-embedding Conv);
    - `"none"` for convolution graphs dominated by Sigmoid gates (swish, squeeze-excite:
      EfficientNet), where INT8 measured slower than FP32;
    - `"static"` otherwise (CNNs with one Conv per layer and a single classifier MatMul).
    """
    return quantization_plan(onnx_path)["method"]


def quantization_plan(onnx_path: str | os.PathLike) -> dict[str, Any]:
    """`{"method", "reason", "exclude"}`: the method (`quantization_method`), why, and the
    nodes kept in float: the softmax and the classifier head (its MatMul/Gemm nodes and what
    follows them up to the logits) — quantized logits are clipped to the calibration range,
    which cost ResNet50 up to 6.7 in logit error and nothing in speed when kept float — and,
    for static quantization, the input scaling before the first convolution."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    ops = Counter(n.op_type for n in graph.node)
    if ops["MatMul"] + ops["Gemm"] > ops["Conv"]:
        method, reason = "dynamic", "attention-dominated graph: dynamic INT8 MatMul/Gemm"
    elif ops["Sigmoid"] * 2 >= max(ops["Conv"], 1):
        method, reason = "none", NO_GAIN_REASON.format(sigmoids=ops["Sigmoid"])
    else:
        method, reason = "static", "convolution graph: static U8S8 QDQ, per-channel weights"
    exclude = [SOFTMAX_NODE, *_head_nodes(graph)]
    if method == "static":
        exclude += _input_nodes(graph)
    return {"method": method, "reason": reason, "exclude": exclude}


def _input_nodes(graph) -> list[str]:
    """The nodes between the image input and the first convolutions (the model's own scaling
    and layout change): quantized, they cost more than they save (ResNet18 at 224 px: INT8
    0.48x -> 0.41x of FP32 with them kept float, measured in one run)."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found, frontier = [], [graph.input[0].name]
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.op_type in ("Conv", "MatMul", "Gemm") or node.name in found:
                continue
            found.append(node.name)
            frontier += list(node.output)
    return found


def _head_nodes(graph, max_nodes: int = 12) -> list[str]:
    """The nodes between the last MatMul/Gemm layers and the `logits` output (both ends
    included): a classifier head, or DeiT's two heads and their average."""
    producer = {out: node for node in graph.node for out in node.output}
    found, frontier = [], [LOGITS]
    while frontier and len(found) < max_nodes:
        node = producer.get(frontier.pop())
        if node is None or node.name in found:
            continue
        found.append(node.name)
        if node.op_type not in ("MatMul", "Gemm"):
            frontier += [i for i in node.input if i in producer]
    return found


# Images per calibration batch. ONNX Runtime's calibrator runs an augmented graph whose every
# activation is also a graph output (for its ReduceMin/ReduceMax), so its memory grows with the
# batch: a 224 px ResNet50 peaked 1.7 GB above its start at batch 8, 3.4 GB at 16 and about
# 13 GB at 64 (the training batch this used to be). The ranges (min of minima, max of maxima)
# do not depend on how the same images are batched.
CALIBRATION_BATCH = 8


class CalibrationBatches:
    """Batches of [0, 255] images of a class-stratified subset of a split, for INT8
    calibration (iterable more than once; `images` holds the subset's source entries)."""

    def __init__(
        self, split, image_size: int, n: int, seed: int, batch_size: int = CALIBRATION_BATCH
    ):
        from kd_keras.data import stratified_subset

        if n < 1 or batch_size < 1:
            raise KDError(f"calibration needs n >= 1 and batch >= 1, got {n} and {batch_size}")
        self.subset = split.subset(stratified_subset(split.labels, n, seed))
        self.images = self.subset.images
        self.image_size = image_size
        self.batch_size = batch_size

    def __iter__(self):
        from kd_keras.data import make_dataset

        ds = make_dataset(self.subset, self.image_size, self.batch_size, labels=False, cache=False)
        return ds.as_numpy_iterator()


def calibration_batches(
    split, image_size: int, n: int, seed: int, batch_size: int = CALIBRATION_BATCH
) -> CalibrationBatches:
    """`n` class-stratified images of `split` (the train split, never test) in batches of
    `batch_size` (default `CALIBRATION_BATCH`: calibration memory grows with the batch)."""
    return CalibrationBatches(split, image_size, n, seed, batch_size)


class _Batches:
    """onnxruntime CalibrationDataReader over numpy batches."""

    def __init__(self, batches: Iterable):
        self._batches = iter(batches)

    def get_next(self):
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: np.asarray(batch, "float32")}

    def rewind(self):  # part of the reader interface; one pass is all calibration needs
        pass


INT8_RECIPE = (
    "U8S8 with 7-bit weights (reduce_range): uint8 activations times int8 weights limited to "
    "[-64, 64], so a pair of products summed in 16 bits (the VPMADDUBSW path of CPUs without "
    "VNNI: AVX2, AVX-512 without VNNI) is at most 2 * 255 * 64 = 32640 and never saturates; "
    "VNNI accumulates in 32 bits either way, so the file gives the same result on both"
)
FULL_RANGE_RISK = (
    "U8S8 with full 8-bit weights: exact on VNNI CPUs, but its 16-bit pair sums can saturate "
    "(2 * 255 * 127 > 32767) on CPUs without VNNI (AVX2, AVX-512 without VNNI)"
)
NO_VNNI_SPEED_NOTE = "INT8 is not expected to be faster than FP32 on this CPU (no VNNI)"


def recipe_info(reduce_range: bool) -> dict[str, Any]:
    """What an ONNX INT8 file records about its recipe and the host it was checked on."""
    from kd_keras.host import cpu_model, has_vnni, isa_level

    return {
        "reduce_range": reduce_range,
        "weight_range": "[-64, 64] (7-bit)" if reduce_range else "[-127, 127] (8-bit)",
        "recipe": INT8_RECIPE if reduce_range else FULL_RANGE_RISK,
        "faithful_without_vnni": reduce_range,
        "checked_on": {"cpu": cpu_model(), "isa_level": isa_level(), "vnni": has_vnni()},
    }


def int8_speed_note() -> str | None:
    """A plain sentence when INT8 cannot be faster than FP32 on this host (no VNNI), else
    None. Without VNNI, ONNX Runtime's U8S8 kernels multiply in 16 bits and were measured no
    faster than FP32 (1.04x on an AVX2-only AMD Zen 1; 0.35-0.5x on a VNNI host)."""
    from kd_keras.host import has_vnni, is_x86

    return NO_VNNI_SPEED_NOTE if is_x86() and not has_vnni() else None


def quantize(
    fp32_path: str | os.PathLike,
    int8_path: str | os.PathLike,
    method: str | None = None,
    calibration: Iterable | None = None,
    metadata: dict[str, Any] | None = None,
    reduce_range: bool = True,
) -> dict[str, Any]:
    """Quantize an FP32 ONNX file to INT8 (written atomically); returns how it was done.

    `reduce_range` (default, see `INT8_RECIPE`): 7-bit weights, so the file computes the same
    on every x86 CPU ONNX Runtime may run it on, with or without VNNI.

    `calibration` (batches of [0, 255] images) is required for the static method. The ONNX
    Runtime tools run inside a temporary working folder: pre-processing leaves large temporary
    files in the current directory on transformer graphs.
    """
    import onnx
    from onnxruntime.quantization import (
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # resolved before the tools change the working directory
    fp32_path, int8_path = Path(fp32_path).resolve(), Path(int8_path).resolve()
    plan = quantization_plan(fp32_path)
    method = method or plan["method"]
    if method not in ("static", "dynamic"):
        raise KDError(f"unknown quantization method {method!r}; valid: static, dynamic")
    info: dict[str, Any] = {"method": method, "float_nodes": plan["exclude"]}
    with tempfile.TemporaryDirectory(prefix="kd_keras_int8_") as tmp, contextlib.chdir(tmp):
        pre = Path(tmp) / "preprocessed.onnx"
        out = Path(tmp) / "int8.onnx"
        with _quiet_loggers("", "onnxruntime"):
            # symbolic shape inference fails on the ViT graph; ONNX shape inference still runs
            quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=method == "dynamic")
            if method == "static":
                if calibration is None:
                    raise KDError("static INT8 quantization needs calibration images")
                reader = _Batches(calibration)
                # uint8 activations: on x86 ONNX Runtime fuses every Conv of a U8S8 graph into
                # QLinearConv, but only some of an S8S8 graph (the rest run as float Conv
                # between Quantize/Dequantize pairs: no faster than FP32; ORT profiler, README)
                quantize_static(
                    str(pre), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    reduce_range=reduce_range, nodes_to_exclude=plan["exclude"],
                )  # fmt: skip
                info.update(format="QDQ", per_channel=True, weights="int8", activations="uint8")
            else:
                quantize_dynamic(str(pre), str(out), op_types_to_quantize=["MatMul", "Gemm"],
                                 nodes_to_exclude=plan["exclude"],
                                 reduce_range=reduce_range)  # fmt: skip
                info.update(format="dynamic", ops=["MatMul", "Gemm"], weights="int8",
                            activations="uint8 (dynamic)")  # fmt: skip
        info.update(recipe_info(reduce_range))
        model = onnx.load(str(out))
        checked = info["checked_on"]
        _set_metadata(
            model,
            {
                **(metadata or {}),
                "quantization": json.dumps(info),
                "int8_recipe": info["recipe"],
                "int8_checked_on": f"{checked['cpu']} ({checked['isa_level']})",
            },
        )
        atomic_write(int8_path, lambda tmp_path: onnx.save(model, str(tmp_path)))
    return info


# ---------------------------------------------------------------- export_run


def check_formats(fmt: str | Iterable[str]) -> tuple[str, ...]:
    """Export formats from `"onnx"`, `"onnx,tflite"` or a sequence; unknown ones are a KDError."""
    parts = fmt.split(",") if isinstance(fmt, str) else list(fmt)
    formats = tuple(dict.fromkeys(p.strip() for p in parts if p.strip()))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        shown = unknown[0] if unknown else fmt
        raise KDError(f"unknown export format {shown!r}; valid: {', '.join(FORMATS)}")
    return formats


def export_run(
    run_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    models: Iterable[str] = ("student", "teacher"),
    int8: bool = False,
    tolerance: float | None = None,
    limit: int | None = None,
    fmt: str | Iterable[str] = "onnx",
    quiet: bool = False,
) -> dict[str, Any]:
    """Export a run's models to `<out_dir>/<run name>/` and check each file; returns export.json.

    Args:
        run_dir: run folder; None picks the most recent run under `runs/`.
        out_dir: parent folder of the per-run export folder (default `export.dir`, else
            `export`).
        models: which of the run's models to export. The student is required; another model
            missing from the run is skipped with a note.
        int8: also write `<model>.int8.onnx` / `<model>.int8.tflite` (see module docstring).
        tolerance: parity tolerance on logits (default `export.tolerance`).
        limit: check on the first `limit` test images only (default: the whole test split).
        fmt: export format(s): `"onnx"`, `"tflite"`, `"onnx,tflite"` or a sequence of them.
        quiet: do not print progress and the summary table.
    """
    formats = check_formats(fmt)
    models = tuple(models)
    unknown = [m for m in models if m not in MODEL_STAGES]
    if unknown:
        raise KDError(f"unknown model {unknown[0]!r} to export; valid: {', '.join(MODEL_STAGES)}")
    run = RunFolder.find(run_dir)
    run.check_consistent()
    tolerance = run.cfg.export.tolerance if tolerance is None else float(tolerance)
    if tolerance < 0:
        raise KDError(f"tolerance must be >= 0, got {tolerance}")
    sources: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    for name in models:
        path = run.model_file(name)
        if path is None and name == "student":
            raise KDError(f"run {run.path} has no student.keras — train the student first")
        if path is None:
            skipped[name] = f"run has no {name}.keras"
        else:
            sources[name] = path
    out = check_writable_dir(run.export_dir(out_dir))
    say = printer(quiet)

    from kd_keras.models import image_size_of

    splits = run.load_splits()
    class_names = run.report.get("class_names") or splits.class_names
    test = splits.test.subset(np.arange(min(limit, len(splits.test)))) if limit else splits.test
    result: dict[str, Any] = {
        "run": str(run.path.resolve()),
        "format": ",".join(formats),
        "opset": run.cfg.export.opset,
        "tolerance": tolerance,
        "split": "test",
        "n_images": len(test),
        "class_names": class_names,
        "kd_keras_version": kd_keras_version(),
        "artefacts": {},
        "skipped": skipped,
    }
    for name, source in sources.items():
        model = run.load_model(name)
        result["image_size"] = image_size_of(model)
        job = ExportJob(run, name, model, source, out, splits, test, class_names, tolerance, say)
        job.skipped = skipped  # files a format decides not to write say why here
        if "onnx" in formats:
            result["artefacts"].update(_export_onnx(job, int8))
        if "tflite" in formats:
            from kd_keras.tflite import export_tflite

            result["artefacts"].update(export_tflite(job, int8))
        del model, job
    result["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    from kd_keras.host import describe_host

    result["host"] = describe_host()
    note = int8_speed_note() if int8 else None
    if note:
        result["int8_speed_note"] = note
    result["peak_rss_mb"] = peak_rss_mb()
    write_json(out / "export.json", result)
    result["export_dir"] = str(out)
    from kd_keras.model_card import write_model_card

    result["model_card"] = str(write_model_card(run, out_dir))
    if not quiet:
        print_summary(result)
    return result


class ExportJob:
    """One model being exported: what every format needs, computed once (metadata, Keras logits
    on the test images, test and validation batches, the metrics and threshold rules)."""

    def __init__(
        self, run: RunFolder, name: str, model, source: Path, out: Path, splits, test,
        class_names: list[str], tolerance: float, say: Callable[[str], None],
    ):  # fmt: skip
        from kd_keras.data import make_dataset
        from kd_keras.models import image_size_of
        from kd_keras.predict import preprocessing_recipe

        self.run, self.name, self.model, self.source, self.out = run, name, model, source, out
        self.splits, self.test, self.class_names = splits, test, class_names
        self.tolerance, self.say = tolerance, say
        self.size, self.threshold = image_size_of(model), run.threshold(name)
        self.arch = run.arch(name)  # one name for reports, metadata and the benchmark
        self.params = int(model.count_params())
        self.recipe = preprocessing_recipe(run.cfg.data, self.size)
        batch = run.cfg.data.batch_size
        self.test_batches = make_dataset(test, self.size, batch, labels=False, cache=False)
        self.val_batches = make_dataset(splits.val, self.size, batch, labels=False, cache=False)
        self.keras_logits = predict(keras_predictor(model), self.test_batches)

    def metadata(self, threshold: float | None, **extra: Any) -> dict[str, Any]:
        """The metadata of one exported file of this model."""
        return model_metadata(
            self.class_names, self.size, threshold, model=self.name, architecture=self.arch,
            source_run=str(self.run.path.resolve()), source_file=self.source.name,
            preprocessing=json.dumps(self.recipe), **extra,
        )  # fmt: skip

    def metrics(self, logits: np.ndarray, threshold: float | None) -> dict[str, Any]:
        """Test-split metrics of `logits` with decision `threshold`."""
        from kd_keras.evaluate import classification_metrics
        from kd_keras.inference import softmax

        return classification_metrics(
            self.test.labels, softmax(logits), self.class_names, threshold
        )

    def own_threshold(self, fn) -> float | None:
        """The decision threshold an INT8 predictor `fn` chooses on the validation split."""
        return own_threshold(fn, self.val_batches, self.splits.val.labels, self.threshold)

    def calibration(self) -> CalibrationBatches:
        """`export.calibration_samples` stratified TRAIN images for INT8 calibration."""
        cfg = self.run.cfg
        return calibration_batches(self.splits.train, self.size, cfg.export.calibration_samples,
                                   cfg.run.seed)  # fmt: skip

    def checked(self, path: Path, logits: np.ndarray, what: str, outputs=None) -> dict[str, Any]:
        """The FP32 parity check of `logits` against Keras; beyond the tolerance the file is
        deleted and a `KDError` raised."""
        parity = check_parity(self.keras_logits, logits, self.tolerance)
        if outputs is not None:
            parity["outputs"] = outputs
        if not parity["passed"]:
            path.unlink(missing_ok=True)
            raise KDError(
                f"{self.name} {what} parity check FAILED: max |logit difference| "
                f"{parity['max_abs_diff']:.3g} > tolerance {self.tolerance:g} on {parity['n']} "
                f"test images; {path} was deleted"
            )
        return parity

    def entry(self, path: Path, **fields: Any) -> dict[str, Any]:
        """An export.json entry for `path`."""
        return {"file": path.name, "architecture": self.arch, "params": self.params,
                "size_mb": size_mb(path), **fields}  # fmt: skip


def _export_onnx(job: ExportJob, int8: bool) -> dict[str, dict[str, Any]]:
    """`<name>.onnx` checked against Keras on the test images (+ `<name>.int8.onnx`)."""
    name, threshold = job.name, job.threshold
    onnx_path = artefact_path(job.out, name, "onnx")
    job.say(f"[bold]{name}[/]: converting {job.source.name} ({job.arch}, {job.size} px) to ONNX …")
    to_onnx(job.model, onnx_path, job.run.cfg.export.opset,
            job.metadata(threshold, precision="float32"))  # fmt: skip
    try:
        session = onnx_session(onnx_path)
        onnx_logits = predict(onnx_predictor(session), job.test_batches)
    except BaseException:
        onnx_path.unlink(missing_ok=True)
        raise
    parity = job.checked(onnx_path, onnx_logits, "ONNX", output_shapes(session))
    entries = {
        name: job.entry(onnx_path, source=str(job.source), threshold=threshold, parity=parity,
                        metrics=job.metrics(onnx_logits, threshold))
    }  # fmt: skip
    if not int8:
        return entries
    int8_path = artefact_path(job.out, name, "int8")
    plan = quantization_plan(onnx_path)
    method = plan["method"]
    if method == "none":
        int8_path.unlink(missing_ok=True)  # an older file would look like this export's
        job.say(f"[bold]{name}[/]: {plan['reason']}")
        job.skipped[f"{name}.int8"] = plan["reason"]
        return entries
    job.say(f"[bold]{name}[/]: quantizing to INT8 ({method}) …")
    calibration = job.calibration()
    info = quantize(onnx_path, int8_path, method, calibration=calibration,
                    metadata=job.metadata(threshold, precision="int8"))  # fmt: skip
    if method == "static":
        info.update(calibration_split="train", calibration_samples=len(calibration.images))
    fn = onnx_predictor(onnx_session(int8_path))
    own = job.own_threshold(fn)
    if own != threshold:
        update_metadata(int8_path, job.metadata(own, precision="int8"))
    int8_logits = predict(fn, job.test_batches)
    entries[f"{name}.int8"] = job.entry(
        int8_path, source=onnx_path.name, threshold=own, threshold_fp32=threshold,
        quantization=info, vs_keras=compare_logits(job.keras_logits, int8_logits),
        metrics=job.metrics(int8_logits, own),
    )  # fmt: skip
    return entries


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def summary_table(result: dict[str, Any]):
    """A rich table: one row per exported file, its parity check and test metrics."""
    from rich.table import Table

    run = Path(result["run"]).name
    table = Table(title=f"Export of run {run} ({result['n_images']} test images)")
    columns = ("file", "max |Δ logit|", "argmax agree", "check", "MB", "threshold", "bal. acc",
               "AUC")  # fmt: skip
    for col in columns:
        table.add_column(col, justify="left" if col == "file" else "right")
    for entry in result["artefacts"].values():
        metrics = entry["metrics"]
        if "parity" in entry:
            check = entry["parity"]
            status = "[green]PASS[/]" if check["passed"] else "[red]FAIL[/]"
        else:
            check = entry["vs_keras"]
            status = f"int8 {entry['quantization']['method']}"
        table.add_row(
            entry["file"], f"{check['max_abs_diff']:.1e}", f"{check['argmax_agreement']:.1%}",
            status, f"{entry['size_mb']:.1f}", _fmt(entry.get("threshold"), 4),
            _fmt(metrics["balanced_accuracy"]),
            _fmt(metrics["roc_auc"]),
        )  # fmt: skip
    return table


def summary_notes(result: dict[str, Any]) -> list[str]:
    """Lines printed under the table: tolerance, outputs, skipped models, where files went."""
    lines = [f"check: FP32 logits vs Keras, PASS when max |Δ| ≤ {result['tolerance']:g}; "
             "int8 rows show their difference and metrics (no pass/fail) with their own "
             "validation-chosen threshold"]  # fmt: skip
    first = next((e for e in result["artefacts"].values() if "parity" in e), None)
    if first:
        outputs = ", ".join(f"{o['name']} {o['shape']}" for o in first["parity"]["outputs"])
        lines.append(
            f"input: images [batch, H, W, 3] float32 {INPUT_DESCRIPTION}; outputs: {outputs}"
        )
    lines += [f"skipped {name}: {reason}" for name, reason in result.get("skipped", {}).items()]
    recipes = {e["quantization"]["recipe"] for e in result["artefacts"].values()
               if "recipe" in e.get("quantization", {})}  # fmt: skip
    lines += [f"ONNX INT8 recipe: {r}" for r in sorted(recipes)]
    if result.get("int8_speed_note"):
        lines.append(result["int8_speed_note"])
    if result.get("peak_rss_mb") is not None:
        lines.append(f"peak resident memory of this export: {result['peak_rss_mb']:.0f} MB")
    lines.append(f"written to {result.get('export_dir', '')}")
    return lines


def print_summary(result: dict[str, Any]) -> None:
    out = console()
    out.print(summary_table(result))
    for line in summary_notes(result):
        out.print(line, highlight=False, markup=False)
