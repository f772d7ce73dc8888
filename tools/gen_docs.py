"""Write the generated reference pages: docs/configuration.md and docs/cli.md.

    python tools/gen_docs.py           # (re)write both pages
    python tools/gen_docs.py --check   # exit 1, naming each page that differs from its source

docs/configuration.md is generated from the config schema (`kd_keras.config.SECTIONS`: every
section, every key with its type, default, range or choices and its `help` text); a key without
help text is an error. docs/cli.md is generated from the typer app (`kd_keras.cli.app`), walked
with `typer.main.get_command` and formatted by click's own help formatter (no rich boxes) at a
fixed width, so the page does not depend on the terminal. tests/test_docs.py fails when a
committed page and its source drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIG_PAGE = "docs/configuration.md"
CLI_PAGE = "docs/cli.md"
WIDTH = 100
REGENERATE = "python tools/gen_docs.py"

# One line per section, shown above its table; a new section needs one here.
SECTION_NOTES = {
    "run": "Names the run and seeds it; the run folder is `<output_dir>/<name>/`.",
    "data": "Where the images come from, their size and the batch. Layouts: "
    "[training.md](training.md#data-sources).",
    "augment": "Training-time augmentation, seeded per image and epoch (off at evaluation).",
    "teacher": "The teacher kd_keras trains, or the one you bring (`path`, `ensemble`): "
    "[own_teacher.md](own_teacher.md).",
    "student": "The student. Architectures: [training.md](training.md#students).",
    "distill": "The distillation loss. Formulas and papers: [training.md](training.md#losses).",
    "train": "Optimiser, schedule, epoch selection and class-prior corrections, shared by the "
    "three stages. Notes: [training.md](training.md#weight-decay-and-class-prior-corrections).",
    "eval": "How the test split is scored.",
    "export": "ONNX / TFLite export: [deployment.md](deployment.md).",
    "distribute": "tf.distribute over devices and machines: [scale_out.md](scale_out.md).",
}


def _toml(value) -> str:
    from kd_keras.config import toml_value

    return toml_value(value)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _type_name(f: dataclasses.Field) -> str:
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def _default(f: dataclasses.Field) -> str:
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        value = f.default
    return "unset" if value is None else f"`{_toml(value)}`"


def _allowed(f: dataclasses.Field) -> str:
    meta = f.metadata
    parts = []
    if meta.get("choices") is not None:
        parts.append(", ".join(f"`{_toml(c)}`" for c in meta["choices"]))
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and hi is not None:
        parts.append(f"{lo} to {hi}")
    elif lo is not None:
        parts.append(f"≥ {lo}")
    elif hi is not None:
        parts.append(f"≤ {hi}")
    if meta.get("path"):
        parts.append("path")
    return "; ".join(parts) or "—"


def config_markdown(sections: dict[str, type] | None = None) -> str:
    """docs/configuration.md from the config schema (default: `kd_keras.config.SECTIONS`)."""
    if sections is None:
        from kd_keras.config import SECTIONS as sections
    missing = [
        f"{name}.{f.name}"
        for name, cls in sections.items()
        for f in dataclasses.fields(cls)
        if not str(f.metadata.get("help") or "").strip()
    ]
    if missing:
        raise ValueError(f"config keys without help text in kd_keras/config.py: {missing}")
    no_note = [name for name in sections if name not in SECTION_NOTES]
    if no_note:
        raise ValueError(f"config sections without a note in tools/gen_docs.py: {no_note}")
    lines = [
        "# Configuration reference",
        "",
        f"<!-- generated from kd_keras/config.py by {REGENERATE}; do not edit -->",
        "",
        "One TOML file describes an experiment. Every key is validated on load: an unknown "
        "section or key is an error naming the valid ones; a wrong type or an out-of-range "
        "value names the key. Relative paths (keys marked *path*) resolve against the config "
        "file's folder; `--set section.key=value` overrides any key, and paths given there "
        "resolve against the current directory. The resolved config is saved as "
        "`runs/<name>/config.toml`. A key left *unset* takes the meaning its line gives. The "
        "shipped configs and what the keys do together: [training.md](training.md).",
        "",
        "Sections: " + ", ".join(f"[`[{name}]`](#{name})" for name in sections) + ".",
        "",
    ]
    for name, cls in sections.items():
        lines += [f"## {name}", "", f"`[{name}]` — {SECTION_NOTES[name]}", ""]
        lines += ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            row = (f"`{f.name}`", f"`{_type_name(f)}`", _default(f), _allowed(f),
                   f.metadata["help"])  # fmt: skip
            lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
        lines.append("")
    return "\n".join(lines)


def _help_text(command, name: str, parent=None):
    command.rich_markup_mode = None  # click's plain formatter, not typer's rich panels
    ctx = command.context_class(command, info_name=name, parent=parent, terminal_width=WIDTH,
                                max_content_width=WIDTH)  # fmt: skip
    formatter = ctx.make_formatter()
    command.format_help(ctx, formatter)
    return ctx, formatter.getvalue().rstrip()


def cli_markdown(group=None) -> str:
    """docs/cli.md from the click group of the typer app (default: `kd_keras.cli.app`)."""
    if group is None:
        import typer

        from kd_keras.cli import app

        group = typer.main.get_command(app)
    ctx, top = _help_text(group, "python cli.py")
    names = group.list_commands(ctx)
    commands = {name: group.get_command(ctx, name) for name in names}
    lines = [
        "# Command-line reference",
        "",
        f"<!-- generated from kd_keras/cli/ by {REGENERATE}; do not edit -->",
        "",
        "`python cli.py COMMAND ...` and `kd-keras COMMAND ...` (the console script `pip "
        "install` puts on the path) are the same program. A user mistake (bad config, missing "
        "file, no run) prints one `error:` line and exits with status 2; anything else keeps "
        "its Python traceback; `--debug` anywhere on the command line shows the traceback of "
        "user mistakes too. What each command writes: [training.md](training.md) (`distill`, "
        "`evaluate`, `report`, `sweep`, `compare`) and [deployment.md](deployment.md) "
        "(`export`, `predict`, `benchmark`).",
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    for name, command in commands.items():
        summary = command.get_short_help_str(limit=WIDTH * 3)
        lines.append(f"| [`{name}`](#{name}) | {_cell(summary)} |")
    lines += ["", "```text", top, "```", ""]
    for name, command in commands.items():
        lines += [f"## {name}", "", "```text", _help_text(command, name, ctx)[1], "```", ""]
    return "\n".join(lines)


def pages() -> dict[str, str]:
    """Every generated page: path relative to the repository -> its text."""
    return {CONFIG_PAGE: config_markdown(), CLI_PAGE: cli_markdown()}


def main(argv: list[str] | None = None, root: Path = ROOT) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a page is out of date")
    args = parser.parse_args(argv)
    stale = []
    for rel, text in pages().items():
        path = root / rel
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if current == text:
            continue
        if args.check:
            stale.append(rel)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {rel}")
    for rel in stale:
        print(f"{rel} is out of date with its source; run {REGENERATE}", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
