"""kd_keras command line: `distill`, `evaluate`, `report`, `export`, `predict`, `benchmark`,
`sweep`, `compare`.

A thin shim over library functions (`python cli.py ...` or the `kd-keras` console script).
A user mistake (`KDError`) prints one `error:` line and exits with status 2; anything else is
our bug and keeps its traceback. `--debug` (anywhere on the command line) shows the traceback
of user errors too.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import typer  # noqa: E402

# light modules (no TensorFlow); the heavy layers load through _api
from kd_keras.config import STAGES, build_config, load_config, read_toml  # noqa: E402
from kd_keras.errors import Interrupted, KDError  # noqa: E402

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Knowledge distillation of image classifiers with Keras 3.",
)


def _api(*names: str):
    """The named functions of the heavy layers (TensorFlow, Keras), imported on first use so
    `--help` and argument errors stay fast: one object for one name, else a tuple."""
    from kd_keras.deploy.benchmark import benchmark_fresh, benchmark_run
    from kd_keras.deploy.predict import predict_files
    from kd_keras.evaluation.compare import compare_runs, comparison_markdown, write_comparison
    from kd_keras.evaluation.evaluate import report_markdown
    from kd_keras.reporting.run_report import write_run_report
    from kd_keras.run.folder import RunFolder
    from kd_keras.workflows.distill import evaluate_and_report, run_distill
    from kd_keras.workflows.export import export_run
    from kd_keras.workflows.sweep import parse_grid, run_sweep

    found = dict(
        benchmark_fresh=benchmark_fresh,
        benchmark_run=benchmark_run,
        predict_files=predict_files,
        compare_runs=compare_runs,
        comparison_markdown=comparison_markdown,
        write_comparison=write_comparison,
        report_markdown=report_markdown,
        write_run_report=write_run_report,
        RunFolder=RunFolder,
        evaluate_and_report=evaluate_and_report,
        run_distill=run_distill,
        export_run=export_run,
        parse_grid=parse_grid,
        run_sweep=run_sweep,
    )
    objects = tuple(found[name] for name in names)
    return objects[0] if len(objects) == 1 else objects


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


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

    report_markdown = _api("report_markdown")
    run_distill = _api("run_distill")

    mode = "resume" if resume else "overwrite" if overwrite else "new"
    report = run_distill(cfg, chosen, force=force, mode=mode)
    if not report:  # a non-chief worker of distribute.strategy = "multi_worker"
        typer.echo("worker done: the chief writes the run folder and the report")
        return
    typer.echo("\n" + report_markdown(report))
    typer.echo(f"run folder: {cfg.run_dir}")


@app.command()
def evaluate(
    run: Annotated[Path, typer.Option("--run", help="Run folder (holds config.toml).")],
) -> None:
    """Recompute the test metrics of a run from its saved models."""
    report_markdown = _api("report_markdown")
    evaluate_and_report = _api("evaluate_and_report")

    typer.echo(report_markdown(evaluate_and_report(run)))


@app.command()
def report(
    run: Annotated[
        Path | None, typer.Option("--run", help="Run folder (default: latest under runs/).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Export parent folder (default: config's).")
    ] = None,
) -> None:
    """(Re)build the run's report.html from its saved files (no model is run)."""
    write_run_report = _api("write_run_report")
    RunFolder = _api("RunFolder")

    typer.echo(f"report: {write_run_report(RunFolder.find(run), out)}")


@app.command()
def export(
    onnx: Annotated[
        bool, typer.Option("--onnx", help="Export to ONNX (same as --format onnx).")
    ] = False,
    tflite: Annotated[
        bool, typer.Option("--tflite", help="Export to TFLite (same as --format tflite).")
    ] = False,
    fmt: Annotated[
        str | None, typer.Option("--format", help="Export format(s): onnx, tflite, onnx,tflite.")
    ] = None,
    run: Annotated[
        Path | None, typer.Option("--run", help="Run folder (default: latest under runs/).")
    ] = None,
    int8: Annotated[bool, typer.Option("--int8", help="Also write an INT8 model.")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Output parent folder.")] = None,
    tolerance: Annotated[
        float | None, typer.Option(help="Parity tolerance on logits (default: config).")
    ] = None,
    teacher: Annotated[bool, typer.Option(help="Export the teacher too.")] = True,
) -> None:
    """Export the student (and teacher) to ONNX / TFLite with a parity check against Keras."""
    formats = [f for f, on in (("onnx", onnx), ("tflite", tflite)) if on] + ([fmt] if fmt else [])
    if not formats:
        _fail("choose a format: --onnx and/or --tflite (or --format onnx,tflite)")
    export_run = _api("export_run")

    export_run(
        run,
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
        Path, typer.Option("--out", help="CSV file the predictions are written to.")
    ] = Path("predictions.csv"),
    batch: Annotated[int, typer.Option(help="Images per model call.")] = 32,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: runtime's).")] = None,
) -> None:
    """Classify image files with an exported model, preprocessed as its training data was.

    Exit status 1 when any file could not be read (its row says why), else 0."""
    predict_files = _api("predict_files")

    result = predict_files(model_file, list(images or []), out=out, batch=batch, threads=threads)
    if result["failed"]:
        raise typer.Exit(1)


@app.command()
def benchmark(
    run: Annotated[
        Path | None, typer.Option("--run", help="Run folder (default: latest under runs/).")
    ] = None,
    image_size: Annotated[
        int | None, typer.Option("--image-size", help="Measure at this size (default: run's).")
    ] = None,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up iterations.")] = 10,
    iters: Annotated[int, typer.Option(help="Minimum timed calls at batch 1 per row.")] = 200,
    min_time: Annotated[
        float, typer.Option("--min-time", help="Minimum timed seconds per row (with --iters).")
    ] = 2.0,
    batch: Annotated[int, typer.Option(help="Batch size for the throughput figure.")] = 32,
    threads: Annotated[int | None, typer.Option(help="Intra-op threads (default: all).")] = None,
    provider: Annotated[
        str, typer.Option(help="ONNX Runtime execution provider: auto, cpu or cuda.")
    ] = "auto",
    formats: Annotated[
        str,
        typer.Option(help="Comma-separated subset of keras,onnx,int8,tflite,tflite_int8."),
    ] = "keras,onnx,int8,tflite,tflite_int8",
    out: Annotated[Path | None, typer.Option("--out", help="Export parent folder.")] = None,
    fresh: Annotated[
        bool,
        typer.Option(
            "--fresh", help="Untrained --teacher and --student at --image-size; no run needed."
        ),
    ] = False,
    teacher: Annotated[str, typer.Option(help="With --fresh: teacher architecture.")] = "resnet50",
    student: Annotated[str, typer.Option(help="With --fresh: student architecture.")] = "resnet18",
    patch_size: Annotated[int, typer.Option(help="With --fresh: ViT/DeiT patch size.")] = 16,
    data: Annotated[
        Path | None,
        typer.Option(help="With --fresh: MedMNIST .npz for INT8 calibration (else random)."),
    ] = None,
) -> None:
    """Latency, throughput, size, FLOPs and accuracy: teacher vs student, every format."""
    if image_size is not None and image_size < 1:
        _fail(f"--image-size must be a positive number of pixels, got {image_size}")
    chosen = tuple(f.strip() for f in formats.split(",") if f.strip())
    timing = dict(warmup=warmup, iters=iters, batch=batch, threads=threads, min_time=min_time,
                  provider=provider, formats=chosen)  # fmt: skip
    if fresh:
        benchmark_fresh = _api("benchmark_fresh")

        benchmark_fresh(
            teacher, student, image_size or 224, patch_size=patch_size, data=data, out=out,
            **timing,
        )  # fmt: skip
        return
    benchmark_run = _api("benchmark_run")

    benchmark_run(run, export_dir=out, image_size=image_size, **timing)


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
    parse_grid = _api("parse_grid")

    raw = read_toml(config)
    base = build_config(raw, config.resolve().parent, set_ or [], default_name=config.stem)
    axes = parse_grid(grid)

    run_sweep = _api("run_sweep")

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
    """Paired verdict over finished runs: mean, sample std, 95% CI and pays / hurts / cannot
    tell, for validation and test balanced accuracy and AUC (reads report.json only)."""
    compare_runs, comparison_markdown, write_comparison = _api(
        "compare_runs", "comparison_markdown", "write_comparison"
    )

    if bootstrap < 0:
        _fail(f"--bootstrap must be 0 (paired t) or a number of resamples, got {bootstrap}")
    result = compare_runs(runs, model=model, against=against, baseline_runs=baseline_run,
                          bootstrap=bootstrap)  # fmt: skip
    typer.echo(comparison_markdown(result))
    if out is not None:
        md, js = write_comparison(result, out)
        typer.echo(f"written: {md}, {js}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python cli.py` and the `kd-keras` console script (`argv` defaults to the
    process's arguments); always ends with `SystemExit`."""
    import signal

    def interrupted(signum, frame):  # click would turn KeyboardInterrupt into "Aborted!"
        raise Interrupted("interrupted")

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        previous = signal.signal(signal.SIGINT, interrupted)
    except ValueError:  # not the main thread (an embedding application): keep its handler
        previous = None
    try:
        app(args=args, prog_name="cli.py")
    except KDError as err:
        if debug:
            raise
        typer.echo(f"error: {err}" if err.exit_code == 2 else str(err), err=True)
        sys.exit(err.exit_code)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    main()
