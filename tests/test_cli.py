"""The CLI: end to end on the real PneumoniaMNIST file at tiny size, and user mistakes.

Commands run in-process (`run_cli`); one test runs a subprocess, because what it checks is the
process itself (TensorFlow's start-up lines, then our single error line)."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, run_cli

from kd_keras.errors import KDError

XRAY = str(ROOT / "configs" / "xray.toml")
RUN_FILES = (
    "config.toml", "teacher.keras", "student.keras", "student_scratch.keras", "report.json",
    "report.md", "history_teacher.csv", "history_distill.csv", "history_scratch.csv",
    "confusion_student.png", "confusion_student.json",
)  # fmt: skip


def tiny_overrides(npz, out, *extra):
    sets = [f"data.path={npz}", f"run.output_dir={out}", "run.name=tiny", "data.image_size=32",
            "data.limit_train=160", "train.epochs=1", "teacher.epochs=1", "student.epochs=1",
            *extra]  # fmt: skip
    return [arg for s in sets for arg in ("--set", s)]


@pytest.mark.slow
def test_distill_end_to_end_then_evaluate_and_export(real_npz, tmp_path, monkeypatch):
    """The README's main path: configs/xray.toml with its real-size ResNet18 student (the
    file that is exported) and the tiny variant of its ResNet50 teacher (real-size builds of
    every architecture are checked in tests/test_models.py), on the real data."""
    code, out, err = run_cli(
        "distill",
        "--config",
        XRAY,
        *tiny_overrides(real_npz, tmp_path, "teacher.variant=tiny", "teacher.epochs=3"),
    )
    assert code == 0, err[-3000:]
    run = tmp_path / "tiny"
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    report = json.loads((run / "report.json").read_text())
    assert list(report["models"]) == ["teacher", "student", "student_scratch"]
    assert report["class_names"] == ["normal", "pneumonia"] and report["test_size"] == 624
    student = report["models"]["student"]
    assert sum(map(sum, student["test"]["confusion_matrix"])) == 624
    assert sum(map(sum, student["test_subset"]["confusion_matrix"])) == 300
    assert "| student |" in out and "recall normal" in out
    assert "kd:" in out and "feat:" in out  # per-term metrics reported
    assert "soft KD at T 4.0" in out
    # the run says what ran: the host per stage, with oneDNN on (any x86 host), and why
    from kd_keras.host import isa_level

    assert out.count("host: ") == 1 and "oneDNN on" in out and "precision: float32" in out
    log = json.loads((run / "train_log.json").read_text())
    assert all(entry["peak_rss_mb"] > 0 for entry in log.values()), log
    for stage in ("teacher", "distill", "scratch"):
        host = log[stage]["host"]
        assert host["isa_level"] == isa_level() and host["onednn"] is True
        assert host["fp32_peak_gflops"] > 0 and host["threads"] >= 1
        assert log[stage]["jit_compile"].startswith("False (auto:")
    assert "trained on" in (run / "report.html").read_text()

    code, out, err = run_cli("evaluate", "--run", str(run))
    assert code == 0, err[-3000:]
    recomputed = json.loads((run / "report.json").read_text())
    for name, entry in report["models"].items():
        assert recomputed["models"][name]["test"] == entry["test"]
        assert recomputed["models"][name]["threshold"] == entry["threshold"]

    monkeypatch.chdir(tmp_path)  # export's default output folder is ./export
    code, out, err = run_cli("export", "--onnx", "--run", str(run), "--no-teacher")
    assert code == 0, err[-3000:]
    exported = json.loads((tmp_path / "export" / "tiny" / "export.json").read_text())
    assert exported["artefacts"]["student"]["parity"]["status"] == "PASS"
    assert exported["peak_rss_mb"] > 0
    assert exported["artefacts"]["student"]["metrics"]["balanced_accuracy"] == pytest.approx(
        student["test"]["balanced_accuracy"], abs=0.002
    ), "the ONNX file scores what the report says"


def test_bad_config_key_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[distill]\ntemprature = 2.0\n")
    code, _, err = run_cli("distill", "--config", str(bad))
    assert code == 2 and err.count("\n") == 1, err
    assert "distill.temprature" in err and "Traceback" not in err


def test_debug_shows_the_traceback_of_a_user_error(tmp_path):
    with pytest.raises(KDError, match="not a run folder"):
        run_cli("--debug", "evaluate", "--run", str(tmp_path))


def test_missing_data_file_is_the_last_stderr_line_of_the_process(tmp_path):
    res = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "distill", "--config", XRAY,
         "--set", f"data.path={tmp_path / 'absent.npz'}", "--set", f"run.output_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 2 and "Traceback" not in res.stderr
    # TensorFlow's own start-up log lines may precede it; ours is the last line
    assert res.stderr.strip().splitlines()[-1].startswith("error: data file not found")
    assert "absent.npz" in res.stderr


def test_evaluate_without_run_folder(tmp_path):
    code, _, err = run_cli("evaluate", "--run", str(tmp_path / "nothing"))
    assert code == 2 and "run folder not found" in err


def test_benchmark_rejects_a_non_positive_image_size():
    for size in ("0", "-5"):
        code, _, err = run_cli("benchmark", "--image-size", size)
        assert code == 2 and "--image-size must be a positive number" in err, err
