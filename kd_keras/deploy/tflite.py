"""TFLite / LiteRT: convert Keras models to `.tflite` (FP32 and full-integer INT8), embed and
read their metadata, and run them.

- Conversion uses TensorFlow 2.21's own `tf.lite.TFLiteConverter` (it still works; only its
  Python *interpreter* `tf.lite.Interpreter` is deprecated). Files are run with the LiteRT
  interpreter of the `ai-edge-litert` package (`ai_edge_litert.interpreter.Interpreter`), the
  maintained successor, which needs no TensorFlow.
- The converted function has the ONNX file's interface: input `images` float32 [batch, H, W, 3]
  RGB pixels in [0, 255] (any batch), outputs `logits` and `probabilities` (softmax).
- Full-integer INT8 (`calibration` given): every operator int8 (`TFLITE_BUILTINS_INT8`), weights
  per-channel, activations calibrated on the representative dataset (TRAIN images); the input and
  outputs are int8 too, so the file runs on integer-only accelerators. The quantisation of the
  input (`q = round(pixel / scale) + zero_point`) and of the outputs is in the file's tensors and
  repeated in its metadata; `tflite_predictor` quantises and dequantises, so callers see the same
  float interface as for any other format.
- Metadata: the same key/value pairs as an ONNX file's `metadata_props`, stored as one JSON
  object in the flatbuffer's own metadata table (entry `kd_keras`), so the file explains itself
  without a sidecar (`inference.read_tflite_metadata`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from kd_keras import compat
from kd_keras.errors import KDError
from kd_keras.io import atomic_write
from kd_keras.models.taps import image_size_of
from kd_keras.run.files import artefact_path
from kd_keras.runtimes import (
    INPUT_NAME,
    LOGITS,
    PROBABILITIES,
    TFLITE_SIGNATURE,
    compare_logits,
    predict,
    tflite_interpreter,
    tflite_io,
    tflite_predictor,
)
from kd_keras.runtimes import TFLITE_METADATA_KEY as METADATA_KEY

RUNTIME = "LiteRT (ai-edge-litert) CPU"
TFLITE_CALIBRATION_BATCH = 32


def convert(model, calibration: Iterable | None = None) -> bytes:
    """A `.tflite` flatbuffer of `model` (input `images`, outputs `logits`, `probabilities`):
    FP32, or full-integer INT8 calibrated on `calibration` (batches of [0, 255] images)."""
    import keras
    import tensorflow as tf

    size = image_size_of(model)

    def serve(images):
        logits = model(images, training=False)
        if isinstance(logits, list | tuple):  # functional models saved by Keras 3 often do this
            logits = logits[0]
        return {LOGITS: logits, PROBABILITIES: tf.nn.softmax(logits, axis=-1)}

    # through a SavedModel written by Keras's ExportArchive, as the converter itself does for
    # Keras 3 models: a tf.function over the model converts with uninitialised variables
    archive = keras.export.ExportArchive()
    archive.track(model)
    spec = [tf.TensorSpec((None, size, size, 3), tf.float32, INPUT_NAME)]
    archive.add_endpoint(TFLITE_SIGNATURE, serve, spec)
    with tempfile.TemporaryDirectory(prefix="kd_keras_tflite_") as saved:
        archive.write_out(saved, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved, [TFLITE_SIGNATURE])
        return _convert(converter, model.name, calibration)


def _convert(converter, name: str, calibration: Iterable | None) -> bytes:
    import tensorflow as tf

    if calibration is not None:
        batches = [np.asarray(b, "float32") for b in calibration]
        if not batches:
            raise KDError("full-integer INT8 TFLite conversion needs calibration images")
        # the converter's calibration holds little beyond one batch (a 224 px ResNet50 peaked
        # at +1.6 GB at batch 64, +1.0 GB at 8) and runs faster on larger batches
        images = np.concatenate(batches)
        batches = np.array_split(images, max(1, -(-len(images) // TFLITE_CALIBRATION_BATCH)))

        def representative():
            for batch in batches:
                yield [np.asarray(batch, "float32")]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    try:
        return converter.convert()
    # ConverterError (MLIR conversion), RuntimeError (the calibrator, e.g. on images of another
    # size), ValueError (the converter's own checks); the representative dataset's bugs pass
    except (compat.tflite_converter_error(), RuntimeError, ValueError) as err:
        reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else repr(err)
        raise KDError(f"TFLite could not convert {name!r}: {reason}") from err


def with_metadata(flatbuffer: bytes, metadata: dict[str, Any]) -> bytes:
    """`flatbuffer` with `metadata` (JSON) in its metadata table under `kd_keras` (replaced if
    present); strings stay strings, other values are JSON-encoded like ONNX metadata_props."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    props = {k: v if isinstance(v, str) else json.dumps(v)
             for k, v in metadata.items() if v is not None}  # fmt: skip
    model = schema.ModelT.InitFromPackedBuf(bytearray(flatbuffer), 0)
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(props).encode("utf-8"), np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_KEY, len(model.buffers) - 1
    model.metadata = [m for m in (model.metadata or []) if m.name != METADATA_KEY.encode()]
    model.metadata.append(entry)
    builder = flatbuffers.Builder(len(flatbuffer) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def write_tflite(path: str | os.PathLike, flatbuffer: bytes, metadata: dict[str, Any]) -> Path:
    """Write `flatbuffer` with `metadata` embedded, atomically."""
    data = with_metadata(flatbuffer, metadata)
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def io_metadata(interp, image_size: int) -> dict[str, str]:
    """Metadata keys that describe what a `.tflite` file's input and outputs expect."""
    quant = tflite_io(interp)
    fin, fout = quant[INPUT_NAME], quant[LOGITS]
    shape = f"[batch, {image_size}, {image_size}, 3]"
    if fin["dtype"] == "float32":
        return {"input": f"{INPUT_NAME}: float32 {shape}"}
    rule = "q = clip(round(pixel / scale) + zero_point)"
    return {
        "input": f"{INPUT_NAME}: {fin['dtype']} {shape}, quantised from 0-255 pixels: {rule}, "
        f"scale {fin['scale']:.6g}, zero_point {fin['zero_point']}",
        "outputs": f"{LOGITS}: {fout['dtype']} [batch, classes], value = (q - zero_point) * "
        f"scale with scale {fout['scale']:.6g}, zero_point {fout['zero_point']}; "
        f"{PROBABILITIES}: {quant[PROBABILITIES]['dtype']} softmax",
        "io_quantization": json.dumps(quant),
    }


def export_tflite(job, int8: bool) -> dict[str, dict[str, Any]]:
    """`<name>.tflite` (FP32) checked against Keras on the test images like the ONNX file (beyond
    the tolerance: deleted, `KDError`), and with `int8` a full-integer `<name>.int8.tflite`
    calibrated on TRAIN images, with its own validation-chosen threshold; export.json entries.

    `job` is an `kd_keras.deploy.export.ExportJob`.
    """
    name, threshold = job.name, job.threshold
    path = artefact_path(job.out, name, "tflite")
    job.say(f"{name}: converting {job.source.name} ({job.arch}, {job.size} px) to TFLite …")
    flatbuffer = convert(job.model)
    logits = predict(tflite_predictor(tflite_interpreter(flatbuffer)), job.test_batches)
    path.unlink(missing_ok=True)  # an older file that may disagree must not survive a failure
    parity = job.checked(path, logits, "TFLite")
    write_tflite(path, flatbuffer, job.metadata(threshold, precision="float32", runtime=RUNTIME))
    entries = {
        f"{name}.tflite": job.entry(path, source=str(job.source), threshold=threshold,
                                    parity=parity, metrics=job.metrics(logits, threshold))
    }  # fmt: skip
    if not int8:
        return entries
    int8_path = artefact_path(job.out, name, "tflite_int8")
    calibration = job.calibration()
    job.say(f"{name}: full-integer INT8 TFLite ({len(calibration.images)} train images) …")
    flatbuffer = convert(job.model, calibration)
    interp = tflite_interpreter(flatbuffer)
    fn = tflite_predictor(interp)
    own = job.own_threshold(fn)
    int8_logits = predict(fn, job.test_batches)
    info = {
        "method": "full-integer static", "format": "TFLite", "weights": "int8 per-channel",
        "activations": "int8", "io": "int8", "calibration_split": "train",
        "calibration_samples": len(calibration.images),
    }  # fmt: skip
    meta = job.metadata(own, precision="int8", runtime=RUNTIME, quantization=json.dumps(info),
                        **io_metadata(interp, job.size))  # fmt: skip
    write_tflite(int8_path, flatbuffer, meta)
    entries[f"{name}.int8.tflite"] = job.entry(
        int8_path, source=path.name, threshold=own, threshold_fp32=threshold, quantization=info,
        vs_keras=compare_logits(job.keras_logits, int8_logits),
        metrics=job.metrics(int8_logits, own),
    )  # fmt: skip
    return entries
