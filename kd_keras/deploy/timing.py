"""Timing predictors: candidates (a model file in one runtime), latency/throughput measurement,
speed ratios.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kd_keras.deploy.tflite import RUNTIME
from kd_keras.runtimes import (
    default_threads,
    keras_predictor,
    onnx_predictor,
    onnx_session,
    size_mb,
    tflite_interpreter,
    tflite_predictor,
)

FORMATS = ("keras", "onnx", "int8", "tflite", "tflite_int8")


FP32_FORMATS = ("keras", "onnx", "tflite")


MODELS = ("teacher", "student")  # of a run: the pair whose ratio the benchmark is about


# (student format, teacher format): FP32/FP32 per runtime, INT8/INT8, INT8 student/FP32 teacher
RATIOS = (
    ("keras", "keras"), ("onnx", "onnx"), ("tflite", "tflite"), ("int8", "int8"),
    ("tflite_int8", "tflite_int8"), ("int8", "onnx"), ("tflite_int8", "tflite"),
)  # fmt: skip


FORMAT_NAMES = {
    "keras": "Keras FP32", "onnx": "ONNX FP32", "int8": "ONNX INT8", "tflite": "TFLite FP32",
    "tflite_int8": "TFLite INT8",
}  # fmt: skip


EXPORT_FLAGS = {
    "onnx": "--onnx", "int8": "--onnx --int8", "tflite": "--tflite",
    "tflite_int8": "--tflite --int8",
}  # fmt: skip


Loaded = tuple[Callable[[np.ndarray], np.ndarray], dict[str, Any]]


@dataclass
class Candidate:
    """One (model, format) to measure. `load` returns a numpy -> logits function and what runs
    it (`runtime`, `threads`); None when the file is unavailable (`note` says why)."""

    model: str
    arch: str
    fmt: str
    file: Path | None
    params: int | None
    load: Callable[[], Loaded] | None
    threshold: float | None = None
    note: str = ""
    flops: int | None = None


def keras_loader(model) -> Callable[[], Loaded]:
    """Load function of a Keras row: the compiled forward pass and TensorFlow's thread count."""

    def load() -> Loaded:
        import tensorflow as tf

        threads = tf.config.threading.get_intra_op_parallelism_threads()
        device = "GPU" if tf.config.list_logical_devices("GPU") else "CPU"
        info = {"runtime": f"TensorFlow {device}", "threads": threads or default_threads()}
        return keras_predictor(model), info

    return load


def onnx_loader(path: Path, threads: int | None, provider: str) -> Callable[[], Loaded]:
    """Load function of an ONNX row: the session's provider and intra-op thread count."""

    def load() -> Loaded:
        session = onnx_session(path, threads, provider)
        used = session.get_session_options().intra_op_num_threads
        info = {"runtime": session.get_providers()[0], "threads": used or default_threads()}
        return onnx_predictor(session), info

    return load


def tflite_loader(path: Path, threads: int | None) -> Callable[[], Loaded]:
    """Load function of a TFLite row (LiteRT interpreter, `threads` CPU threads)."""

    def load() -> Loaded:
        used = threads or default_threads()
        return tflite_predictor(tflite_interpreter(path, used)), {"runtime": RUNTIME,
                                                                  "threads": used}  # fmt: skip

    return load


def _ms(seconds: list[float], q: float) -> float:
    return round(float(np.percentile(seconds, q)) * 1000, 3)


def _timed_calls(call: Callable[[], Any], min_calls: int, min_time: float) -> list[float]:
    """Durations of calls of `call`: at least `min_calls` and at least `min_time` seconds."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return times


def time_predictor(
    fn: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    batch: int,
    warmup: int = 10,
    iters: int = 200,
    min_time: float = 2.0,
) -> dict[str, Any]:
    """Batch-1 latency (ms: percentiles, mean, sample std) over at least `iters` timed calls and
    at least `min_time` seconds, and batch-`batch` throughput (images/s) over at least 2 calls
    and `min_time` seconds."""
    one = images[:1]
    many = np.resize(images, (batch, *images.shape[1:]))  # repeats images if there are too few
    for _ in range(warmup):
        fn(one)
    times = _timed_calls(lambda: fn(one), iters, min_time)
    fn(many)  # first call at a new batch size traces / allocates
    big = _timed_calls(lambda: fn(many), 2, min_time)
    return {
        "p50_ms": _ms(times, 50),
        "p90_ms": _ms(times, 90),
        "p99_ms": _ms(times, 99),
        "mean_ms": round(float(np.mean(times)) * 1000, 3),
        "std_ms": round(float(np.std(times, ddof=1)) * 1000, 3) if len(times) > 1 else 0.0,
        "calls": len(times),
        "timed_s": round(float(np.sum(times)), 3),
        "throughput_ips": round(batch * len(big) / float(np.sum(big)), 2),
        "throughput_iters": len(big),
    }


def untimed_rows(name, arch, formats, note: str, image_size: int, batch: int) -> list[dict]:
    """One row per format for a model that is not timed, saying why in `note`."""
    return [_row(Candidate(name, arch, f, None, None, None, None, note), image_size, batch)
            for f in formats]  # fmt: skip


def _row(c: Candidate, image_size: int, batch: int) -> dict[str, Any]:
    return {
        "model": c.model, "arch": c.arch, "format": c.fmt,
        "file": str(c.file) if c.file else None, "params": c.params,
        "size_mb": size_mb(c.file), "image_size": image_size, "batch": batch,
        "runtime": None, "threads": None, "p50_ms": None, "p90_ms": None, "p99_ms": None,
        "mean_ms": None, "std_ms": None, "calls": None, "timed_s": None, "throughput_ips": None,
        "throughput_iters": None, "flops": c.flops, "compute_bound_ms": None,
        "x_compute_bound": None, "balanced_accuracy": None, "accuracy": None, "note": c.note,
    }  # fmt: skip


def compute_bound(row: dict[str, Any], peak: dict[str, Any] | None) -> dict[str, Any]:
    """`compute_bound_ms` of a row with FLOPs, and for FP32 rows on the CPU measured at the
    peak's thread count, p50 as a multiple of it (`x_compute_bound`)."""
    if not row["flops"] or not peak:
        return {}
    bound = row["flops"] / (peak["gflops"] * 1e9) * 1000
    out: dict[str, Any] = {"compute_bound_ms": round(bound, 3)}
    on_cpu = row["runtime"] and "CUDA" not in row["runtime"] and "GPU" not in row["runtime"]
    if row["format"] in FP32_FORMATS and on_cpu and row["threads"] == peak["threads"]:
        out["x_compute_bound"] = round(row["p50_ms"] / bound, 2)
    return out


def benchmark_candidates(
    candidates: list[Candidate],
    images: np.ndarray,
    batch: int = 32,
    warmup: int = 10,
    iters: int = 200,
    evaluate: Callable[[Callable, float | None], dict] | None = None,
    say: Callable[[str], None] = lambda text: None,
    min_time: float = 2.0,
    peak: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Measure each candidate in turn (one model in memory at a time) and return table rows;
    `peak` (`kd_keras.models.flops.matmul_peak`) gives each row its compute bound."""
    rows = []
    for c in candidates:
        row = _row(c, int(images.shape[1]), batch)
        if c.load is not None:
            say(f"timing {c.model} ({c.arch}) as {c.fmt} …")
            fn, info = c.load()
            row.update(info)
            row.update(time_predictor(fn, images, batch, warmup, iters, min_time))
            row.update(compute_bound(row, peak))
            if evaluate is not None:
                metrics = evaluate(fn, c.threshold)
                row["balanced_accuracy"] = metrics["balanced_accuracy"]
                row["accuracy"] = metrics["accuracy"]
            del fn
        rows.append(row)
    return rows


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Student / teacher ratios of size, p50 latency and throughput for each format pair of
    `RATIOS` (FP32/FP32, INT8/INT8, INT8 student / FP32 teacher) that was measured."""
    found = {(r["model"], r["format"]): r for r in rows if r["p50_ms"] is not None}
    out = []
    for student_fmt, teacher_fmt in RATIOS:
        s, t = found.get(("student", student_fmt)), found.get(("teacher", teacher_fmt))
        if s is None or t is None:
            continue
        size = round(s["size_mb"] / t["size_mb"], 3) if s["size_mb"] and t["size_mb"] else None
        out.append({
            "student": student_fmt, "teacher": teacher_fmt, "size": size,
            "p50_latency": round(s["p50_ms"] / t["p50_ms"], 3),
            "throughput": round(s["throughput_ips"] / t["throughput_ips"], 3),
        })  # fmt: skip
    return out
