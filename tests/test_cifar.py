"""Seed 002's CIFAR-10 task end to end through the CLI, on a tiny local copy of the python
batches (tiny variants of its EfficientNetB3 teacher and ResNet18 student)."""

import json
import pickle

import numpy as np
import pytest
from conftest import ROOT, run_cli, write_cifar_batches

from kd_keras.config import load_config
from kd_keras.data.sources import CIFAR10_CLASSES

CIFAR3 = str(ROOT / "configs" / "cifar3.toml")
CLASSES = ["airplane", "automobile", "bird"]


def test_cifar3_config_is_seed_002():
    cfg = load_config(CIFAR3)
    assert (cfg.data.source, cfg.data.classes) == ("cifar10", CLASSES)
    assert (cfg.teacher.arch, cfg.student.arch) == ("efficientnet_b3", "resnet18")
    assert cfg.distill.alpha < 1 and cfg.distill.beta > 0  # CE + KL + feature L2
    assert set(cfg.train.stages) == {"teacher", "distill", "scratch"}


@pytest.mark.slow
def test_cifar3_runs_end_to_end_from_local_batches(tmp_path):
    data = write_cifar_batches(tmp_path / "cifar-10-batches-py")
    sets = [f"data.path={data}", f"run.output_dir={tmp_path}", "run.name=tiny",
            "data.image_size=32", "data.limit_train=48", "train.epochs=1", "teacher.epochs=1",
            "student.epochs=1", "train.verbose=0", "teacher.variant=tiny",
            "student.variant=tiny"]  # fmt: skip
    # the fixture's pixels are noise: every model ends at chance, which --force accepts
    code, out, err = run_cli(
        "distill", "--config", CIFAR3, "--force", *[a for s in sets for a in ("--set", s)]
    )
    assert code == 0, err[-3000:]
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
        assert f"recall {name}" in out
    for name in ("| teacher |", "| student |", "| student_scratch |"):
        assert name in out
    assert "feat" in (tmp_path / "tiny" / "history_distill.csv").read_text()


def test_local_batches_keep_only_the_chosen_classes(tmp_path):
    from kd_keras.config import DataConfig
    from kd_keras.data.sources import load_splits

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
    code, _, err = run_cli(
        "distill", "--config", CIFAR3,
        "--set", f"data.path={tmp_path / 'no-cifar'}", "--set", f"run.output_dir={tmp_path}",
    )  # fmt: skip
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    assert "CIFAR-10" in errors[0] and "no-cifar" in errors[0] and "Traceback" not in err
