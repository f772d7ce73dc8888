"""Shared fixtures and helpers.

Tiers (keras-hub's practice): unit tests build the `tiny` variant of each architecture (the same
code at small width and depth, 32 px), so shapes, taps, adapters, save/load and loss plumbing are
checked in seconds; one real-size build per architecture (`real_zoo`, once per session) checks
what depends on size; end-to-end runs on the real PneumoniaMNIST file are marked `slow`.
"""

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import kd_keras  # noqa: E402, F401  (oneDNN on before any test imports TensorFlow)

ROOT = Path(__file__).resolve().parents[1]
REAL_NPZ = ROOT.parent / "shared" / "data" / "pneumoniamnist.npz"
CLASSES = ["normal", "pneumonia"]
SIZE, PATCH = 32, 8  # token students: a 4x4 grid of patches


@pytest.fixture(scope="session", autouse=True)
def library_messages_on_stdout():
    """The library logs its progress lines; show them on stdout as the command line does, so
    tests that read a library call's output (capsys) see the same text users see."""
    from kd_keras.cli.app import show_library_messages

    show_library_messages()


@pytest.fixture(scope="session")
def real_npz() -> Path:
    """The real PneumoniaMNIST file (../shared/data beside the repository)."""
    path = Path(os.environ.get("KD_KERAS_TEST_NPZ", REAL_NPZ))
    if not path.is_file():
        pytest.fail(f"real PneumoniaMNIST file not found at {path}; set KD_KERAS_TEST_NPZ")
    return path


@pytest.fixture
def tiny_npz(tmp_path) -> Path:
    """A MedMNIST-layout npz with 28x28 grey images, 2 classes, no val split."""
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    labels = {"train": [0] * 12 + [1] * 28, "test": [0] * 5 + [1] * 5}
    arrays = {}
    for split, y in labels.items():
        arrays[f"{split}_images"] = rng.integers(0, 255, (len(y), 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = np.asarray(y, np.uint8).reshape(-1, 1)
    np.savez(path, **arrays)
    return path


def build(arch: str, num_classes: int = 2, tiny: bool = True, size: int = SIZE):
    """A registered teacher or student at `size` px (token students with patch 8)."""
    from kd_keras.models import registry as models

    if arch in models.TEACHERS:
        return models.build_teacher(arch, num_classes, size, tiny=tiny)
    return models.build_student(arch, num_classes, size, patch_size=PATCH, tiny=tiny)


def _zoo(tiny: bool):
    built = {}

    def get(arch: str, num_classes: int = 3):
        import keras

        if (arch, num_classes) not in built:
            keras.utils.set_random_seed(len(built))
            built[arch, num_classes] = build(arch, num_classes, tiny)
        return built[arch, num_classes]

    return get


@pytest.fixture(scope="session")
def tiny_zoo():
    """`tiny_zoo(arch, num_classes=3)`: the tiny variant of a registered architecture, built
    once per session. Tests that train one must not rely on its weights."""
    return _zoo(tiny=True)


@pytest.fixture(scope="session")
def real_zoo():
    """`real_zoo(arch, num_classes=3)`: the real-size architecture, built once per session."""
    return _zoo(tiny=False)


def tiny_classifier(name: str = "tiny", width: int = 4, size: int = SIZE, classes: int = 2):
    """The models' contract (pixels in [0, 255] named `images`, logits out) in one conv layer:
    exports and times in about a second."""
    import keras

    inputs = keras.Input((size, size, 3), name="images")
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(width, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(classes, name="logits")(x), name=name)


def make_run(
    folder: Path,
    npz: Path,
    models: dict,
    student: str = "resnet18",
    teacher: str = "efficientnet_b3",
    threshold: float | None = 0.4,
    calibration_samples: int = 32,
) -> Path:
    """A run folder as training leaves it: config.toml, <name>.keras files and report.json
    (the student's decision threshold is `threshold`; other models use argmax)."""
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(
        f'[run]\nname = "{folder.name}"\nseed = 0\n'
        f'[data]\npath = "{npz}"\nimage_size = {SIZE}\nbatch_size = 128\nlimit_train = 64\n'
        f'[teacher]\narch = "{teacher}"\nvariant = "tiny"\n'
        f'[student]\narch = "{student}"\nvariant = "tiny"\npatch_size = {PATCH}\n'
        f"[export]\ncalibration_samples = {calibration_samples}\n"
    )
    for name, model in models.items():
        model.save(folder / f"{name}.keras")
    entries = {name: {"threshold": threshold if name == "student" else None} for name in models}
    (folder / "report.json").write_text(
        json.dumps({"class_names": CLASSES, "image_size": SIZE, "models": entries})
    )
    return folder


def write_images(folder: Path, n: int, size=(40, 30), mode="L", ext=".jpeg") -> list[str]:
    """`n` random images in `folder` (grey or RGB, any format PIL writes); their names."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    names = []
    for i in range(n):
        shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(
            folder / f"img{i}{ext}"
        )
        names.append(f"img{i}{ext}")
    return names


def write_cifar_batches(folder: Path, per_batch: int = 30, seed: int = 0) -> Path:
    """CIFAR-10's python layout: pickled dicts with b"data" (N x 3072 uint8, channel-major
    rows) and b"labels", in data_batch_1..5 and test_batch. Labels cycle over all 10 classes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"labels": [i % 10 for i in range(per_batch)],
            b"batch_label": name.encode(),
        }
        with (folder / name).open("wb") as fh:
            pickle.dump(batch, fh)
    return folder


def render(renderables: list) -> str:
    """The text a list of rich renderables (a table, then note lines) shows on a 120-column
    console, as the command line prints them."""
    import io

    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, width=120)
    for item in renderables:
        console.print(item, highlight=False)
    return out.getvalue()


def run_cli(*args: str) -> tuple[int, str, str]:
    """Run the CLI in this process (no TensorFlow start-up per call): (exit code, stdout,
    stderr). Use a subprocess only where the process itself is what is tested."""
    import contextlib
    import io

    from kd_keras.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def url_fetch_failure(*args, **kwargs):
    """Raise what keras.utils.get_file raises when a download fails: a plain Exception whose
    context is urllib's URLError (keras/src/utils/file_utils.py)."""
    import urllib.error

    try:
        raise urllib.error.URLError("Name or service not known")
    except urllib.error.URLError as err:
        raise Exception(f"URL fetch failure on https://example.invalid: {err.reason}")  # noqa: B904
