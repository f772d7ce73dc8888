"""Commands of the training side: `distill`, `evaluate`, `report`, `sweep`, `compare`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kd_keras.cli.app import (
    ConfigOption,
    RunOption,
    api,
    app,
    fail,
    note,
    run_folder,
)
from kd_keras.config import build_config, load_config, read_toml
from kd_keras.config_rules import STAGES


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
        fail("choose one of --resume and --overwrite")
    # validate everything the user typed before TensorFlow loads (and logs)
    if not read_toml(config):
        typer.echo(f"note: {config} sets no keys: every value is a default (docs/configuration.md)",
                   err=True)  # fmt: skip
    cfg = load_config(config, set_ or [])
    chosen = None
    if stages:
        chosen = [s.strip() for s in stages.split(",") if s.strip()]
        bad = [s for s in chosen if s not in STAGES]
        if bad:
            fail(f"unknown stage(s) {bad}; valid: {', '.join(STAGES)}")

    report_markdown = api("report_markdown")
    run_distill = api("run_distill")

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
    folder = run_folder(run, config)
    report_markdown, evaluate_and_report = api("report_markdown", "evaluate_and_report")

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
            fail("give --export-dir only (report --out was its old, deprecated name)")
        note("report --out is deprecated: it named the export folder read, now --export-dir "
              "(report.html is always written into the run folder)")  # fmt: skip
        export_dir = out
    folder = run_folder(run, config)
    write_run_report = api("write_run_report")
    typer.echo(f"report: {write_run_report(folder, export_dir)}")


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
    parse_grid = api("parse_grid")

    raw = read_toml(config)
    base = build_config(raw, config.resolve().parent, set_ or [], default_name=config.stem)
    axes = parse_grid(grid)

    run_sweep = api("run_sweep")

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
    compare_runs, comparison_markdown, write_comparison = api(
        "compare_runs", "comparison_markdown", "write_comparison"
    )

    if bootstrap < 0:
        fail(f"--bootstrap must be 0 (paired t) or a number of resamples, got {bootstrap}")
    result = compare_runs(runs, model=model, against=against, baseline_runs=baseline_run,
                          bootstrap=bootstrap)  # fmt: skip
    typer.echo(comparison_markdown(result))
    if out is not None:
        md, js = write_comparison(result, out)
        typer.echo(f"written: {md}, {js}")
