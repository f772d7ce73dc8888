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

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import typer  # noqa: E402

from kd_keras import prog  # noqa: E402
from kd_keras.cli import deployment, training  # noqa: E402, F401 (register the commands)
from kd_keras.cli.app import USAGE_ERROR, app, show_library_messages  # noqa: E402
from kd_keras.errors import Interrupted, KDError  # noqa: E402

__all__ = ["app", "main"]

# help lists the commands in the order of the workflow, not of the modules that define them
ORDER = ("distill", "evaluate", "report", "export", "predict", "benchmark", "benchmark-arch",
         "sweep", "compare")  # fmt: skip
app.registered_commands.sort(
    key=lambda c: ORDER.index(c.name or c.callback.__name__.replace("_", "-"))
)


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

    def interrupted(signum, frame):  # click would turn KeyboardInterrupt into "Aborted!"
        raise Interrupted("interrupted")

    name = prog_name or prog.detect()
    prog.set_name(name)
    show_library_messages()
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
    except USAGE_ERROR as err:  # unknown option, missing value, ...: one line too
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
