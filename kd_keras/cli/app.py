"""The typer app and what every command shares: the lazy loader of the heavy layers (`api`),
the handler that shows the library's messages, the console results are printed on (`show`),
the one-line error (`fail`) and note, the `--run` / `--config` lookup, `--format` parsing, and
the global `--version` / `--debug` options."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

# light modules only (no TensorFlow); the heavy layers load through api()
from kd_keras import prog

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Knowledge distillation of image classifiers with Keras 3.",
)

# typer's (vendored) click UsageError, found without importing a private module
USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def api(*names: str):
    """The named functions of the heavy layers (TensorFlow, Keras), imported on first use so
    `--help` and argument errors stay fast: one object for one name, else a tuple."""
    from kd_keras.deploy import benchmark, predict, tables, timing
    from kd_keras.deploy import export as export_files
    from kd_keras.evaluation import compare, evaluate
    from kd_keras.reporting import run_report
    from kd_keras.run import folder
    from kd_keras.workflows import distill, export, sweep

    found = dict(
        benchmark_arch=benchmark.benchmark_arch,
        benchmark_run=benchmark.benchmark_run,
        EXPORT_FORMATS=export_files.FORMATS,
        BENCHMARK_FORMATS=timing.FORMATS,
        predict_files=predict.predict_files,
        predictions_renderables=predict.predictions_renderables,
        summary_renderables=tables.summary_renderables,
        benchmark_renderables=tables.benchmark_renderables,
        compare_runs=compare.compare_runs,
        comparison_markdown=compare.comparison_markdown,
        write_comparison=compare.write_comparison,
        report_markdown=evaluate.report_markdown,
        write_run_report=run_report.write_run_report,
        RunFolder=folder.RunFolder,
        evaluate_and_report=distill.evaluate_and_report,
        run_distill=distill.run_distill,
        export_run=export.export_run,
        parse_grid=sweep.parse_grid,
        run_sweep=sweep.run_sweep,
    )
    objects = tuple(found[name] for name in names)
    return objects[0] if len(objects) == 1 else objects


class StdoutHandler(logging.Handler):
    """Records of the `kd_keras` loggers on the current `sys.stdout` (`sys.stderr` inside
    `messages_on_stderr`), message only: the text the library's progress lines had when they
    were prints (tests swap `sys.stdout`)."""

    stream = "stdout"

    def emit(self, record: logging.LogRecord) -> None:
        try:
            out = getattr(sys, self.stream)
            out.write(self.format(record) + "\n")
            out.flush()
        except (OSError, ValueError):  # a closed or broken stream
            self.handleError(record)


def show_library_messages() -> None:
    """Show the library's INFO (and higher) messages on stdout, once per process."""
    logger = logging.getLogger("kd_keras")
    if not any(isinstance(h, StdoutHandler) for h in logger.handlers):
        logger.addHandler(StdoutHandler())
    logger.setLevel(logging.INFO)


@contextlib.contextmanager
def messages_on_stderr():
    """The library's messages on stderr while a command whose stdout is its result table runs
    (`export`, `predict`, `benchmark`, `benchmark-arch`): progress and notes stay apart from
    the result, as they were when the library printed them there."""
    handlers = [h for h in logging.getLogger("kd_keras").handlers if isinstance(h, StdoutHandler)]
    for handler in handlers:
        handler.stream = "stderr"
    try:
        yield
    finally:
        for handler in handlers:
            handler.stream = "stdout"


def console():
    """The rich console result tables are printed on: stdout, 120 columns when it is not a
    terminal (logs, CI, pipes)."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 120)


def show(renderables: list) -> None:
    """Print a result's renderables (a table, then its note lines) on stdout."""
    out = console()
    for item in renderables:
        out.print(item, highlight=False)


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def note(message: str) -> None:
    typer.echo(f"note: {message}", err=True)


def command_line(args: str) -> str:
    return prog.command(args)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"kd_keras {prog.version()}")
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


def run_folder(run: Path | None, config: Path | None) -> Path:
    """The run folder `--run` / `--config` name: `--run`, else the config's run folder, else the
    latest run under `runs/` (a KDError when there is none); both given must agree."""
    return api("RunFolder").find(run, config=config).path


def parse_formats(values: list[str], valid: tuple[str, ...], kind: str) -> tuple[str, ...]:
    """The formats of repeated and/or comma-separated `--format` values, in the order given."""
    chosen = tuple(dict.fromkeys(p.strip() for v in values for p in v.split(",") if p.strip()))
    bad = [f for f in chosen if f not in valid]
    if bad:
        fail(f"unknown {kind} format {bad[0]!r}; valid: {', '.join(valid)}")
    if values and not chosen:
        fail(f"--format names no {kind} format; valid: {', '.join(valid)}")
    return chosen
