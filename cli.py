"""kd_keras command line: `distill`, `evaluate`, `export`, `benchmark`.

A thin shim over library functions; user mistakes print one line and exit with status 2.
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
) -> None:
    """Fine-tune the teacher, distil the student, train the baseline, evaluate all three."""
    from kd_keras.config import STAGES, load_config

    # validate everything the user typed before TensorFlow loads (and logs)
    cfg = load_config(config, set_ or [])
    chosen = None
    if stages:
        chosen = [s.strip() for s in stages.split(",") if s.strip()]
        bad = [s for s in chosen if s not in STAGES]
        if bad:
            _fail(f"unknown stage(s) {bad}; valid: {', '.join(STAGES)}")

    from kd_keras.evaluate import report_markdown
    from kd_keras.train import run_distill

    report = run_distill(cfg, chosen)
    typer.echo("\n" + report_markdown(report))
    typer.echo(f"run folder: {cfg.run_dir}")


@app.command()
def evaluate(
    run: Annotated[Path, typer.Option("--run", help="Run folder (holds config.toml).")],
) -> None:
    """Recompute the test metrics of a run from its saved models."""
    from kd_keras.evaluate import evaluate_run, report_markdown

    typer.echo(report_markdown(evaluate_run(run)))


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


def main() -> None:
    from kd_keras.errors import KDError

    try:
        app()
    except KDError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
