"""Benchmark: the documented row fields, files, ratios, other image sizes and user errors."""

import json

import keras
import numpy as np
import pytest
from conftest import make_run, tiny_classifier

from kd_keras.benchmark import benchmark_fresh, benchmark_run, rebuild_at_size, time_predictor
from kd_keras.errors import KDError
from kd_keras.export import export_run
from kd_keras.models import build_student, image_size_of
from kd_keras.run import RunFolder

ROW_FIELDS = {
    "model", "arch", "format", "file", "params", "size_mb", "image_size", "batch", "p50_ms",
    "p90_ms", "p99_ms", "throughput_ips", "throughput_iters", "balanced_accuracy", "accuracy",
    "note",
}  # fmt: skip
FAST = dict(warmup=1, iters=3, batch=4, limit=64, quiet=True)


def test_rows_files_and_ratios(tmp_path, real_npz):
    models = {"student": tiny_classifier("tiny_student", 4),
              "teacher": tiny_classifier("tiny_teacher", 16)}  # fmt: skip
    run = make_run(tmp_path / "runs" / "r", real_npz, models, threshold=None,
                   calibration_samples=16)  # fmt: skip
    export_run(run, tmp_path / "export", int8=True, limit=32, quiet=True)
    result = benchmark_run(run, tmp_path / "export", threads=1, **FAST)

    rows = result["rows"]
    assert [(r["model"], r["format"]) for r in rows] == [
        (m, f) for m in ("teacher", "student") for f in ("keras", "onnx", "int8")
    ]
    for row in rows:
        assert set(row) == ROW_FIELDS
        assert row["arch"] == f"tiny_{row['model']}", "arch is read from the model file"
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["throughput_ips"] > 0 and row["throughput_iters"] == 2
        assert 0 <= row["balanced_accuracy"] <= 1 and row["size_mb"] > 0
        assert row["image_size"] == 32 and row["batch"] == 4 and row["note"] == ""
    assert [(r["student"], r["teacher"]) for r in result["ratios"]] == [
        ("keras", "keras"), ("onnx", "onnx"), ("int8", "onnx"),
    ]  # fmt: skip
    assert set(result["ratios"][0]) == {"student", "teacher", "size", "p50_latency", "throughput"}
    assert result["provider"] == "CPUExecutionProvider" and result["threads"] == 1
    assert result["image_size"] == result["trained_image_size"] == 32

    out = tmp_path / "export" / "r"
    assert json.loads((out / "benchmark.json").read_text())["rows"] == rows
    md = (out / "benchmark.md").read_text()
    assert "| model | arch | format | params M | size MB | p50 ms |" in md
    assert "student ONNX INT8 / teacher ONNX FP32" in md


def test_missing_files_are_reported_not_timed(tmp_path, real_npz):
    run = make_run(tmp_path / "solo", real_npz, {"student": tiny_classifier("tiny_student", 4)})
    result = benchmark_run(run, tmp_path / "export", **FAST)
    rows = {(r["model"], r["format"]): r for r in result["rows"]}
    assert rows[("student", "keras")]["p50_ms"] > 0
    assert rows[("student", "onnx")]["p50_ms"] is None
    assert "python cli.py export --onnx" in rows[("student", "onnx")]["note"]
    assert "--int8" in rows[("student", "int8")]["note"]
    assert rows[("teacher", "keras")]["note"] == "run has no teacher.keras"
    assert result["ratios"] == []


def test_other_image_size_rebuilds_with_trained_weights(tmp_path, real_npz):
    keras.utils.set_random_seed(0)
    student = build_student("resnet18", 2, 32, tiny=True)
    run = make_run(tmp_path / "cnn", real_npz, {"student": student})
    result = benchmark_run(run, tmp_path / "export", image_size=64, formats=("keras",), **FAST)

    student = next(r for r in result["rows"] if r["model"] == "student")
    assert student["image_size"] == 64 and student["p50_ms"] > 0
    assert student["balanced_accuracy"] is None
    assert "with the trained weights" in student["note"]
    assert "accuracy not measured (trained at 32 px)" in student["note"]
    assert (tmp_path / "export" / "cnn" / "benchmark_64px.json").is_file()
    assert not (tmp_path / "export" / "cnn" / "benchmark.json").exists()


def test_rebuild_keeps_cnn_weights_but_not_vit_position_embeddings(tmp_path, tiny_npz):
    run = RunFolder(make_run(tmp_path / "vit", tiny_npz, {}, student="vit_small"))
    vit = build_student("vit_small", 2, 32, patch_size=8, tiny=True)
    model, note = rebuild_at_size(run, "student", vit, 64, 2)
    assert image_size_of(model) == 64 and "fresh weights" in note
    with pytest.raises(KDError, match="not a multiple of student.patch_size = 8"):
        rebuild_at_size(run, "student", vit, 60, 2)

    run.cfg.student.arch = "resnet18"
    cnn = build_student("resnet18", 2, 32, tiny=True)
    model, note = rebuild_at_size(run, "student", cnn, 48, 2)
    assert "trained weights" in note
    assert all(np.array_equal(a, b) for a, b in zip(cnn.get_weights(), model.get_weights(),
                                                   strict=True))  # fmt: skip
    with pytest.raises(KDError, match="too small"):
        rebuild_at_size(run, "student", cnn, 16, 2)


def test_time_predictor_percentiles():
    images = np.zeros((3, 8, 8, 3), "float32")
    seen = []
    timing = time_predictor(lambda x: seen.append(len(x)), images, batch=5, warmup=2, iters=10)
    assert seen == [1] * 12 + [5] * 3, "warm-up, timed batch-1 calls, 1 + 2 throughput calls"
    assert timing["p50_ms"] <= timing["p90_ms"] <= timing["p99_ms"]
    assert timing["throughput_iters"] == 2 and timing["throughput_ips"] > 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"formats": ("keras", "tflite")}, "unknown benchmark format 'tflite'; valid: keras"),
        ({"iters": 0}, "iters >= 1"),
        ({"batch": 0}, "batch >= 1"),
    ],
)
def test_bad_settings(tmp_path, kwargs, message):
    with pytest.raises(KDError, match=message):
        benchmark_run(tmp_path, **kwargs)


def test_no_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KDError, match="no run found"):
        benchmark_run(None)


def test_fresh_models_need_no_run(tmp_path):
    """`benchmark --fresh`: untrained architectures at a given size, files under --out."""
    result = benchmark_fresh("resnet50", "resnet18", 32, out=tmp_path / "bench", warmup=1,
                             iters=3, batch=2, formats=("keras",), quiet=True)  # fmt: skip
    rows = {r["model"]: r for r in result["rows"]}
    assert rows["teacher"]["params"] > rows["student"]["params"] > 1e7, "real sizes"
    assert all(r["p50_ms"] > 0 and r["note"] == "fresh weights" for r in rows.values())
    assert result["calibration"] == "random pixels" and result["ratios"]
    assert (tmp_path / "bench" / "latency_32px.json").is_file()
    assert (tmp_path / "bench" / "latency_32px.md").is_file()
    with pytest.raises(KDError, match="unknown student architecture 'vgg'"):
        benchmark_fresh("resnet50", "vgg", 32, out=tmp_path, quiet=True)
    with pytest.raises(KDError, match="too small"):
        benchmark_fresh("resnet50", "resnet18", 16, out=tmp_path, quiet=True)
