"""INT8 quantization of ONNX models (onnxruntime static quantization): method, plan, calibration."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from kd_keras import host
from kd_keras.data.pipeline import make_dataset
from kd_keras.data.sources import stratified_subset
from kd_keras.deploy.onnx import SOFTMAX_NODE, quiet_loggers, set_onnx_metadata
from kd_keras.errors import KDError
from kd_keras.io import atomic_write
from kd_keras.runtimes import (
    INPUT_NAME,
    LOGITS,
)

# Measured on a 2-core AVX-512 VNNI CPU, ONNX Runtime 1.31, 224 px, batch 1 (README): U8S8
# static QDQ runs ResNet18 at 0.47x and ResNet50 at 0.38x of FP32; dynamic MatMul INT8 runs
# ViT/DeiT-small at 0.49-0.62x; every INT8 variant of EfficientNetB3 was 1.24-3.0x SLOWER.
NO_GAIN_REASON = (
    "no INT8 file: INT8 is slower than FP32 on this graph here — its {sigmoids} Sigmoid nodes "
    "(swish activations, squeeze-excite) become QLinearSigmoid/QLinearMul, which cost more than "
    "the Conv time INT8 saves (EfficientNetB3 measured at 1.24-1.29x FP32 latency); the FP32 "
    "file is the fast one"
)


def quantization_plan(onnx_path: str | os.PathLike) -> dict[str, Any]:
    """`{"method", "reason", "exclude"}`: how to quantize a graph, read from its operators (not
    from model names) — `"dynamic"` for attention-dominated graphs (more MatMul/Gemm than Conv
    nodes: ViT and DeiT have four per block and a single patch-embedding Conv), `"none"` for
    convolution graphs dominated by Sigmoid gates (swish, squeeze-excite: EfficientNet), where
    INT8 measured slower than FP32, `"static"` otherwise (CNNs with one Conv per layer and a
    single classifier MatMul) — why, and the nodes kept in float: the softmax and the
    classifier head (its MatMul/Gemm nodes and what follows them up to the logits) —
    quantized logits are clipped to the calibration range, which cost ResNet50 up to 6.7 in
    logit error and nothing in speed when kept float — and, for static quantization, the input
    scaling before the first convolution."""
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
        if n < 1 or batch_size < 1:
            raise KDError(f"calibration needs n >= 1 and batch >= 1, got {n} and {batch_size}")
        self.subset = split.subset(stratified_subset(split.labels, n, seed))
        self.images = self.subset.images
        self.image_size = image_size
        self.batch_size = batch_size

    def __iter__(self):
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
    return {
        "reduce_range": reduce_range,
        "weight_range": "[-64, 64] (7-bit)" if reduce_range else "[-127, 127] (8-bit)",
        "recipe": INT8_RECIPE if reduce_range else FULL_RANGE_RISK,
        "faithful_without_vnni": reduce_range,
        "checked_on": {
            "cpu": host.cpu_model(),
            "isa_level": host.isa_level(),
            "vnni": host.has_vnni(),
        },
    }


def int8_speed_note() -> str | None:
    """A plain sentence when INT8 cannot be faster than FP32 on this host (no VNNI), else
    None. Without VNNI, ONNX Runtime's U8S8 kernels multiply in 16 bits and were measured no
    faster than FP32 (1.04x on an AVX2-only AMD Zen 1; 0.35-0.5x on a VNNI host)."""
    return NO_VNNI_SPEED_NOTE if host.is_x86() and not host.has_vnni() else None


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
        with quiet_loggers("", "onnxruntime"):
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
        set_onnx_metadata(
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
