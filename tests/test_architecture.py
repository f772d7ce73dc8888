"""The package's layering (docs/architecture.md), checked by parsing every module's imports.

Each kd_keras module belongs to one layer; it may import kd_keras modules of its own layer or
below, never above. Imports inside functions are counted (at most `MAX_FUNCTION_IMPORTS` in the
whole package: the CLI's lazy loader of the heavy layers), modules stay short, and private
Keras / TensorFlow / tf2onnx names are used only in `kd_keras.compat`.
"""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kd_keras"
LAYERS = (  # lowest first
    ("core", ("errors", "io", "compat", "text", "archs", "host", "config")),
    ("data", ("data",)),
    ("models", ("models",)),
    ("runtimes", ("runtimes",)),
    ("runs", ("runs",)),
    ("evaluation", ("evaluation",)),
    ("distill", ("distill",)),
    ("deploy", ("deploy",)),
    ("reporting", ("reporting",)),
    ("workflows", ("workflows",)),
    ("cli", ("cli", "__init__")),
)
MAX_FUNCTION_IMPORTS = 10
MAX_LINES = 450
# a private name of Keras, TensorFlow or tf2onnx: `keras.src`, a `tensorflow.python` module,
# or an attribute with a leading underscore on something that is not our own object
PRIVATE = re.compile(r"keras\.src|tensorflow\.python|\b(?!self\b|cls\b)[a-z]\w*\._[a-z]\w*")


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


def test_private_framework_names_only_in_compat():
    found = []
    for module, path in modules().items():
        if module == "kd_keras.compat":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#")[0]
            code = re.sub(r"(\"[^\"]*\"|'[^']*'|`[^`]*`)", "", code)  # strings and doc names
            if PRIVATE.search(code):
                found.append(f"{module}:{number}: {line.strip()}")
    assert not found, "private Keras/TensorFlow names outside kd_keras.compat:\n" + "\n".join(found)
