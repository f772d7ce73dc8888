"""End-to-end: the CLI on the real PneumoniaMNIST file at tiny size, and user mistakes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd, capture_output=True, text=True
    )


RUN_FILES = (
    "config.toml", "teacher.keras", "student.keras", "student_scratch.keras", "report.json",
    "report.md", "history_teacher.csv", "history_distill.csv", "history_scratch.csv",
    "confusion_student.png", "confusion_student.json",
)  # fmt: skip


def tiny_overrides(npz, out):
    return [
        "--set", f"data.path={npz}", "--set", f"run.output_dir={out}",
        "--set", "run.name=tiny", "--set", "data.image_size=32",
        "--set", "data.limit_train=160", "--set", "train.epochs=1",
        "--set", "teacher.epochs=1", "--set", "student.epochs=1",
    ]  # fmt: skip


@pytest.mark.slow
def test_distill_end_to_end_then_evaluate_reproduces(real_npz, tmp_path):
    res = cli("distill", "--config", "configs/xray.toml", *tiny_overrides(real_npz, tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "tiny"
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    report = json.loads((run / "report.json").read_text())
    assert list(report["models"]) == ["teacher", "student", "student_scratch"]
    assert report["class_names"] == ["normal", "pneumonia"] and report["test_size"] == 624
    student = report["models"]["student"]
    assert sum(map(sum, student["test"]["confusion_matrix"])) == 624
    assert sum(map(sum, student["test_subset"]["confusion_matrix"])) == 300
    assert "| student |" in res.stdout and "recall normal" in res.stdout
    assert "kd:" in res.stdout and "feat:" in res.stdout  # per-term metrics reported

    again = cli("evaluate", "--run", str(run))
    assert again.returncode == 0, again.stderr[-3000:]
    recomputed = json.loads((run / "report.json").read_text())
    for name, entry in report["models"].items():
        assert recomputed["models"][name]["test"] == entry["test"]
        assert recomputed["models"][name]["threshold"] == entry["threshold"]


def test_bad_config_key_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[distill]\ntemprature = 2.0\n")
    res = cli("distill", "--config", str(bad))
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0, res.stderr
    assert "distill.temprature" in res.stderr and "Traceback" not in res.stderr


def test_missing_data_file_names_it(tmp_path):
    res = cli("distill", "--config", "configs/xray.toml",
              "--set", f"data.path={tmp_path / 'absent.npz'}",
              "--set", f"run.output_dir={tmp_path}")  # fmt: skip
    assert res.returncode == 2 and "Traceback" not in res.stderr
    # TensorFlow's own start-up log lines may precede it; ours is the last line
    assert res.stderr.strip().splitlines()[-1].startswith("error: data file not found")
    assert "absent.npz" in res.stderr


def test_evaluate_without_run_folder(tmp_path):
    res = cli("evaluate", "--run", str(tmp_path / "nothing"))
    assert res.returncode == 2 and "not a run folder" in res.stderr
