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
| `flops` | FLOPs of one forward pass at batch 1 (`models.flops.onnx_flops`, FP32 ONNX graph) |
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

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from kd_keras.archs import MIN_IMAGE_SIZE, TOKEN_ARCHS, patch_grid_ok
from kd_keras.data.pipeline import make_dataset
from kd_keras.deploy.quantize import (
    CALIBRATION_BATCH,
    calibration_batches,
)
from kd_keras.deploy.rebuild import (
    calibration_images,
    fresh_candidates,
    rebuild_at_size,
    trained_candidates,
)
from kd_keras.deploy.tables import benchmark_markdown, int8_note, machine_summary
from kd_keras.deploy.timing import FORMATS, MODELS, benchmark_candidates, ratios, untimed_rows
from kd_keras.deprecations import warn_renamed
from kd_keras.errors import KDError
from kd_keras.evaluation.metrics import classification_metrics
from kd_keras.host import describe_host, peak_rss_mb
from kd_keras.io import check_writable_dir, write_json, write_text
from kd_keras.models.flops import FLOPS_METHOD, matmul_peak
from kd_keras.models.registry import STUDENTS, TEACHERS, build_student, build_teacher
from kd_keras.run.folder import RunFolder
from kd_keras.runtimes import PROVIDER_CHOICES, default_threads, predict, softmax

logger = logging.getLogger(__name__)  # progress lines, INFO (none when quiet)


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


def _first_images(split, size: int, n: int) -> np.ndarray:
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
        quiet: log no progress lines (nothing is printed either way: the table is
            `kd_keras.deploy.tables.benchmark_renderables(result)`).
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
    say = (lambda text: None) if quiet else logger.info

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
                rows += untimed_rows(name, arch, formats, f"run has no {name}.keras", size, batch)
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
                rows += untimed_rows(name, arch, formats, note, size, batch)
                continue
            say(f"rebuilding {name} ({arch}) at {size} px …")
            model, note = rebuild_at_size(run, name, model, size, len(class_names))
            note += f"; accuracy not measured (trained at {trained} px)"
            candidates = fresh_candidates(name, arch, model, Path(tmp), formats, threads,
                                          calibration, note, say, provider)  # fmt: skip
            rows += benchmark_candidates(candidates, images, batch, **timing)
    result["rows"] = rows
    result["ratios"] = ratios(rows)
    int8_note(result, formats)
    result["peak_rss_mb"] = peak_rss_mb()
    stem = "benchmark" if size == trained else f"benchmark_{size}px"
    result["json"], result["md"] = str(out / f"{stem}.json"), str(out / f"{stem}.md")
    write_text(result["md"], benchmark_markdown(result))
    write_json(result["json"], result)
    return result


# ---------------------------------------------------------------- benchmark_arch


def benchmark_arch(
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
    `<out>/latency_<N>px.json` and `.md` (default folder `export/`); returns that result.
    `quiet`: log no progress lines (the table is `tables.benchmark_renderables(result)`)."""
    formats = check_settings(warmup, iters, batch, threads, formats, min_time, provider)
    for kind, arch, registry in (("teacher", teacher, TEACHERS), ("student", student, STUDENTS)):
        if arch not in registry:
            raise KDError(f"unknown {kind} architecture {arch!r}; valid: {', '.join(registry)}")
        need = MIN_IMAGE_SIZE.get(arch)
        if image_size < (need or 1):
            raise KDError(f"image size {image_size} is too small for {arch} (needs {need or 1})")
    if student in TOKEN_ARCHS and not patch_grid_ok(image_size, patch_size):
        raise KDError(f"image size {image_size} is not a multiple of patch size {patch_size}")
    threads = threads or default_threads()
    keras_threads = set_tensorflow_threads(threads)
    folder = check_writable_dir(Path(out or "export"))
    say = (lambda text: None) if quiet else logger.info
    say(f"measuring this machine's float32 peak ({threads} threads) …")
    peak = matmul_peak(threads)
    calibration = calibration_images(data, image_size, calibration_samples, CALIBRATION_BATCH)
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
    int8_note(result, formats)
    result["peak_rss_mb"] = peak_rss_mb()
    stem = folder / f"latency_{image_size}px"
    result["json"], result["md"] = str(stem.with_suffix(".json")), str(stem.with_suffix(".md"))
    write_text(result["md"], benchmark_markdown(result))
    write_json(result["json"], result)
    return result


def benchmark_fresh(*args, **kwargs) -> dict[str, Any]:
    """The old name of `benchmark_arch` (deprecated: it goes in the next release)."""
    warn_renamed("benchmark_fresh", "benchmark_arch")
    return benchmark_arch(*args, **kwargs)
