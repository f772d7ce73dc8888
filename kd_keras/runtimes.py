"""Running models: one predictor interface over Keras models, ONNX Runtime sessions and LiteRT
(TFLite) interpreters.

A predictor is a function from a float32 batch of [0, 255] RGB NHWC pixels to logits (numpy).
Evaluation, export parity checks and the benchmark all call models through it, so every format
is measured the same way. Also here: softmax, file metadata and file sizes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from kd_keras.errors import KDError
from kd_keras.models.loading import load_model

INPUT_NAME = "images"
LOGITS = "logits"
PROBABILITIES = "probabilities"
TFLITE_SIGNATURE = "serving_default"
TFLITE_METADATA_KEY = "kd_keras"  # the .tflite metadata entry holding kd_keras's JSON

Predictor = Callable[[np.ndarray], np.ndarray]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64."""
    logits = np.asarray(logits, dtype="float64")
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def keras_predictor(model) -> Predictor:
    """Logits from a `tf.function`-compiled forward pass (no per-call `predict` overhead)."""
    import tensorflow as tf

    forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    return lambda x: np.asarray(forward(tf.convert_to_tensor(x, tf.float32)))


PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
PROVIDER_CHOICES = ("auto", *PROVIDERS)


def default_threads() -> int:
    """The number of CPU cores this process may run on (its affinity mask, else cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def providers(provider: str = "auto") -> list[str]:
    """ONNX Runtime execution providers, in order of preference, for `provider`:

    - `auto`: CUDA when onnxruntime-gpu sees a GPU, always with the CPU as fallback;
    - `cpu`: the CPU only;
    - `cuda`: CUDA (then the CPU for operators CUDA lacks); a `KDError` when ONNX Runtime has no
      CUDA provider (onnxruntime instead of onnxruntime-gpu, or no GPU driver).
    """
    import onnxruntime as ort

    if provider not in PROVIDER_CHOICES:
        raise KDError(f"unknown provider {provider!r}; valid: {', '.join(PROVIDER_CHOICES)}")
    available = ort.get_available_providers()
    if provider == "cuda" and PROVIDERS["cuda"] not in available:
        raise KDError(
            f"provider cuda: ONNX Runtime {ort.__version__} offers only {', '.join(available)} "
            '— install the GPU build (`pip install -e ".[gpu]"`, which replaces onnxruntime by '
            "onnxruntime-gpu) on a machine with an NVIDIA driver"
        )
    wanted = {"auto": ["cuda", "cpu"], "cpu": ["cpu"], "cuda": ["cuda", "cpu"]}[provider]
    return [PROVIDERS[p] for p in wanted if PROVIDERS[p] in available]


def onnx_session(path: str | os.PathLike, threads: int | None = None, provider: str = "auto"):
    """An ONNX Runtime session (`threads` intra-op threads, default ONNX Runtime's choice;
    `provider` as in `providers`); a file it cannot load is a `KDError` naming the file."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    chosen = providers(provider)
    try:
        return ort.InferenceSession(str(path), options, providers=chosen)
    except onnxruntime_errors() as err:
        raise KDError(f"ONNX Runtime could not load {path}: {str(err).splitlines()[0]}") from err


def onnxruntime_errors() -> tuple[type[Exception], ...]:
    """ONNX Runtime's status errors (`onnxruntime.capi.onnxruntime_pybind11_state`; they derive
    from Exception only): a missing file is NoSuchFile, an empty one InvalidArgument, a foreign
    or truncated one InvalidProtobuf; a graph it cannot run fails with the others. Its TypeError
    and ValueError for arguments of the wrong kind are kd_keras bugs and are not among them."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return (state.Fail, state.InvalidArgument, state.NoSuchFile, state.NoModel,
            state.InvalidProtobuf, state.InvalidGraph, state.NotImplemented, state.NotFound,
            state.RuntimeException, state.EngineError, state.EPFail)  # fmt: skip


def onnx_predictor(session) -> Predictor:
    """Logits from an ONNX Runtime session of an exported model."""
    return lambda x: session.run([LOGITS], {INPUT_NAME: np.asarray(x, "float32")})[0]


def tflite_interpreter(source: str | os.PathLike | bytes, threads: int | None = None):
    """A LiteRT interpreter of a file (or of flatbuffer bytes) with `threads` CPU threads
    (default: every core available to this process)."""
    from ai_edge_litert.interpreter import Interpreter

    kwargs = {"model_content": source} if isinstance(source, bytes) else {"model_path": str(source)}
    try:
        return Interpreter(**kwargs, num_threads=threads or default_threads())
    except ValueError as err:  # LiteRT's one type for a missing, empty or foreign file
        what = "TFLite flatbuffer" if isinstance(source, bytes) else source
        reason = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
        raise KDError(f"LiteRT could not load {what}: {reason}") from err


def tflite_io(interp) -> dict[str, Any]:
    """Dtype and (scale, zero point) of the input and of each output of a LiteRT interpreter's
    serving signature (scale 0: not quantised)."""

    def describe(details: dict) -> dict[str, Any]:
        scale, zero = details["quantization"]
        kind = np.dtype(details["dtype"]).name
        return {"dtype": kind, "scale": float(scale), "zero_point": int(zero)}

    runner = interp.get_signature_runner(TFLITE_SIGNATURE)
    inputs, outputs = runner.get_input_details(), runner.get_output_details()
    return {name: describe(d) for name, d in {**inputs, **outputs}.items()}


def _quantize(x: np.ndarray, dtype: np.dtype, scale: float, zero: int) -> np.ndarray:
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale) + zero, info.min, info.max).astype(dtype)


def tflite_predictor(interp) -> Predictor:
    """Logits (float32) from a LiteRT interpreter of an exported `.tflite` file: the input is
    quantised and the logits dequantised when the file is integer-only."""
    runner = interp.get_signature_runner(TFLITE_SIGNATURE)
    quant = tflite_io(interp)
    fin, fout = quant[INPUT_NAME], quant[LOGITS]
    in_dtype = np.dtype(fin["dtype"])

    def run(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, "float32")
        if in_dtype != np.float32:
            x = _quantize(x, in_dtype, fin["scale"], fin["zero_point"])
        logits = runner(**{INPUT_NAME: x})[LOGITS]
        if fout["dtype"] != "float32":
            return ((logits.astype("float32") - fout["zero_point"]) * fout["scale"]).astype(
                "float32"
            )
        return logits

    return run


def load_predictor(
    path: str | os.PathLike, threads: int | None = None, provider: str = "auto"
) -> Predictor:
    """A predictor for a `.keras`, `.onnx` or `.tflite` file, chosen by its suffix."""
    path = Path(path)
    if path.suffix == ".onnx":
        return onnx_predictor(onnx_session(path, threads, provider))
    if path.suffix == ".tflite":
        return tflite_predictor(tflite_interpreter(path, threads))
    if path.suffix == ".keras":
        return keras_predictor(load_model(path))
    raise KDError(f"cannot run {path}: expected a .keras, .onnx or .tflite file")


def predict(fn: Predictor, batches: Iterable) -> np.ndarray:
    """Logits of `fn` over an iterable of image batches, concatenated."""
    return np.concatenate([fn(np.asarray(batch)) for batch in batches])


def predict_probs(fn: Predictor, batches: Iterable, what: str = "model") -> np.ndarray:
    """Class probabilities of predictor `fn` over an iterable of image batches.

    Non-finite outputs (a diverged model) are a `KDError` naming `what`.
    """
    logits = predict(fn, batches)
    bad = int((~np.isfinite(logits)).any(axis=1).sum())
    if bad:
        raise KDError(
            f"{what} outputs non-finite logits for {bad} of {len(logits)} images (training "
            "diverged?); lower the learning rate and train it again"
        )
    return softmax(logits)


def compare_logits(reference: np.ndarray, candidate: np.ndarray) -> dict[str, Any]:
    """Largest absolute logit difference and argmax agreement of two models' logits."""
    diff = np.abs(reference - candidate)
    return {
        "n": int(len(reference)),
        "max_abs_diff": float(diff.max()) if np.isfinite(diff).all() else float("inf"),
        "argmax_agreement": float((reference.argmax(1) == candidate.argmax(1)).mean()),
    }


def read_tflite_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The kd_keras metadata of a `.tflite` file (empty when it has none)."""
    import json
    import struct

    from ai_edge_litert import schema_py_generated as schema

    data = Path(path).read_bytes()
    try:
        model = schema.Model.GetRootAs(data, 0)
        for i in range(model.MetadataLength()):
            entry = model.Metadata(i)
            if entry.Name() == TFLITE_METADATA_KEY.encode():
                buffer = model.Buffers(entry.Buffer())
                raw = buffer.DataAsNumpy() if buffer is not None else 0
                if isinstance(raw, int):  # flatbuffers' 0 for a vector that is not there
                    raise KDError(f"{path} is not a readable .tflite file: its "
                                  f"{TFLITE_METADATA_KEY} metadata entry has no data")  # fmt: skip
                return json.loads(raw.tobytes().decode("utf-8"))
    # what flatbuffers raised on ~2,000 truncated and bit-flipped files: struct.error (an offset
    # past the end), TypeError (an offset out of range, `enforce_number`), ValueError (a vector
    # past the end; JSON and UTF-8 errors of the metadata)
    except (struct.error, TypeError, ValueError) as err:
        raise KDError(f"{path} is not a readable .tflite file: {err}") from err
    return {}


def file_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The kd_keras metadata of an exported file, `.tflite` or `.onnx`; a file that is not
    what its suffix says is a `KDError` naming it."""
    if Path(path).suffix == ".tflite":
        return read_tflite_metadata(path)
    from google.protobuf.message import DecodeError

    try:
        return read_metadata(path)
    except (DecodeError, OSError) as err:  # onnx.load on a foreign file; an unreadable one
        raise KDError(f"{path} is not a readable ONNX file: {err}") from err


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata_props of an ONNX file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def size_mb(path: Path | None) -> float | None:
    """Size of a file in MB (10^6 bytes), None when there is no file."""
    return round(path.stat().st_size / 1e6, 3) if path is not None and path.is_file() else None


def output_shapes(session) -> list[dict[str, Any]]:
    """Names and shapes of an ONNX Runtime session's outputs."""
    return [
        {"name": o.name, "shape": [d if isinstance(d, int) else str(d) for d in o.shape]}
        for o in session.get_outputs()
    ]
