"""The package's layering (docs/architecture.md), checked by parsing every module's imports.

Each kd_keras module belongs to one layer; it may import kd_keras modules of its own layer or
below, never above. Imports inside functions are counted (at most `MAX_FUNCTION_IMPORTS` in the
whole package: the CLI's lazy loader of the heavy layers), modules stay short, and private
Keras / TensorFlow / tf2onnx names are used only in `kd_keras.compat`.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kd_keras"
LAYERS = (  # lowest first
    (
        "core",
        (
            "errors",
            "io",
            "compat",
            "text",
            "archs",
            "host",
            "prog",
            "deprecations",
            "config_rules",
            "config",
        ),
    ),
    ("data", ("data",)),
    ("models", ("models",)),
    ("runtimes", ("runtimes",)),
    ("run", ("run",)),
    ("evaluation", ("evaluation",)),
    ("distill", ("distill",)),
    ("deploy", ("deploy",)),
    ("reporting", ("reporting",)),
    ("workflows", ("workflows",)),
    ("cli", ("cli", "__init__", "__main__")),
)
MAX_FUNCTION_IMPORTS = 10
MAX_LINES = 450
# private hooks of Keras that a kd_keras class overrides (it must keep Keras's name to be called);
# each is documented in kd_keras.compat
PRIVATE_OVERRIDES = ("_maybe_symbolic_build",)


def modules() -> dict[str, Path]:
    return {
        ".".join(("kd_keras", *path.relative_to(PACKAGE).with_suffix("").parts)): path
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def layer_of(module: str) -> int:
    parts = module.split(".")
    first = parts[1] if len(parts) > 1 else "__init__"
    for rank, (_, names) in enumerate(LAYERS):
        if first in names:
            return rank
    raise AssertionError(f"{module} is in no layer of tests/test_architecture.py")


def kd_imports(tree: ast.AST):
    """(node, imported kd_keras module) for every kd_keras import in `tree`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "kd_keras":
                    yield node, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "kd_keras":
                for alias in node.names:
                    yield node, f"kd_keras.{alias.name}"
            elif node.module.startswith("kd_keras."):
                yield node, node.module


def function_imports(tree: ast.AST) -> list[ast.AST]:
    inner = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inner |= {id(node) for node, _ in kd_imports(fn)}
    return [node for node, _ in kd_imports(tree) if id(node) in inner]


def test_every_module_is_in_a_layer():
    for module in modules():
        layer_of(module)


def test_no_module_imports_a_higher_layer():
    wrong = []
    for module, path in modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node, target in kd_imports(tree):
            if target == "kd_keras" or module.endswith("__init__") and module.count(".") == 1:
                continue
            if layer_of(target) > layer_of(module):
                wrong.append(f"{module}:{node.lineno} imports {target}")
    assert not wrong, "imports of a higher layer:\n" + "\n".join(wrong)


def test_few_function_level_imports():
    found = []
    for module, path in modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found += [f"{module}:{node.lineno}" for node in function_imports(tree)]
    assert len(found) <= MAX_FUNCTION_IMPORTS, (
        f"{len(found)} function-level kd_keras imports (at most {MAX_FUNCTION_IMPORTS}):\n"
        + "\n".join(found)
    )


@pytest.mark.parametrize("module", sorted(modules()))
def test_module_is_short(module):
    lines = len(modules()[module].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines (at most {MAX_LINES})"


def own_private_names() -> set[str]:
    """Underscore names kd_keras defines itself (functions, methods, attributes it assigns)."""
    own = set()
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                own.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                own.add(node.attr)
    return {name for name in own if name.startswith("_")}


def framework_privates(tree: ast.AST, own: set[str]) -> list[tuple[int, str]]:
    """(line, name) of private Keras / TensorFlow / tf2onnx names used in `tree`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or node.module.startswith("kd_keras")):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            for name in names:
                parts = name.split(".")
                if parts[0] == "kd_keras":
                    continue
                if (
                    "src" in parts[:2]
                    or "python" in parts[:2]
                    or any(p.startswith("_") and not p.startswith("__") for p in parts)
                ):
                    found.append((node.lineno, name))
        elif isinstance(node, ast.Attribute):
            name = node.attr
            if name.startswith("_") and not name.startswith("__") and name not in own:
                found.append((node.lineno, name))
    return found


def test_private_framework_names_only_in_compat():
    own = own_private_names() - set(PRIVATE_OVERRIDES)
    found = []
    for module, path in modules().items():
        if module == "kd_keras.compat":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found += [f"{module}:{line}: {name}" for line, name in framework_privates(tree, own)]
    assert not found, "private Keras/TensorFlow names outside kd_keras.compat:\n" + "\n".join(found)


def test_private_overrides_are_documented_in_compat():
    compat = (PACKAGE / "compat.py").read_text(encoding="utf-8")
    for name in PRIVATE_OVERRIDES:
        assert name in compat, f"{name} is overridden but not documented in kd_keras.compat"


def test_the_private_name_check_finds_privates():
    tree = ast.parse("from keras.src.applications import resnet\nx = layer._inbound_nodes\n")
    assert [name for _, name in framework_privates(tree, set())] == [
        "keras.src.applications",
        "_inbound_nodes",
    ]


def test_importing_the_library_changes_no_process_state_and_prints_nothing():
    """kd_keras picks no matplotlib backend and uses no pyplot (its figures are plain
    `Figure`s); library messages go to the `kd_keras` loggers and show nothing unless the
    application configures logging (the command line installs its own handler)."""
    import os
    import subprocess
    import sys

    for module, path in modules().items():
        text = path.read_text()
        assert "pyplot" not in text.replace("no pyplot", ""), f"{module} uses pyplot"
        assert "matplotlib.use(" not in text, f"{module} sets the matplotlib backend"
    code = (
        "import logging\n"
        "import kd_keras, kd_keras.reporting.figures, kd_keras.reporting.sweep_report\n"
        "import matplotlib\n"
        "assert matplotlib.get_backend().lower() == 'svg', matplotlib.get_backend()\n"
        "logging.getLogger('kd_keras.deprecations').warning('not shown')\n"
        "logging.getLogger('kd_keras.workflows.sweep').info('not shown')\n"
    )
    env = {**os.environ, "MPLBACKEND": "svg"}  # the application's choice, kept
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=PACKAGE.parent, env=env, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "not shown" not in res.stdout + res.stderr


PRINTING_CALLS = ("print", "Console", "echo", "secho")  # builtin, rich, typer / click


def printing(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, call) of every call in `tree` that prints: `print` (the builtin or a console's
    `.print`), a rich `Console`, `typer.echo`, `sys.stdout.write` / `sys.stderr.write`."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
        stream = func.value if isinstance(func, ast.Attribute) else None
        if name in PRINTING_CALLS:
            found.append((node.lineno, name))
        elif name == "write" and getattr(stream, "attr", None) in ("stdout", "stderr"):
            found.append((node.lineno, f"{stream.attr}.write"))
    return sorted(found)


def test_only_the_command_line_prints():
    """Library code returns its results and logs (docs/architecture.md, Output); the command
    line (`kd_keras/cli/`) prints them."""
    found = []
    for module, path in modules().items():
        if module.startswith("kd_keras.cli"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found += [f"{module}:{line}: {call}" for line, call in printing(tree)]
    assert not found, "printing outside kd_keras/cli:\n" + "\n".join(found)


def test_the_printing_check_finds_prints():
    code = ("print(1)\nout = Console()\nout.print(t)\ntyper.echo('x')\nsys.stderr.write('y')\n"
            "logger.info('z')\nsys.stdout.isatty()\n")  # fmt: skip
    assert printing(ast.parse(code)) == [
        (1, "print"), (2, "Console"), (3, "print"), (4, "echo"), (5, "stderr.write"),
    ]  # fmt: skip
