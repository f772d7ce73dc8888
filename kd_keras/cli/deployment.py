"""Commands of the deployment side: `export`, `predict`, `benchmark`, `benchmark-arch`.

Each prints its result table on stdout (the library returns it, `show` renders it); the
library's progress lines and notes go to stderr meanwhile (`messages_on_stderr`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kd_keras.cli.app import (
    ConfigOption,
    RunOption,
    api,
    app,
    command_line,
    fail,
    messages_on_stderr,
    note,
    parse_formats,
    run_folder,
    show,
)


@app.command()
def export(
    fmt: Annotated[
        list[str] | None,
        typer.Option(
            "--format",
            metavar="FORMATS",
            help="Format(s) to export: onnx, tflite or onnx,tflite (repeatable).",
        ),
    ] = None,
    onnx: Annotated[bool, typer.Option("--onnx", help="Same as --format onnx.")] = False,
    tflite: Annotated[bool, typer.Option("--tflite", help="Same as --format tflite.")] = False,
    run: RunOption = None,
    config: ConfigOption = None,
    int8: Annotated[bool, typer.Option("--int8", help="Also write an INT8 model.")] = False,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Output parent folder: files go to <out>/<run name>/ (default: the run's "
            "export.dir, else export/).",
        ),
    ] = None,
    tolerance: Annotated[
        float | None, typer.Option(help="Parity tolerance on logits (default: config).")
    ] = None,
    teacher: Annotated[
        bool,
        typer.Option(
            "--teacher/--no-teacher",
            help="Export the teacher too (a yes/no here; benchmark-arch --teacher names an "
            "architecture).",
        ),
    ] = True,
) -> None:
    """Export the student (and teacher) to ONNX / TFLite with a parity check against Keras."""
    flags = [f for f, on in (("onnx", onnx), ("tflite", tflite)) if on]
    formats = parse_formats([*flags, *(fmt or [])], api("EXPORT_FORMATS"), "export")
    if not formats:
        fail("choose a format: --onnx and/or --tflite (or --format onnx,tflite)")
    folder = run_folder(run, config)
    export_run, summary_renderables = api("export_run", "summary_renderables")
    with messages_on_stderr():
        result = export_run(
            folder,
            out_dir=out,
            models=("student", "teacher") if teacher else ("student",),
            int8=int8,
            tolerance=tolerance,
            formats=formats,
        )
    show(summary_renderables(result))


@app.command(name="predict")
def predict_cmd(
    model_file: Annotated[Path, typer.Argument(help="An exported .onnx, .tflite or .keras file.")],
    images: Annotated[
        list[Path] | None, typer.Argument(help="Image files and/or folders (searched recursively).")
    ] = None,
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="CSV file the predictions are written to (a folder: <out>/predictions.csv).",
        ),
    ] = Path("predictions.csv"),
    batch: Annotated[int, typer.Option(help="Images per model call.")] = 32,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: runtime's).")] = None,
) -> None:
    """Classify image files with an exported model, preprocessed as its training data was.

    Exit status 1 when any file could not be read (its row says why), else 0."""
    predict_files, predictions_renderables = api("predict_files", "predictions_renderables")

    with messages_on_stderr():
        result = predict_files(model_file, list(images or []), out=out, batch=batch,
                               threads=threads)  # fmt: skip
    show(predictions_renderables(result))
    if result["failed"]:
        raise typer.Exit(1)


# benchmark and benchmark-arch: the same timing options
WarmupOption = Annotated[int, typer.Option(help="Untimed warm-up iterations.")]
ItersOption = Annotated[int, typer.Option(help="Minimum timed calls at batch 1 per row.")]
MinTimeOption = Annotated[
    float, typer.Option("--min-time", help="Minimum timed seconds per row (with --iters).")
]
BatchOption = Annotated[int, typer.Option(help="Batch size for the throughput figure.")]
ThreadsOption = Annotated[int | None, typer.Option(help="Intra-op threads (default: all).")]
ProviderOption = Annotated[
    str, typer.Option(help="ONNX Runtime execution provider: auto, cpu or cuda.")
]
BENCH_FORMAT_HELP = (
    "Format(s) to measure, of keras,onnx,int8,tflite,tflite_int8 (default: all; repeatable)."
)
FormatOption = Annotated[
    list[str] | None, typer.Option("--format", metavar="FORMATS", help=BENCH_FORMAT_HELP)
]
ARCH_OPTIONS = {"teacher": "--teacher", "student": "--student", "patch_size": "--patch-size",
                "data": "--data"}  # fmt: skip


def _bench_formats(fmt: list[str] | None, formats: str | None) -> tuple[str, ...]:
    FORMATS = api("BENCHMARK_FORMATS")

    if formats is not None:
        if fmt:
            fail("give --format only (--formats is its old, deprecated name)")
        note("--formats is deprecated: use --format")
        fmt = [formats]
    return parse_formats(fmt or [], FORMATS, "benchmark") or FORMATS


@app.command()
def benchmark(
    run: RunOption = None,
    config: ConfigOption = None,
    image_size: Annotated[
        int | None, typer.Option("--image-size", help="Measure at this size (default: run's).")
    ] = None,
    warmup: WarmupOption = 10,
    iters: ItersOption = 200,
    min_time: MinTimeOption = 2.0,
    batch: BatchOption = 32,
    threads: ThreadsOption = None,
    provider: ProviderOption = "auto",
    fmt: FormatOption = None,
    export_dir: Annotated[
        Path | None,
        typer.Option(
            "--export-dir",
            help="Export parent folder: reads the files export --out wrote there and writes "
            "<export-dir>/<run name>/benchmark.json and .md (default: the run's export.dir, "
            "else export/).",
        ),
    ] = None,
    formats: Annotated[
        str | None, typer.Option("--formats", hidden=True, help="Deprecated: --format.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", hidden=True, help="Deprecated: --export-dir.")
    ] = None,
    fresh: Annotated[
        bool, typer.Option("--fresh", hidden=True, help="Deprecated: benchmark-arch.")
    ] = False,
    teacher: Annotated[str | None, typer.Option(hidden=True)] = None,
    student: Annotated[str | None, typer.Option(hidden=True)] = None,
    patch_size: Annotated[int | None, typer.Option(hidden=True)] = None,
    data: Annotated[Path | None, typer.Option(hidden=True)] = None,
) -> None:
    """Latency, throughput, size, FLOPs and accuracy of a run: teacher vs student, every format.

    Untrained architectures, without a run: benchmark-arch."""
    if image_size is not None and image_size < 1:
        fail(f"--image-size must be a positive number of pixels, got {image_size}")
    chosen = _bench_formats(fmt, formats)
    timing = dict(warmup=warmup, iters=iters, batch=batch, threads=threads, min_time=min_time,
                  provider=provider, formats=chosen)  # fmt: skip
    given = {"teacher": teacher, "student": student, "patch_size": patch_size, "data": data}
    if fresh:
        note(f"benchmark --fresh is deprecated: use `{command_line('benchmark-arch')}`")
        for option, value in (("--run", run), ("--config", config), ("--export-dir", export_dir)):
            if value is not None:
                fail(f"{option} cannot be used with --fresh: untrained architectures have no "
                      f"run (`{command_line('benchmark-arch')}` measures them)")  # fmt: skip
        _benchmark_arch(
            teacher or "resnet50", student or "resnet18", image_size or 224,
            patch_size=16 if patch_size is None else patch_size, data=data, out=out, **timing,
        )  # fmt: skip
        return
    for name, value in given.items():
        if value is not None:
            fail(f"{ARCH_OPTIONS[name]} is an option of benchmark-arch (untrained "
                  f"architectures): `{command_line('benchmark-arch')} {ARCH_OPTIONS[name]} ...`; "
                  "benchmark measures a run (--run)")  # fmt: skip
    if out is not None:
        if export_dir is not None:
            fail("give --export-dir only (benchmark --out was its old, deprecated name)")
        note("benchmark --out is deprecated: use --export-dir (the export folder read and "
              "written)")  # fmt: skip
        export_dir = out
    folder = run_folder(run, config)
    benchmark_run, benchmark_renderables = api("benchmark_run", "benchmark_renderables")
    with messages_on_stderr():
        result = benchmark_run(folder, export_dir=export_dir, image_size=image_size, **timing)
    show(benchmark_renderables(result))


@app.command(name="benchmark-arch")
def benchmark_arch(
    teacher: Annotated[
        str,
        typer.Option(
            help="Teacher architecture (a name here; export --teacher is a yes/no option)."
        ),
    ] = "resnet50",
    student: Annotated[str, typer.Option(help="Student architecture.")] = "resnet18",
    image_size: Annotated[int, typer.Option("--image-size", help="Input size in pixels.")] = 224,
    patch_size: Annotated[int, typer.Option(help="ViT/DeiT patch size.")] = 16,
    data: Annotated[
        Path | None, typer.Option(help="MedMNIST .npz for INT8 calibration (else random pixels).")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Output folder of latency_<size>px.json and .md (default: export/)."
        ),
    ] = None,
    warmup: WarmupOption = 10,
    iters: ItersOption = 200,
    min_time: MinTimeOption = 2.0,
    batch: BatchOption = 32,
    threads: ThreadsOption = None,
    provider: ProviderOption = "auto",
    fmt: FormatOption = None,
) -> None:
    """Latency of untrained teacher and student architectures: no run needed.

    Latency does not depend on weight values; a run's trained models: benchmark."""
    if image_size < 1:
        fail(f"--image-size must be a positive number of pixels, got {image_size}")
    _benchmark_arch(
        teacher, student, image_size, patch_size=patch_size, data=data, out=out, warmup=warmup,
        iters=iters, batch=batch, threads=threads, min_time=min_time, provider=provider,
        formats=_bench_formats(fmt, None),
    )  # fmt: skip


def _benchmark_arch(teacher: str, student: str, image_size: int, **options) -> None:
    benchmark_arch, benchmark_renderables = api("benchmark_arch", "benchmark_renderables")
    with messages_on_stderr():
        result = benchmark_arch(teacher, student, image_size, **options)
    show(benchmark_renderables(result))
