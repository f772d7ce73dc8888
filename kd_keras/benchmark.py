"""Benchmark a run's teacher and student: size, latency, throughput and accuracy per format.

One row per (model, format), for the teacher and the student, formats `keras` (the `.keras`
file), `onnx` (FP32) and `int8` (ONNX Runtime), `tflite` and `tflite_int8` (full-integer, LiteRT
interpreter): the files `export_run` wrote to `export/<run>/`.

| field | meaning |
|---|---|
| `params` | parameters of the Keras model (the same for its exported files) |
| `size_mb` | size on disk of that very file (10^6 bytes) |
| `p50_ms`, `p90_ms`, `p99_ms`, `mean_ms`, `std_ms` | latency at batch 1 over `calls` timed calls |
| `calls`, `timed_s` | timed calls: at least `iters` AND at least `min_time` seconds (time-based) |
| `throughput_ips` | images/s at batch `batch`: 1 untimed call, then >= 2 calls, >= `min_time` s |
| `threads` | CPU threads the runtime was given (read back from the session / interpreter / TF) |
| `runtime` | what ran it: TensorFlow, the ONNX Runtime execution provider, LiteRT |
| `flops` | FLOPs of one forward pass at batch 1 (`kd_keras.compute.onnx_flops`, FP32 ONNX graph) |
| `compute_bound_ms` | flops / the machine's float32 peak measured in the same run (`peak`) |
| `x_compute_bound` | FP32 rows on the CPU: p50 / compute bound (1.0 = the machine's peak) |
| `balanced_accuracy`, `accuracy` | on the test split, with the model's decision threshold |
| `note` | why a value is missing, or how the model was rebuilt |

Timing is time-based so percentiles are stable whatever the model's speed: a fast model gets
many calls, a slow one at least `iters` (defaults: 200 calls and 2 s per row, whichever comes
later). Student / teacher ratios (size, p50, throughput) are reported FP32/FP32 (each runtime),
INT8/INT8 and INT8-student/FP32-teacher.

Keras is timed through a `tf.function`-compiled forward pass, not `model.predict`: `predict`
builds a data pipeline and runs callbacks on every call, which at batch 1 costs more than the
model. `provider` chooses ONNX Runtime's execution provider (`auto`: CUDA when onnxruntime-gpu
sees a GPU, else the CPU; `cpu`; `cuda`). `threads` (default: every core this process may use)
is given to ONNX Runtime (`intra_op_num_threads`), LiteRT (`num_threads`), the peak measurement
and, if TensorFlow has not started yet, TensorFlow's intra-op pool.

`image_size` other than the trained size measures the same architectures at another resolution
(e.g. 224 px for deployment): each model is rebuilt at that size and takes the trained weights
when their shapes allow (CNNs: yes; ViT/DeiT position embeddings are tied to the trained patch
grid: no, so they get fresh weights — latency does not depend on weight values). The rebuilt
models are converted (ONNX, TFLite, INT8 as asked) in a temporary folder. Accuracy is not
measured then (a model evaluated at a size it was not trained at says nothing useful), and the
row says so. Results go to `export/<run>/benchmark.json` and `benchmark.md`
(`benchmark_<N>px.*` for another size, so the trained-size table is never overwritten).

Every result also records `host` (`kd_keras.host.describe_host`: CPU, ISA level, oneDNN,
threads, the float32 peak), `peak_rss_mb` (the command's own peak resident memory, VmHWM) and,
when INT8 is measured on a CPU without VNNI, `int8_speed_note`: INT8 is not expected to be
faster than FP32 there (ONNX Runtime's U8S8 kernels multiply in 16 bits without VNNI).
Calibration for the rebuilt models uses small batches (`export.CALIBRATION_BATCH`): ONNX
Runtime's calibration memory grows with the batch (a 224 px ResNet50 at batch 64 took ~13 GB).
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kd_keras.compute import FLOPS_METHOD, matmul_peak, onnx_flops
from kd_keras.errors import KDError, check_writable_dir, write_json, write_text
from kd_keras.export import (
    CALIBRATION_BATCH,
    calibration_batches,
    quantization_plan,
    quantize,
    to_onnx,
)
from kd_keras.host import peak_rss_mb
from kd_keras.inference import (
    PROVIDER_CHOICES,
    console,
    default_threads,
    file_metadata,
    keras_predictor,
    onnx_predictor,
    onnx_session,
    predict,
    printer,
    size_mb,
    tflite_interpreter,
    tflite_predictor,
)
from kd_keras.run import RunFolder, artefact_path

FORMATS = ("keras", "onnx", "int8", "tflite", "tflite_int8")
FP32_FORMATS = ("keras", "onnx", "tflite")
MODELS = ("teacher", "student")  # of a run: the pair whose ratio the benchmark is about
TOKEN_ARCHS = ("vit_small", "deit_small")
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
    from kd_keras.tflite import RUNTIME

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


def _untimed_rows(name, arch, formats, note: str, image_size: int, batch: int) -> list[dict]:
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
    `peak` (`kd_keras.compute.matmul_peak`) gives each row its compute bound."""
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


def _ratio_label(r: dict[str, Any]) -> str:
    return f"student {FORMAT_NAMES[r['student']]} / teacher {FORMAT_NAMES[r['teacher']]}"


def ratio_lines(result: dict[str, Any]) -> list[str]:
    if not result["ratios"]:
        return []
    lines = ["student / teacher (size and latency: below 1 is better; throughput: above 1)"]
    for r in result["ratios"]:
        size = "—" if r["size"] is None else f"{r['size']:.2f}×"
        lines.append(
            f"  {_ratio_label(r)}: size {size}, p50 latency {r['p50_latency']:.2f}×, "
            f"throughput {r['throughput']:.2f}×"
        )
    return lines


def _num(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _cells(row: dict[str, Any]) -> list[str]:
    mean = (
        "—" if row["mean_ms"] is None else f"{row['mean_ms']:.2f} ± {row['std_ms']:.2f}"
    )  # fmt: skip
    return [
        row["model"], row["arch"], row["format"], row["runtime"] or "—",
        _num(row["threads"], "d"),
        _num(None if row["params"] is None else row["params"] / 1e6, ".2f"),
        _num(row["size_mb"], ".1f"), _num(None if not row["flops"] else row["flops"] / 1e9, ".2f"),
        _num(row["p50_ms"], ".2f"), _num(row["p90_ms"], ".2f"), _num(row["p99_ms"], ".2f"),
        mean, _num(row["calls"], "d"), _num(row["x_compute_bound"], ".2f"),
        _num(row["throughput_ips"], ".1f"), _num(row["balanced_accuracy"], ".3f"),
    ]  # fmt: skip


def _headers(result: dict[str, Any]) -> list[str]:
    return [
        "model", "arch", "format", "runtime", "threads", "params M", "size MB", "GFLOPs",
        "p50 ms", "p90 ms", "p99 ms", "mean ± std ms", "calls", "× bound",
        f"img/s @{result['batch']}", "bal. acc",
    ]  # fmt: skip


LEFT_COLUMNS = 4  # model, arch, format, runtime


def _notes(result: dict[str, Any]) -> list[str]:
    return [f"{r['model']} {r['format']}: {r['note']}" for r in result["rows"] if r["note"]]


def _settings(result: dict[str, Any]) -> str:
    peak = result.get("peak")
    bound = (
        f"× bound = FP32 p50 / (GFLOPs / {peak['gflops']} GFLOP/s, the float32 peak measured "
        f"in this run: {peak['method']}); "
        if peak else ""
    )  # fmt: skip
    return (
        f"{result['image_size']} px, latency at batch 1 ({result['warmup']} warm-up calls, then "
        f"at least {result['iters']} timed calls and {result['min_time']:g} s per row), "
        f"throughput at batch {result['batch']}; ONNX Runtime {result['onnxruntime']} "
        f"(provider {result['provider']}), threads {result['threads']}; {bound}"
        f"GFLOPs: {FLOPS_METHOD}; {result['machine']}"
    )


def benchmark_table(result: dict[str, Any]):
    from rich.table import Table

    table = Table(title=result["title"], caption=_settings(result))
    for i, header in enumerate(_headers(result)):
        table.add_column(header, justify="left" if i < LEFT_COLUMNS else "right")
    for row in result["rows"]:
        table.add_row(*_cells(row))
    return table


def _int8_note(result: dict[str, Any], formats) -> None:
    """When INT8 was measured on a CPU without VNNI, say plainly that it cannot be expected
    to beat FP32 here (the host itself is in the result header)."""
    from kd_keras.export import int8_speed_note

    note = int8_speed_note() if {"int8", "tflite_int8"} & set(formats) else None
    if note:
        result["int8_speed_note"] = note


def _speed_lines(result: dict[str, Any]) -> list[str]:
    return [result["int8_speed_note"]] if result.get("int8_speed_note") else []


def _memory_lines(result: dict[str, Any]) -> list[str]:
    if result.get("peak_rss_mb") is None:
        return []
    return [f"peak resident memory of this command: {result['peak_rss_mb']:.0f} MB (VmHWM)"]


def print_benchmark(result: dict[str, Any]) -> None:
    out = console()
    out.print(benchmark_table(result))
    lines = ratio_lines(result) + _notes(result) + _speed_lines(result) + _memory_lines(result)
    if result.get("json"):
        lines.append(f"written to {result['json']} and {result['md']}")
    for line in lines:
        out.print(line, highlight=False, markup=False)


def benchmark_markdown(result: dict[str, Any]) -> str:
    headers = _headers(result)
    lines = [
        f"# {result['title']}",
        "",
        _settings(result),
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" if i < LEFT_COLUMNS else "---:" for i in range(len(headers))) + "|",
    ]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in result["rows"]]
    extra = ratio_lines(result) + _notes(result) + _speed_lines(result) + _memory_lines(result)
    if extra:
        lines += [""] + [f"- {line}" for line in extra]
    return "\n".join(lines) + "\n"


def machine_summary(peak: dict[str, Any] | None = None) -> str:
    """One line naming the host (CPU, ISA level, threads, oneDNN, `peak`) and Python."""
    from kd_keras.host import describe_host, host_line

    return (
        f"{host_line(describe_host(peak))}; {platform.system()}, Python {platform.python_version()}"
    )


def set_tensorflow_threads(threads: int | None) -> str:
    """TensorFlow fixes its thread pools when it starts; after that the setting is refused."""
    if not threads:
        return "auto"
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        return "auto (TensorFlow was already running)"
    return str(threads)


def result_header(
    title: str, image_size: int, warmup: int, iters: int, batch: int, threads: int,
    min_time: float = 2.0, provider: str = "auto", peak: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The settings and environment every benchmark result starts with."""
    import onnxruntime as ort
    import tensorflow as tf

    from kd_keras.host import describe_host

    return {
        "title": title,
        "image_size": image_size,
        "warmup": warmup,
        "iters": iters,
        "min_time": min_time,
        "batch": batch,
        "threads": threads,
        "provider": provider,
        "peak": peak,
        "flops_method": FLOPS_METHOD,
        "onnxruntime": ort.__version__,
        "tensorflow": tf.__version__,
        "machine": machine_summary(peak),
        "host": describe_host(peak),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def check_settings(
    warmup: int, iters: int, batch: int, threads: int | None, formats,
    min_time: float = 2.0, provider: str = "auto",
) -> tuple:  # fmt: skip
    """The formats to measure, once every setting is known to be valid (else a KDError)."""
    formats = tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise KDError(f"unknown benchmark format {unknown[0]!r}; valid: {', '.join(FORMATS)}")
    if provider not in PROVIDER_CHOICES:
        raise KDError(f"unknown provider {provider!r}; valid: {', '.join(PROVIDER_CHOICES)}")
    bad = warmup < 0 or iters < 1 or batch < 1 or min_time < 0
    if bad or (threads is not None and threads < 1):
        raise KDError(
            f"need warmup >= 0, iters >= 1, batch >= 1, threads >= 1, min_time >= 0; got "
            f"warmup={warmup}, iters={iters}, batch={batch}, threads={threads}, "
            f"min_time={min_time}"
        )
    return formats


# ---------------------------------------------------------------- benchmark_run


def rebuild_at_size(run: RunFolder, name: str, model, size: int, num_classes: int):
    """The same architecture at `size` px, with the trained weights when their shapes allow."""
    from kd_keras.config import MIN_IMAGE_SIZE
    from kd_keras.models import build_student, build_teacher

    arch = run.arch(name)
    need = MIN_IMAGE_SIZE.get(arch)
    if need and size < need:
        raise KDError(f"image size {size} is too small for {name} {arch} (needs at least {need})")
    if name == "teacher":
        fresh = build_teacher(arch, num_classes, size, tiny=run.cfg.teacher.variant == "tiny")
    else:
        patch = run.cfg.student.patch_size
        if arch in TOKEN_ARCHS and (size % patch or size // patch < 2):
            raise KDError(
                f"image size {size} is not a multiple of student.patch_size = {patch} "
                "(or gives fewer than 2x2 patches)"
            )
        fresh = build_student(arch, num_classes, size, patch_size=patch,
                              tiny=run.cfg.student.variant == "tiny")  # fmt: skip
    try:
        fresh.set_weights(model.get_weights())
    except ValueError as err:
        reason = str(err).strip().splitlines()[0][:120]
        return fresh, (
            f"rebuilt at {size} px with fresh weights: the trained weights do not fit ({reason}); "
            "latency does not depend on weight values"
        )
    return fresh, f"rebuilt at {size} px with the trained weights"


def _stale(path: Path, source: Path) -> bool:
    return path.stat().st_mtime < source.stat().st_mtime


def _loader(fmt: str, path: Path, threads: int, provider: str) -> Callable[[], Loaded]:
    if fmt in ("tflite", "tflite_int8"):
        return tflite_loader(path, threads)
    return onnx_loader(path, threads, provider)


def _file_candidate(name, arch, fmt, path, params, threshold, source, size, threads, provider):
    """An exported file of the run (a note instead of a loader when it is missing or stale)."""
    flag = EXPORT_FLAGS[fmt]
    if not path.is_file():
        note = f"no {path.name}: run `python cli.py export {flag}` first"
        fp32 = path.with_name(path.name.replace(".int8.onnx", ".onnx"))
        if fmt == "int8" and fp32.is_file() and quantization_plan(fp32)["method"] == "none":
            note = quantization_plan(fp32)["reason"]
        return Candidate(name, arch, fmt, None, params, None, threshold, note)
    meta = file_metadata(path)
    exported = meta.get("image_size")
    if exported is not None and exported != str(size):
        note = f"{path.name} was exported at {exported} px, not {size} px: re-run export"
        return Candidate(name, arch, fmt, path, params, None, threshold, note)
    note = ""
    if _stale(path, source):
        note = f"{path.name} is older than {source.name}: re-run `python cli.py export {flag}`"
    if meta.get("decision_threshold"):  # INT8 files carry their own validation-chosen threshold
        threshold = float(meta["decision_threshold"])
    load = _loader(fmt, path, threads, provider)
    return Candidate(name, arch, fmt, path, params, load, threshold, note)


def model_flops(onnx_path: Path | None) -> int | None:
    """FLOPs at batch 1 from an FP32 ONNX file (None without one)."""
    if onnx_path is None or not onnx_path.is_file():
        return None
    return onnx_flops(onnx_path)["flops"]


def trained_candidates(
    run: RunFolder, name: str, model, source: Path, out: Path, formats, threads: int,
    provider: str = "auto",
) -> list[Candidate]:  # fmt: skip
    """The run's own files at the trained size: the .keras file and the exported files."""
    from kd_keras.models import image_size_of

    arch, params, threshold = model.name, int(model.count_params()), run.threshold(name)
    size = image_size_of(model)
    candidates = []
    if "keras" in formats:
        candidates.append(
            Candidate(name, arch, "keras", source, params, keras_loader(model), threshold)
        )
    for fmt in FORMATS[1:]:
        if fmt in formats:
            path = artefact_path(out, name, fmt)
            candidates.append(_file_candidate(name, arch, fmt, path, params, threshold, source,
                                              size, threads, provider))  # fmt: skip
    flops = model_flops(artefact_path(out, name, "onnx"))
    for c in candidates:
        c.flops = flops
    return candidates


def _first_images(split, size: int, n: int) -> np.ndarray:
    from kd_keras.data import make_dataset

    head = split.subset(np.arange(min(n, len(split))))
    return next(make_dataset(head, size, n, labels=False, cache=False).as_numpy_iterator())


def benchmark_run(
    run_dir: str | os.PathLike | None = None,
    export_dir: str | os.PathLike | None = None,
    image_size: int | None = None,
    warmup: int = 10,
    iters: int = 200,
    batch: int = 32,
    threads: int | None = None,
    formats: tuple[str, ...] = FORMATS,
    limit: int | None = None,
    quiet: bool = False,
    min_time: float = 2.0,
    provider: str = "auto",
) -> dict[str, Any]:
    """Benchmark a run's teacher and student (see module docstring); returns benchmark.json.

    Args:
        run_dir: run folder; None picks the most recent run under `runs/`.
        export_dir: parent of the per-run export folder holding the exported files and
            receiving the results (default `export.dir`, else `export`).
        image_size: measure at this size instead of the trained one (no accuracy then).
        warmup: untimed batch-1 calls per row.
        iters, min_time: at least `iters` timed batch-1 calls and `min_time` seconds per row.
        batch: batch size of the throughput measurement.
        threads: CPU threads of every runtime and of the peak measurement (default: every core
            this process may use).
        formats: any of `keras`, `onnx`, `int8`, `tflite`, `tflite_int8`.
        limit: evaluate accuracy on the first `limit` test images only.
        quiet: do not print progress and the table.
        provider: ONNX Runtime execution provider: `auto`, `cpu` or `cuda`.
    """
    formats = check_settings(warmup, iters, batch, threads, formats, min_time, provider)
    threads = threads or default_threads()
    keras_threads = set_tensorflow_threads(threads)
    run = RunFolder.find(run_dir)
    run.check_consistent()
    out = check_writable_dir(run.export_dir(export_dir))
    trained = int(run.report.get("image_size") or run.cfg.data.image_size)
    size = int(image_size or trained)
    say = printer(quiet)

    from kd_keras.data import make_dataset
    from kd_keras.evaluate import classification_metrics
    from kd_keras.inference import softmax

    splits = run.load_splits()
    class_names = run.report.get("class_names") or splits.class_names
    test = splits.test.subset(np.arange(min(limit, len(splits.test)))) if limit else splits.test
    images = _first_images(splits.test, size, batch)

    def evaluate(fn, threshold):
        batches = make_dataset(test, size, run.cfg.data.batch_size, labels=False, cache=False)
        probs = softmax(predict(fn, batches))
        return classification_metrics(test.labels, probs, class_names, threshold)

    calibration = None
    if size != trained and {"int8", "tflite_int8"} & set(formats):
        calibration = calibration_batches(splits.train, size, run.cfg.export.calibration_samples,
                                          run.cfg.run.seed)  # fmt: skip

    say(f"measuring this machine's float32 peak ({threads} threads) …")
    peak = matmul_peak(threads)
    result = result_header(f"Benchmark of run {run.name}", size, warmup, iters, batch, threads,
                           min_time, provider, peak)  # fmt: skip
    result.update(run=str(run.path.resolve()), trained_image_size=trained,
                  keras_threads=keras_threads, formats=list(formats))  # fmt: skip
    timing = dict(warmup=warmup, iters=iters, say=say, min_time=min_time, peak=peak)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kd_keras_bench_") as tmp:
        for name in MODELS:
            source, arch = run.model_file(name), run.arch(name)
            if source is None:
                rows += _untimed_rows(name, arch, formats, f"run has no {name}.keras", size, batch)
                continue
            model = run.load_model(name)
            if size == trained:
                candidates = trained_candidates(run, name, model, source, out, formats, threads,
                                                provider)  # fmt: skip
                rows += benchmark_candidates(candidates, images, batch, evaluate=evaluate, **timing)
                continue
            if name == "teacher" and run.cfg.teacher.from_user:
                note = ("the user's teacher (teacher.path / teacher.ensemble) is only timed at "
                        f"its trained size, {trained} px")  # fmt: skip
                rows += _untimed_rows(name, arch, formats, note, size, batch)
                continue
            say(f"rebuilding {name} ({arch}) at {size} px …")
            model, note = rebuild_at_size(run, name, model, size, len(class_names))
            note += f"; accuracy not measured (trained at {trained} px)"
            candidates = fresh_candidates(name, model.name, model, Path(tmp), formats, threads,
                                          calibration, note, say, provider)  # fmt: skip
            rows += benchmark_candidates(candidates, images, batch, **timing)
    result["rows"] = rows
    result["ratios"] = ratios(rows)
    _int8_note(result, formats)
    result["peak_rss_mb"] = peak_rss_mb()
    stem = "benchmark" if size == trained else f"benchmark_{size}px"
    result["json"], result["md"] = str(out / f"{stem}.json"), str(out / f"{stem}.md")
    write_text(result["md"], benchmark_markdown(result))
    write_json(result["json"], result)
    if not quiet:
        print_benchmark(result)
    return result


def fresh_candidates(
    name: str,
    arch: str,
    model,
    folder: Path,
    formats: tuple[str, ...],
    threads: int,
    calibration=None,
    note: str = "",
    say: Callable[[str], None] = lambda text: None,
    provider: str = "auto",
) -> list[Candidate]:
    """Save `model` to `folder` in every format asked (.keras, .onnx, .int8.onnx, .tflite,
    .int8.tflite) and wrap each file; FLOPs come from the FP32 ONNX file, written whenever an
    exported format is asked (a Keras-only benchmark has no FLOPs)."""
    from kd_keras.models import image_size_of
    from kd_keras.tflite import convert, write_tflite

    size = image_size_of(model)
    params = int(model.count_params())
    path = {fmt: artefact_path(folder, f"{name}_{size}px", fmt) for fmt in FORMATS[1:]}
    candidates = []
    if "keras" in formats:
        keras_path = folder / f"{name}_{size}px.keras"
        model.save(keras_path)
        candidates.append(Candidate(name, arch, "keras", keras_path, params, keras_loader(model),
                                    None, note))  # fmt: skip
    if set(formats) - {"keras"}:  # the FP32 ONNX file gives every row its FLOPs
        say(f"converting {name} ({arch}, {size} px) to ONNX …")
        to_onnx(model, path["onnx"])
    needs_calibration = {"int8", "tflite_int8"} & set(formats)
    if needs_calibration and calibration is None:
        raise KDError("static INT8 quantization needs calibration images")
    for fmt in FORMATS[1:]:
        if fmt not in formats:
            continue
        extra = ""
        if fmt == "int8":
            plan = quantization_plan(path["onnx"])
            if plan["method"] == "none":
                candidates.append(Candidate(name, arch, fmt, None, params, None, None,
                                            plan["reason"]))  # fmt: skip
                continue
            say(f"quantizing {name} to INT8 ({plan['method']}) …")
            quantize(path["onnx"], path[fmt], plan["method"], calibration)
            extra = f"INT8 {plan['method']}"
        elif fmt.startswith("tflite"):
            say(f"converting {name} to TFLite ({fmt}) …")
            write_tflite(path[fmt], convert(model, calibration if fmt == "tflite_int8" else None),
                         {"image_size": str(size)})  # fmt: skip
        candidates.append(Candidate(name, arch, fmt, path[fmt], params,
                                    _loader(fmt, path[fmt], threads, provider), None,
                                    "; ".join(x for x in (note, extra) if x)))  # fmt: skip
    flops = model_flops(path["onnx"])
    for c in candidates:
        c.flops = flops
    return candidates


# ---------------------------------------------------------------- benchmark_fresh


def _calibration_images(data: str | os.PathLike | None, size: int, n: int, batch: int, seed=0):
    """Real training images of a MedMNIST-layout .npz, else uniform random pixels (fine for
    timing; INT8 accuracy is not measured on fresh models)."""
    if data is None:
        images = np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")
        return [images[i : i + batch] for i in range(0, n, batch)]
    from kd_keras.data import load_npz

    path = Path(data)
    if not path.is_file():
        raise KDError(f"calibration data file not found: {path}")
    _, splits = load_npz(path, None)
    return calibration_batches(splits["train"], size, n, seed, batch)


def benchmark_fresh(
    teacher: str = "resnet50",
    student: str = "resnet18",
    image_size: int = 224,
    num_classes: int = 2,
    patch_size: int = 16,
    data: str | os.PathLike | None = None,
    calibration_samples: int = 128,
    out: str | os.PathLike | None = None,
    warmup: int = 10,
    iters: int = 200,
    batch: int = 32,
    threads: int | None = None,
    formats: tuple[str, ...] = FORMATS,
    quiet: bool = False,
    min_time: float = 2.0,
    provider: str = "auto",
) -> dict[str, Any]:
    """Latency of freshly built (untrained) teacher and student architectures at `image_size`:
    latency does not depend on weight values, so no trained run is needed. Static INT8
    calibrates on `data` (a MedMNIST .npz) when given, else on random pixels. Writes
    `<out>/latency_<N>px.json` and `.md` (default folder `export/`)."""
    from kd_keras.config import MIN_IMAGE_SIZE
    from kd_keras.models import STUDENTS, TEACHERS, build_student, build_teacher

    formats = check_settings(warmup, iters, batch, threads, formats, min_time, provider)
    for kind, arch, registry in (("teacher", teacher, TEACHERS), ("student", student, STUDENTS)):
        if arch not in registry:
            raise KDError(f"unknown {kind} architecture {arch!r}; valid: {', '.join(registry)}")
        need = MIN_IMAGE_SIZE.get(arch)
        if image_size < (need or 1):
            raise KDError(f"image size {image_size} is too small for {arch} (needs {need or 1})")
    if student in TOKEN_ARCHS and (image_size % patch_size or image_size // patch_size < 2):
        raise KDError(f"image size {image_size} is not a multiple of patch size {patch_size}")
    threads = threads or default_threads()
    keras_threads = set_tensorflow_threads(threads)
    folder = check_writable_dir(Path(out or "export"))
    say = printer(quiet)
    say(f"measuring this machine's float32 peak ({threads} threads) …")
    peak = matmul_peak(threads)
    calibration = _calibration_images(data, image_size, calibration_samples, CALIBRATION_BATCH)
    first = next(iter(calibration))
    images = np.resize(np.asarray(first, "float32"), (batch, image_size, image_size, 3))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kd_keras_latency_") as tmp:
        for name, arch in (("teacher", teacher), ("student", student)):
            say(f"building {name} ({arch}) at {image_size} px …")
            if name == "teacher":
                model = build_teacher(arch, num_classes, image_size)
            else:
                model = build_student(arch, num_classes, image_size, patch_size=patch_size)
            candidates = fresh_candidates(name, arch, model, Path(tmp), formats, threads,
                                          calibration, "fresh weights", say, provider)  # fmt: skip
            rows += benchmark_candidates(candidates, images, batch, warmup, iters, None, say,
                                         min_time, peak)  # fmt: skip
            del model, candidates
    for row in rows:
        row["file"] = Path(row["file"]).name if row["file"] else None  # temp files are gone
    title = f"Latency at {image_size} px: {teacher} vs {student} (fresh weights)"
    result = result_header(title, image_size, warmup, iters, batch, threads, min_time, provider,
                           peak)  # fmt: skip
    result.update(keras_threads=keras_threads, formats=list(formats),
                  calibration=str(data) if data else "random pixels", rows=rows,
                  ratios=ratios(rows))  # fmt: skip
    _int8_note(result, formats)
    result["peak_rss_mb"] = peak_rss_mb()
    stem = folder / f"latency_{image_size}px"
    result["json"], result["md"] = str(stem.with_suffix(".json")), str(stem.with_suffix(".md"))
    write_text(result["md"], benchmark_markdown(result))
    write_json(result["json"], result)
    if not quiet:
        print_benchmark(result)
    return result
