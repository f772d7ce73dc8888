"""Running models: one predictor interface over Keras models and ONNX Runtime sessions.

A predictor is a function from a float32 batch of [0, 255] RGB NHWC pixels to logits (numpy).
Evaluation, export parity checks and the benchmark all call models through it, so every format
is measured the same way. Also here: softmax, console output helpers and file sizes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from kd_keras.errors import KDError

INPUT_NAME = "images"
LOGITS = "logits"
PROBABILITIES = "probabilities"

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


def providers() -> list[str]:
    """CUDA when onnxruntime-gpu sees a GPU, always with the CPU as fallback."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An ONNX Runtime session; a file it cannot load is a `KDError` naming the file."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=providers())
    except Exception as err:  # onnxruntime raises its own exception types for bad files
        raise KDError(f"ONNX Runtime could not load {path}: {str(err).splitlines()[0]}") from err


def onnx_predictor(session) -> Predictor:
    """Logits from an ONNX Runtime session of an exported model."""
    return lambda x: session.run([LOGITS], {INPUT_NAME: np.asarray(x, "float32")})[0]


def load_predictor(path: str | os.PathLike, threads: int | None = None) -> Predictor:
    """A predictor for a `.keras` or `.onnx` file, chosen by its suffix."""
    path = Path(path)
    if path.suffix == ".onnx":
        return onnx_predictor(onnx_session(path, threads))
    if path.suffix == ".keras":
        from kd_keras.models import load_model

        return keras_predictor(load_model(path))
    raise KDError(f"cannot run {path}: expected a .keras or .onnx file")


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


def size_mb(path: Path | None) -> float | None:
    """Size of a file in MB (10^6 bytes), None when there is no file."""
    return round(path.stat().st_size / 1e6, 3) if path is not None and path.is_file() else None


def console(stderr: bool = False):
    """A rich console; 120 columns when output is not a terminal (logs, CI, pipes)."""
    import sys

    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 120)


def printer(quiet: bool) -> Callable[[str], None]:
    """A progress printer on stderr (a no-op when `quiet`)."""
    if quiet:
        return lambda text: None
    err = console(stderr=True)
    return lambda text: err.print(text, highlight=False)


def output_shapes(session) -> list[dict[str, Any]]:
    """Names and shapes of an ONNX Runtime session's outputs."""
    return [
        {"name": o.name, "shape": [d if isinstance(d, int) else str(d) for d in o.shape]}
        for o in session.get_outputs()
    ]
