"""Seed 002's CIFAR-10 task end to end through the CLI, on a tiny local copy of the python
batches; and every shipped config file loads."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kd_keras.config import load_config
from kd_keras.data import CIFAR10_CLASSES

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["airplane", "automobile", "bird"]


def cli(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, capture_output=True, text=True
    )


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


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.teacher.arch and cfg.student.arch


def test_cifar3_config_is_seed_002():
    cfg = load_config(ROOT / "configs" / "cifar3.toml")
    assert (cfg.data.source, cfg.data.classes) == ("cifar10", CLASSES)
    assert (cfg.teacher.arch, cfg.student.arch) == ("efficientnet_b3", "resnet18")
    assert cfg.distill.alpha < 1 and cfg.distill.beta > 0  # CE + KL + feature L2
    assert set(cfg.train.stages) == {"teacher", "distill", "scratch"}


@pytest.mark.slow
def test_cifar3_runs_end_to_end_from_local_batches(tmp_path):
    data = write_cifar_batches(tmp_path / "cifar-10-batches-py")
    res = cli(
        "distill", "--config", "configs/cifar3.toml",
        "--set", f"data.path={data}", "--set", f"run.output_dir={tmp_path}",
        "--set", "run.name=tiny", "--set", "data.image_size=32", "--set", "data.limit_train=48",
        "--set", "train.epochs=1", "--set", "teacher.epochs=1", "--set", "student.epochs=1",
        "--set", "train.verbose=0",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "tiny" / "report.json").read_text())
    assert report["class_names"] == CLASSES
    assert report["test_size"] == 9  # 3 of each kept class in the 30-image test batch
    assert list(report["models"]) == ["teacher", "student", "student_scratch"]
    archs = {name: entry["arch"] for name, entry in report["models"].items()}
    assert archs == {"teacher": "efficientnet_b3", "student": "resnet18",
                     "student_scratch": "resnet18"}  # fmt: skip
    for entry in report["models"].values():
        assert sum(map(sum, entry["test"]["confusion_matrix"])) == 9
        assert set(entry["test"]["per_class"]) == set(CLASSES)
    for name in CLASSES:
        assert f"recall {name}" in res.stdout
    for name in ("| teacher |", "| student |", "| student_scratch |"):
        assert name in res.stdout
    assert "feat" in (tmp_path / "tiny" / "history_distill.csv").read_text()


def test_local_batches_keep_only_the_chosen_classes(tmp_path):
    from kd_keras.config import DataConfig
    from kd_keras.data import load_splits

    data = write_cifar_batches(tmp_path / "cifar")
    splits = load_splits(DataConfig(source="cifar10", path=str(data), classes=CLASSES), seed=0)
    assert splits.class_names == CLASSES
    assert len(splits.train) + len(splits.val) == 5 * 9 and len(splits.test) == 9
    assert splits.train.images.shape[1:] == (32, 32, 3)
    # the fixture's pixels survive the channel-major to NHWC conversion
    with (data / "test_batch").open("rb") as fh:
        raw = pickle.load(fh, encoding="bytes")
    first_bird = raw[b"data"][CIFAR10_CLASSES.index("bird")].reshape(3, 32, 32).transpose(1, 2, 0)
    np.testing.assert_array_equal(splits.test.images[2], first_bird)


def test_missing_cifar_folder_is_one_clear_line(tmp_path):
    res = cli(
        "distill", "--config", "configs/cifar3.toml",
        "--set", f"data.path={tmp_path / 'no-cifar'}", "--set", f"run.output_dir={tmp_path}",
    )  # fmt: skip
    assert res.returncode == 2
    # TensorFlow 2.21 writes start-up lines to stderr that no environment variable silences;
    # the CLI's own message is the single last line
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and res.stderr.strip().splitlines()[-1] == errors[0], res.stderr
    assert "CIFAR-10" in errors[0] and "no-cifar" in errors[0] and "Traceback" not in res.stderr
