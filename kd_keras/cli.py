"""kd_keras command line: `distill`, `evaluate`, `report`, `export`, `predict`, `benchmark`,
`benchmark-arch`, `sweep`, `compare`.

A thin shim over library functions (`kd-keras ...`, `python cli.py ...` or `python -m
kd_keras ...`; the name typed is the one help and messages show, see `kd_keras.prog`).

One grammar for every command:

- `--run DIR` is a run folder; it defaults to the run folder of `--config FILE` when that is
  given, else to the latest run under `runs/`.
- `--out` is always something written: `export --out` and `benchmark-arch --out` folders,
  `predict --out` the CSV, `compare --out` the `.md` / `.json` stem. `--export-dir` is the
  export parent folder that `report` reads and `benchmark` reads and writes.
- `--format a,b` chooses formats (`export`, `benchmark`, `benchmark-arch`).

A user mistake (`KDError`, or a usage error such as an unknown option) prints one `error:` line
and exits with status 2; anything else is our bug and keeps its traceback. `--debug` (anywhere
on the command line) shows the traceback of user errors too.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import typer  # noqa: E402

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Knowledge distillation of image classifiers with Keras 3.",
)

# typer's (vendored) click UsageError, found without importing a private module
_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _note(message: str) -> None:
    typer.echo(f"note: {message}", err=True)


def _command(args: str) -> str:
    from kd_keras.prog import command

    return command(args)


def version() -> str:
    """The installed kd_keras version (the package's `__version__` when it is not installed)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("kd_keras")
    except importlib.metadata.PackageNotFoundError:
        import kd_keras

        return getattr(kd_keras, "__version__", "unknown")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"kd_keras {version()}")
        raise typer.Exit(0)


@app.callback()
def _global_options(
    version_: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_print_version, help="Print the version and exit."
        ),
    ] = False,
    debug: Annotated[
        bool,
        typer.Option(
            "--debug", help="Show the traceback of user errors too (anywhere on the command line)."
        ),
    ] = False,
) -> None:
    """Knowledge distillation of image classifiers with Keras 3."""
    # both are acted on before parsing: --version by its callback, --debug by main()


# ---------------------------------------------------------------- shared options

RUN_HELP = "Run folder (default: the --config's run folder, else the latest under runs/)."
RunOption = Annotated[Path | None, typer.Option("--run", help=RUN_HELP)]
ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="TOML config: its run folder (run.output_dir/run.name) is --run."
    ),
]


def _run_folder(run: Path | None, config: Path | None) -> Path:
    """The run folder `--run` / `--config` name: `--run`, else the config's run folder, else the
    latest run under `runs/` (a KDError when there is none); both given must agree."""
    from kd_keras.run import RunFolder

    if config is not None:
        from kd_keras.config import load_config

        own = load_config(config).run_dir
        if run is not None and Path(run).resolve() != own.resolve():
            _fail(f"--run {run} is not the run folder of --config {config} ({own}); give one")
        run = own
    return RunFolder.find(run).path


def _formats(values: list[str], valid: tuple[str, ...], kind: str) -> tuple[str, ...]:
    """The formats of repeated and/or comma-separated `--format` values, in the order given."""
    chosen = tuple(dict.fromkeys(p.strip() for v in values for p in v.split(",") if p.strip()))
    bad = [f for f in chosen if f not in valid]
    if bad:
        _fail(f"unknown {kind} format {bad[0]!r}; valid: {', '.join(valid)}")
    if values and not chosen:
        _fail(f"--format names no {kind} format; valid: {', '.join(valid)}")
    return chosen


@app.command()
def distill(
    config: Annotated[Path, typer.Option("--config", "-c", help="TOML experiment config.")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config value: section.key=value (repeatable)."),
    ] = None,
    stages: Annotated[
        str | None,
        typer.Option(help="Comma-separated subset of teacher,distill,scratch (default: config)."),
    ] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="Distil from a teacher (or keep a stage) at chance level."),
    ] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue a killed or partial run of this config.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the results of an existing run folder.")
    ] = False,
) -> None:
    """Fine-tune the teacher, distil the student, train the baseline, evaluate all three."""
    from kd_keras.config import STAGES, load_config, read_toml

    if resume and overwrite:
        _fail("choose one of --resume and --overwrite")
    # validate everything the user typed before TensorFlow loads (and logs)
    if not read_toml(config):
        typer.echo(f"note: {config} sets no keys: every value is a default (README, Configs)",
                   err=True)  # fmt: skip
    cfg = load_config(config, set_ or [])
    chosen = None
    if stages:
        chosen = [s.strip() for s in stages.split(",") if s.strip()]
        bad = [s for s in chosen if s not in STAGES]
        if bad:
            _fail(f"unknown stage(s) {bad}; valid: {', '.join(STAGES)}")

    from kd_keras.evaluate import report_markdown
    from kd_keras.train import run_distill

    mode = "resume" if resume else "overwrite" if overwrite else "new"
    report = run_distill(cfg, chosen, force=force, mode=mode)
    if not report:  # a non-chief worker of distribute.strategy = "multi_worker"
        typer.echo("worker done: the chief writes the run folder and the report")
        return
    typer.echo("\n" + report_markdown(report))
    typer.echo(f"run folder: {cfg.run_dir}")


@app.command()
def evaluate(run: RunOption = None, config: ConfigOption = None) -> None:
    """Recompute the test metrics of a run from its saved models."""
    folder = _run_folder(run, config)
    from kd_keras.evaluate import report_markdown
    from kd_keras.report import evaluate_and_report

    typer.echo(report_markdown(evaluate_and_report(folder)))


@app.command()
def report(
    run: RunOption = None,
    config: ConfigOption = None,
    export_dir: Annotated[
        Path | None,
        typer.Option(
            "--export-dir",
            help="Export parent folder read for the deployment section (what export --out "
            "wrote; default: the run's export.dir, else export/).",
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", hidden=True, help="Deprecated: --export-dir.")
    ] = None,
) -> None:
    """(Re)build the run's report.html from its saved files (no model is run).

    report.html is written into the run folder."""
    if out is not None:
        if export_dir is not None:
            _fail("give --export-dir only (report --out was its old, deprecated name)")
        _note("report --out is deprecated: it named the export folder read, now --export-dir "
              "(report.html is always written into the run folder)")  # fmt: skip
        export_dir = out
    folder = _run_folder(run, config)
    from kd_keras.report import write_run_report

    typer.echo(f"report: {write_run_report(folder, export_dir)}")


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
    from kd_keras.export import FORMATS

    flags = [f for f, on in (("onnx", onnx), ("tflite", tflite)) if on]
    formats = _formats([*flags, *(fmt or [])], FORMATS, "export")
    if not formats:
        _fail("choose a format: --onnx and/or --tflite (or --format onnx,tflite)")
    folder = _run_folder(run, config)
    from kd_keras.export import export_run

    export_run(
        folder,
        out_dir=out,
        models=("student", "teacher") if teacher else ("student",),
        int8=int8,
        tolerance=tolerance,
        fmt=",".join(formats),
    )


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
    from kd_keras.predict import predict_files

    result = predict_files(model_file, list(images or []), out=out, batch=batch, threads=threads)
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
    from kd_keras.benchmark import FORMATS

    if formats is not None:
        if fmt:
            _fail("give --format only (--formats is its old, deprecated name)")
        _note("--formats is deprecated: use --format")
        fmt = [formats]
    return _formats(fmt or [], FORMATS, "benchmark") or FORMATS


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
        _fail(f"--image-size must be a positive number of pixels, got {image_size}")
    chosen = _bench_formats(fmt, formats)
    timing = dict(warmup=warmup, iters=iters, batch=batch, threads=threads, min_time=min_time,
                  provider=provider, formats=chosen)  # fmt: skip
    given = {"teacher": teacher, "student": student, "patch_size": patch_size, "data": data}
    if fresh:
        _note(f"benchmark --fresh is deprecated: use `{_command('benchmark-arch')}`")
        for option, value in (("--run", run), ("--config", config), ("--export-dir", export_dir)):
            if value is not None:
                _fail(f"{option} cannot be used with --fresh: untrained architectures have no "
                      f"run (`{_command('benchmark-arch')}` measures them)")  # fmt: skip
        _benchmark_arch(
            teacher or "resnet50", student or "resnet18", image_size or 224,
            patch_size=16 if patch_size is None else patch_size, data=data, out=out, **timing,
        )  # fmt: skip
        return
    for name, value in given.items():
        if value is not None:
            _fail(f"{ARCH_OPTIONS[name]} is an option of benchmark-arch (untrained "
                  f"architectures): `{_command('benchmark-arch')} {ARCH_OPTIONS[name]} ...`; "
                  "benchmark measures a run (--run)")  # fmt: skip
    if out is not None:
        if export_dir is not None:
            _fail("give --export-dir only (benchmark --out was its old, deprecated name)")
        _note("benchmark --out is deprecated: use --export-dir (the export folder read and "
              "written)")  # fmt: skip
        export_dir = out
    folder = _run_folder(run, config)
    from kd_keras.benchmark import benchmark_run

    benchmark_run(folder, export_dir=export_dir, image_size=image_size, **timing)


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
        _fail(f"--image-size must be a positive number of pixels, got {image_size}")
    _benchmark_arch(
        teacher, student, image_size, patch_size=patch_size, data=data, out=out, warmup=warmup,
        iters=iters, batch=batch, threads=threads, min_time=min_time, provider=provider,
        formats=_bench_formats(fmt, None),
    )  # fmt: skip


def _benchmark_arch(teacher: str, student: str, image_size: int, **options) -> None:
    from kd_keras.benchmark import benchmark_fresh

    benchmark_fresh(teacher, student, image_size, **options)


@app.command()
def sweep(
    config: Annotated[Path, typer.Option("--config", "-c", help="TOML experiment config.")],
    grid: Annotated[
        list[str],
        typer.Option("--grid", help="A grid axis: section.key=v1,v2,... (repeatable)."),
    ],
    seeds: Annotated[int, typer.Option(help="Seeds per cell (run.seed, run.seed + 1, ...).")] = 1,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config value for every run: section.key=value."),
    ] = None,
) -> None:
    """Distil over a grid of settings and seeds (resumable); write tables, heatmap, ablation."""
    from kd_keras.config import build_config, read_toml
    from kd_keras.sweep import parse_grid

    raw = read_toml(config)
    base = build_config(raw, config.resolve().parent, set_ or [], default_name=config.stem)
    axes = parse_grid(grid)

    from kd_keras.sweep import run_sweep

    result = run_sweep(raw, config.resolve().parent, base, axes, seeds, set_ or [])
    root = Path(result["root"])
    typer.echo("\n" + (root / "results.md").read_text() + "\n" + (root / "ablation.md").read_text())
    typer.echo(f"sweep folder: {root}")


@app.command()
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Finished run folders (one per seed).")],
    model: Annotated[
        str, typer.Option(help="Model compared: student, student_scratch, teacher.")
    ] = "student",
    against: Annotated[
        str, typer.Option(help="Baseline model (scratch = student_scratch).")
    ] = "scratch",
    baseline_run: Annotated[
        list[Path] | None,
        typer.Option(
            "--baseline-run",
            help="Take --against from these runs instead, paired by run.seed (repeatable).",
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Write <out>.md and <out>.json.")
    ] = None,
    bootstrap: Annotated[
        int, typer.Option(help="Bootstrap resamples instead of the paired t interval (0: t).")
    ] = 0,
) -> None:
    """Paired verdict over finished runs: pays / hurts / cannot tell, with mean, std and 95% CI.

    For validation and test balanced accuracy and AUC (reads report.json only)."""
    from kd_keras.compare import compare_runs, comparison_markdown, write_comparison

    if bootstrap < 0:
        _fail(f"--bootstrap must be 0 (paired t) or a number of resamples, got {bootstrap}")
    result = compare_runs(runs, model=model, against=against, baseline_runs=baseline_run,
                          bootstrap=bootstrap)  # fmt: skip
    typer.echo(comparison_markdown(result))
    if out is not None:
        md, js = write_comparison(result, out)
        typer.echo(f"written: {md}, {js}")


def _lift_debug(args: list[str]) -> tuple[list[str], bool]:
    """`--debug` anywhere before a `--` moves to the front, where the global option is parsed."""
    head = args[: args.index("--")] if "--" in args else args
    if "--debug" not in head:
        return args, False
    return ["--debug", *(a for a in head if a != "--debug"), *args[len(head) :]], True


def main(argv: list[str] | None = None, prog_name: str | None = None) -> None:
    """Entry point of `kd-keras`, `python cli.py` and `python -m kd_keras` (`argv` defaults to
    the process's arguments, `prog_name` to the name the user typed: `kd_keras.prog.detect`);
    always ends with `SystemExit`."""
    import signal

    from kd_keras import prog
    from kd_keras.errors import Interrupted, KDError

    def interrupted(signum, frame):  # click would turn KeyboardInterrupt into "Aborted!"
        raise Interrupted("interrupted")

    name = prog_name or prog.detect()
    prog.set_name(name)
    args, debug = _lift_debug(list(sys.argv[1:] if argv is None else argv))
    try:
        previous = signal.signal(signal.SIGINT, interrupted)
    except ValueError:  # not the main thread (an embedding application): keep its handler
        previous = None
    try:
        code = app(args=args, prog_name=name, standalone_mode=False)
    except KDError as err:
        if debug:
            raise
        typer.echo(f"error: {err}" if err.exit_code == 2 else str(err), err=True)
        sys.exit(err.exit_code)
    except _USAGE_ERROR as err:  # unknown option, missing value, ...: one line too
        if type(err).__name__ == "NoArgsIsHelpError":  # no arguments at all: the help
            err.show()
            sys.exit(2)
        if debug:
            raise
        where = f" (see `{err.ctx.command_path} --help`)" if err.ctx is not None else ""
        typer.echo(f"error: {err.format_message()}{where}", err=True)
        sys.exit(2)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
