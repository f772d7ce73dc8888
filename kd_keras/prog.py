"""The program name the user typed to start the command line, for help texts and for messages
that tell the user what to run next.

    from kd_keras.prog import command
    raise KDError(f"no ONNX file: run `{command('export --onnx')}` first")

renders `kd-keras export --onnx` under the console script, `python cli.py export --onnx` under
the repository's shim and `python -m kd_keras export --onnx` under `python -m`. The command line
sets the name once (`set_name`, from `detect`); library code called from Python, where no
command line ran, gets `DEFAULT`, the form the README documents.

Imports nothing heavy: the command line reads it before TensorFlow loads (or never loads it).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

CONSOLE_SCRIPT = "kd-keras"
DEFAULT = "python cli.py"

_name: str | None = None


def detect(argv: Sequence[str] | None = None, orig_argv: Sequence[str] | None = None) -> str:
    """The program name from the process's arguments (`sys.argv`, `sys.orig_argv`):

    - the console script (`.../bin/kd-keras`): `kd-keras`;
    - the shim (`python cli.py`, `python3 ../kd/cli.py`): the interpreter as typed (`python`
      when it was typed as a path) and the script path as typed;
    - `python -m kd_keras`: the interpreter and `-m kd_keras`;
    - anything else (an embedding program, a test runner): `DEFAULT`.
    """
    argv = sys.argv if argv is None else argv
    orig = getattr(sys, "orig_argv", []) if orig_argv is None else orig_argv
    script = argv[0] if argv else ""
    base = os.path.basename(script)
    python = orig[0] if orig and orig[0] and os.sep not in orig[0] else "python"
    if base.removesuffix(".exe") == CONSOLE_SCRIPT:
        return CONSOLE_SCRIPT
    if base == "__main__.py" and Path(script).parent.name == "kd_keras":
        return f"{python} -m kd_keras"
    if base == "cli.py":
        return f"{python} {script}"
    return DEFAULT


def set_name(name: str | None) -> None:
    """Set the program name (None: back to `DEFAULT`)."""
    global _name
    _name = name


def name() -> str:
    """The program name: the one the command line set, else `DEFAULT`."""
    return _name or DEFAULT


def command(args: str = "") -> str:
    """`args` as a command to type: `command("export --onnx")` -> `kd-keras export --onnx`."""
    return f"{name()} {args}".rstrip()


def version() -> str:
    """The installed kd_keras version ("unknown" when the package is not installed), as
    `--version` prints it and every exported file records it."""
    import importlib.metadata

    try:
        return importlib.metadata.version("kd_keras")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
