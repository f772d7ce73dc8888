"""Benchmark a run's teacher and student: size, latency, throughput and accuracy per format.

One row per (model, format), for the teacher and the student, formats `keras` (the `.keras`
file), `onnx` (FP32) and `int8` (the files `export_run` wrote to `export/<run>/`):

| field | meaning |
|---|---|
| `params` | parameters of the Keras model (the same for its ONNX and INT8 files) |
| `size_mb` | size on disk of that very file (10^6 bytes) |
| `p50_ms`, `p90_ms`, `p99_ms` | latency at batch 1: `warmup` untimed calls, then `iters` timed |
| `throughput_ips` | images/s at batch `batch`: 1 untimed call, `throughput_iters` timed |
| `balanced_accuracy`, `accuracy` | on the test split, with the model's decision threshold |
| `note` | why a value is missing, or how the model was rebuilt |

`throughput_iters` = max(2, iters // 5), so a large batch does not multiply the run time by 50.

Keras is timed through a `tf.function`-compiled forward pass, not `model.predict`: `predict`
builds a data pipeline and runs callbacks on every call, which at batch 1 costs more than the
model. ONNX Runtime uses CUDA when `onnxruntime-gpu` sees a GPU, else the CPU; `threads` sets its
`intra_op_num_threads` and, if TensorFlow has not started yet, TensorFlow's intra-op pool.

`image_size` other than the trained size measures the same architectures at another resolution
(e.g. 224 px for deployment): each model is rebuilt at that size and takes the trained weights
when their shapes allow (CNNs: yes; ViT/DeiT position embeddings are tied to the trained patch
grid: no, so they get fresh weights — latency does not depend on weight values). The rebuilt
models are converted to ONNX (and INT8) in a temporary folder. Accuracy is not measured then (a
model evaluated at a size it was not trained at says nothing useful), and the row says so.
Results go to `export/<run>/benchmark.json` and `benchmark.md` (`benchmark_<N>px.*` for another
size, so the trained-size table is never overwritten).
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

from kd_keras.errors import KDError, check_writable_dir, write_json, write_text
from kd_keras.export import (
    calibration_batches,
    quantization_method,
    quantize,
    read_metadata,
    to_onnx,
)
from kd_keras.inference import (
    console,
    keras_predictor,
    onnx_predictor,
    onnx_session,
    predict,
    printer,
    providers,
    size_mb,
)
from kd_keras.run import RunFolder

FORMATS = ("keras", "onnx", "int8")
MODELS = ("teacher", "student")  # of a run: the pair whose ratio the benchmark is about
TOKEN_ARCHS = ("vit_small", "deit_small")
RATIOS = (("keras", "keras"), ("onnx", "onnx"), ("int8", "onnx"))


@dataclass
class Candidate:
    """One (model, format) to measure. `load` returns a numpy -> logits function; None when the
    file is unavailable (`note` says why)."""

    model: str
    arch: str
    fmt: str
    file: Path | None
    params: int | None
    load: Callable[[], Callable[[np.ndarray], np.ndarray]] | None
    threshold: float | None = None
    note: str = ""


def _ms(seconds: list[float], q: float) -> float:
    return round(float(np.percentile(seconds, q)) * 1000, 3)


def time_predictor(
    fn: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    batch: int,
    warmup: int = 10,
    iters: int = 50,
) -> dict[str, Any]:
    """Batch-1 latency percentiles (ms) and batch-`batch` throughput (images/s)."""
    one = images[:1]
    many = np.resize(images, (batch, *images.shape[1:]))  # repeats images if there are too few
    for _ in range(warmup):
        fn(one)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn(one)
        times.append(time.perf_counter() - start)
    fn(many)  # first call at a new batch size traces / allocates
    n = max(2, iters // 5)
    start = time.perf_counter()
    for _ in range(n):
        fn(many)
    elapsed = time.perf_counter() - start
    return {
        "p50_ms": _ms(times, 50),
        "p90_ms": _ms(times, 90),
        "p99_ms": _ms(times, 99),
        "throughput_ips": round(batch * n / elapsed, 2),
        "throughput_iters": n,
    }


def _row(c: Candidate, image_size: int, batch: int) -> dict[str, Any]:
    return {
        "model": c.model, "arch": c.arch, "format": c.fmt,
        "file": str(c.file) if c.file else None, "params": c.params,
        "size_mb": size_mb(c.file), "image_size": image_size, "batch": batch,
        "p50_ms": None, "p90_ms": None, "p99_ms": None, "throughput_ips": None,
        "throughput_iters": None, "balanced_accuracy": None, "accuracy": None, "note": c.note,
    }  # fmt: skip


def benchmark_candidates(
    candidates: list[Candidate],
    images: np.ndarray,
    batch: int = 32,
    warmup: int = 10,
    iters: int = 50,
    evaluate: Callable[[Callable, float | None], dict] | None = None,
    say: Callable[[str], None] = lambda text: None,
) -> list[dict[str, Any]]:
    """Measure each candidate in turn (one model in memory at a time) and return table rows."""
    rows = []
    for c in candidates:
        row = _row(c, int(images.shape[1]), batch)
        if c.load is not None:
            say(f"timing {c.model} ({c.arch}) as {c.fmt} …")
            fn = c.load()
            row.update(time_predictor(fn, images, batch, warmup, iters))
            if evaluate is not None:
                metrics = evaluate(fn, c.threshold)
                row["balanced_accuracy"] = metrics["balanced_accuracy"]
                row["accuracy"] = metrics["accuracy"]
            del fn
        rows.append(row)
    return rows


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Student / teacher ratios of size, p50 latency and throughput for each format pair."""
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
    names = {"keras": "Keras FP32", "onnx": "ONNX FP32", "int8": "ONNX INT8"}
    return f"student {names[r['student']]} / teacher {names[r['teacher']]}"


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
    return [
        row["model"], row["arch"], row["format"],
        _num(None if row["params"] is None else row["params"] / 1e6, ".2f"),
        _num(row["size_mb"], ".1f"), _num(row["p50_ms"], ".2f"), _num(row["p90_ms"], ".2f"),
        _num(row["p99_ms"], ".2f"), _num(row["throughput_ips"], ".1f"),
        _num(row["balanced_accuracy"], ".3f"),
    ]  # fmt: skip


def _headers(result: dict[str, Any]) -> list[str]:
    return [
        "model", "arch", "format", "params M", "size MB", "p50 ms", "p90 ms", "p99 ms",
        f"img/s @{result['batch']}", "bal. acc",
    ]  # fmt: skip


def _notes(result: dict[str, Any]) -> list[str]:
    return [f"{r['model']} {r['format']}: {r['note']}" for r in result["rows"] if r["note"]]


def _settings(result: dict[str, Any]) -> str:
    return (
        f"{result['image_size']} px, latency at batch 1 ({result['warmup']} warm-up + "
        f"{result['iters']} timed calls), throughput at batch {result['batch']}; ONNX Runtime "
        f"{result['onnxruntime']} on {result['provider']}, threads {result['threads'] or 'auto'}; "
        f"{result['machine']}"
    )


def benchmark_table(result: dict[str, Any]):
    from rich.table import Table

    table = Table(title=result["title"], caption=_settings(result))
    for i, header in enumerate(_headers(result)):
        table.add_column(header, justify="left" if i < 3 else "right")
    for row in result["rows"]:
        table.add_row(*_cells(row))
    return table


def print_benchmark(result: dict[str, Any]) -> None:
    out = console()
    out.print(benchmark_table(result))
    lines = ratio_lines(result) + _notes(result)
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
        "|" + "|".join("---" if i < 3 else "---:" for i in range(len(headers))) + "|",
    ]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in result["rows"]]
    extra = ratio_lines(result) + _notes(result)
    if extra:
        lines += [""] + [f"- {line}" for line in extra]
    return "\n".join(lines) + "\n"


def machine_summary() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{platform.system()} {cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


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
    title: str, image_size: int, warmup: int, iters: int, batch: int, threads: int | None
) -> dict[str, Any]:
    import onnxruntime as ort
    import tensorflow as tf

    return {
        "title": title,
        "image_size": image_size,
        "warmup": warmup,
        "iters": iters,
        "batch": batch,
        "threads": threads,
        "provider": providers()[0],
        "onnxruntime": ort.__version__,
        "tensorflow": tf.__version__,
        "machine": machine_summary(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def check_settings(warmup: int, iters: int, batch: int, threads: int | None, formats) -> tuple:
    formats = tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise KDError(f"unknown benchmark format {unknown[0]!r}; valid: {', '.join(FORMATS)}")
    if warmup < 0 or iters < 1 or batch < 1 or (threads is not None and threads < 0):
        raise KDError(
            f"need warmup >= 0, iters >= 1, batch >= 1, threads >= 0; got warmup={warmup}, "
            f"iters={iters}, batch={batch}, threads={threads}"
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


def _onnx_candidate(name, arch, fmt, path, params, threshold, source, size, threads):
    flag = "--onnx --int8" if fmt == "int8" else "--onnx"
    if not path.is_file():
        note = f"no {path.name}: run `python cli.py export {flag}` first"
        return Candidate(name, arch, fmt, None, params, None, threshold, note)
    exported = read_metadata(path).get("image_size")
    if exported is not None and exported != str(size):
        note = f"{path.name} was exported at {exported} px, not {size} px: re-run export"
        return Candidate(name, arch, fmt, path, params, None, threshold, note)
    note = ""
    if _stale(path, source):
        note = f"{path.name} is older than {source.name}: re-run `python cli.py export {flag}`"
    return Candidate(
        name, arch, fmt, path, params, lambda: onnx_predictor(onnx_session(path, threads)),
        threshold, note,
    )  # fmt: skip


def trained_candidates(run: RunFolder, name: str, model, source: Path, out: Path, formats, threads):
    """The run's own files at the trained size: the .keras file and the exported ONNX files."""
    from kd_keras.models import image_size_of

    arch, params, threshold = model.name, int(model.count_params()), run.threshold(name)
    candidates = []
    if "keras" in formats:
        load = lambda: keras_predictor(model)  # noqa: E731
        candidates.append(Candidate(name, arch, "keras", source, params, load, threshold))
    for fmt, suffix in (("onnx", ".onnx"), ("int8", ".int8.onnx")):
        if fmt in formats:
            path = out / f"{name}{suffix}"
            size = image_size_of(model)
            candidates.append(
                _onnx_candidate(name, arch, fmt, path, params, threshold, source, size, threads)
            )
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
    iters: int = 50,
    batch: int = 32,
    threads: int | None = None,
    formats: tuple[str, ...] = FORMATS,
    limit: int | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Benchmark a run's teacher and student (see module docstring); returns benchmark.json.

    Args:
        run_dir: run folder; None picks the most recent run under `runs/`.
        export_dir: parent of the per-run export folder holding the ONNX files and receiving
            the results (default `export.dir`, else `export`).
        image_size: measure at this size instead of the trained one (no accuracy then).
        warmup, iters: untimed and timed batch-1 calls per row.
        batch: batch size of the throughput measurement.
        threads: ONNX Runtime intra-op threads (default: ONNX Runtime's choice).
        formats: any of `keras`, `onnx`, `int8`.
        limit: evaluate accuracy on the first `limit` test images only.
        quiet: do not print progress and the table.
    """
    formats = check_settings(warmup, iters, batch, threads, formats)
    keras_threads = set_tensorflow_threads(threads)
    run = RunFolder.find(run_dir)
    out = check_writable_dir(run.export_dir(export_dir))
    trained = int(run.report.get("image_size") or run.cfg.data.image_size)
    size = int(image_size or trained)
    say = printer(quiet)

    from kd_keras.data import make_dataset
    from kd_keras.evaluate import classification_metrics
    from kd_keras.inference import softmax
    from kd_keras.models import load_model

    splits = run.load_splits()
    class_names = run.report.get("class_names") or splits.class_names
    test = splits.test.subset(np.arange(min(limit, len(splits.test)))) if limit else splits.test
    images = _first_images(splits.test, size, batch)

    def evaluate(fn, threshold):
        batches = make_dataset(test, size, run.cfg.data.batch_size, labels=False, cache=False)
        probs = softmax(predict(fn, batches))
        return classification_metrics(test.labels, probs, class_names, threshold)

    calibration = None
    if size != trained and "int8" in formats:
        calibration = calibration_batches(splits.train, size, run.cfg.export.calibration_samples,
                                          run.cfg.run.seed, run.cfg.data.batch_size)  # fmt: skip

    result = result_header(f"Benchmark of run {run.name}", size, warmup, iters, batch, threads)
    result.update(run=str(run.path.resolve()), trained_image_size=trained,
                  keras_threads=keras_threads, formats=list(formats))  # fmt: skip
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kd_keras_bench_") as tmp:
        for name in MODELS:
            source, arch = run.model_file(name), run.arch(name)
            if source is None:
                note = f"run has no {name}.keras"
                rows += [_row(Candidate(name, arch, f, None, None, None, None, note), size, batch)
                         for f in formats]  # fmt: skip
                continue
            model = load_model(source, f"{name} model")
            if size == trained:
                candidates = trained_candidates(run, name, model, source, out, formats, threads)
                rows += benchmark_candidates(
                    candidates, images, batch, warmup, iters, evaluate, say
                )
                continue
            say(f"rebuilding {name} ({arch}) at {size} px …")
            model, note = rebuild_at_size(run, name, model, size, len(class_names))
            note += f"; accuracy not measured (trained at {trained} px)"
            candidates = fresh_candidates(
                name, model.name, model, Path(tmp), formats, threads, calibration, note, say
            )
            rows += benchmark_candidates(candidates, images, batch, warmup, iters, None, say)
    result["rows"] = rows
    result["ratios"] = ratios(rows)
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
    threads: int | None,
    calibration=None,
    note: str = "",
    say: Callable[[str], None] = lambda text: None,
) -> list[Candidate]:
    """Save `model` to `folder` as .keras / .onnx / .int8.onnx (as asked) and wrap each file."""
    from kd_keras.models import image_size_of

    size = image_size_of(model)
    params = int(model.count_params())
    candidates = []
    keras_path = folder / f"{name}_{size}px.keras"
    onnx_path = folder / f"{name}_{size}px.onnx"
    int8_path = folder / f"{name}_{size}px.int8.onnx"
    if "keras" in formats:
        model.save(keras_path)
        candidates.append(Candidate(name, arch, "keras", keras_path, params,
                                    lambda: keras_predictor(model), None, note))  # fmt: skip
    if "onnx" in formats or "int8" in formats:
        say(f"converting {name} ({arch}, {size} px) to ONNX …")
        to_onnx(model, onnx_path)
    if "onnx" in formats:
        candidates.append(Candidate(name, arch, "onnx", onnx_path, params,
                                    lambda: onnx_predictor(onnx_session(onnx_path, threads)),
                                    None, note))  # fmt: skip
    if "int8" in formats:
        method = quantization_method(onnx_path)
        if method == "static" and calibration is None:
            raise KDError("static INT8 quantization needs calibration images")
        say(f"quantizing {name} to INT8 ({method}) …")
        quantize(onnx_path, int8_path, method, calibration)
        candidates.append(Candidate(name, arch, "int8", int8_path, params,
                                    lambda: onnx_predictor(onnx_session(int8_path, threads)),
                                    None, f"{note}; INT8 {method}".lstrip("; ")))  # fmt: skip
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
    iters: int = 50,
    batch: int = 32,
    threads: int | None = None,
    formats: tuple[str, ...] = FORMATS,
    quiet: bool = False,
) -> dict[str, Any]:
    """Latency of freshly built (untrained) teacher and student architectures at `image_size`:
    latency does not depend on weight values, so no trained run is needed. Static INT8
    calibrates on `data` (a MedMNIST .npz) when given, else on random pixels. Writes
    `<out>/latency_<N>px.json` and `.md` (default folder `export/`)."""
    from kd_keras.config import MIN_IMAGE_SIZE
    from kd_keras.models import STUDENTS, TEACHERS, build_student, build_teacher

    formats = check_settings(warmup, iters, batch, threads, formats)
    for kind, arch, registry in (("teacher", teacher, TEACHERS), ("student", student, STUDENTS)):
        if arch not in registry:
            raise KDError(f"unknown {kind} architecture {arch!r}; valid: {', '.join(registry)}")
        need = MIN_IMAGE_SIZE.get(arch)
        if image_size < (need or 1):
            raise KDError(f"image size {image_size} is too small for {arch} (needs {need or 1})")
    if student in TOKEN_ARCHS and (image_size % patch_size or image_size // patch_size < 2):
        raise KDError(f"image size {image_size} is not a multiple of patch size {patch_size}")
    keras_threads = set_tensorflow_threads(threads)
    folder = check_writable_dir(Path(out or "export"))
    say = printer(quiet)
    calibration = _calibration_images(data, image_size, calibration_samples, batch)
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
            candidates = fresh_candidates(
                name, arch, model, Path(tmp), formats, threads, calibration, "fresh weights", say
            )
            rows += benchmark_candidates(candidates, images, batch, warmup, iters, None, say)
            del model, candidates
    for row in rows:
        row["file"] = Path(row["file"]).name if row["file"] else None  # temp files are gone
    title = f"Latency at {image_size} px: {teacher} vs {student} (fresh weights)"
    result = result_header(title, image_size, warmup, iters, batch, threads)
    result.update(keras_threads=keras_threads, formats=list(formats),
                  calibration=str(data) if data else "random pixels", rows=rows,
                  ratios=ratios(rows))  # fmt: skip
    stem = folder / f"latency_{image_size}px"
    result["json"], result["md"] = str(stem.with_suffix(".json")), str(stem.with_suffix(".md"))
    write_text(result["md"], benchmark_markdown(result))
    write_json(result["json"], result)
    if not quiet:
        print_benchmark(result)
    return result
