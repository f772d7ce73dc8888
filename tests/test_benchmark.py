"""Benchmark: the documented row fields, files, ratios, other image sizes and user errors."""

import json
import logging
import time

import keras
import numpy as np
import pytest
from conftest import make_run, render, run_cli, tiny_classifier

from kd_keras.deploy.benchmark import benchmark_arch, benchmark_run
from kd_keras.deploy.rebuild import rebuild_at_size
from kd_keras.deploy.tables import benchmark_renderables
from kd_keras.deploy.timing import time_predictor
from kd_keras.distill.ensemble import build_ensemble
from kd_keras.errors import KDError
from kd_keras.evaluation.evaluate import evaluate_run
from kd_keras.host import has_vnni, isa_level
from kd_keras.models.registry import build_student, build_teacher
from kd_keras.models.taps import image_size_of
from kd_keras.run.folder import RunFolder
from kd_keras.workflows.export import export_run

ROW_FIELDS = {
    "model", "arch", "format", "file", "params", "size_mb", "image_size", "batch", "runtime",
    "threads", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "calls", "timed_s",
    "throughput_ips", "throughput_iters", "flops", "compute_bound_ms", "x_compute_bound",
    "balanced_accuracy", "accuracy", "note",
}  # fmt: skip
FAST = dict(warmup=1, iters=3, batch=4, limit=64, quiet=True, min_time=0)
FORMATS = ("keras", "onnx", "int8", "tflite", "tflite_int8")
# tiny_classifier(width w) at 32 px: a 3x3 stride-2 conv to 15x15xw, then a w -> 2 dense layer
TINY_FLOPS = {w: 2 * (15 * 15 * w * 27 + w * 2) for w in (4, 16)}


def test_rows_files_and_ratios(tmp_path, real_npz):
    models = {"student": tiny_classifier("tiny_student", 4),
              "teacher": tiny_classifier("tiny_teacher", 16)}  # fmt: skip
    run = make_run(tmp_path / "runs" / "r", real_npz, models, threshold=None,
                   calibration_samples=16)  # fmt: skip
    export_run(run, tmp_path / "export", formats="onnx,tflite", int8=True, limit=32, quiet=True)
    result = benchmark_run(run, tmp_path / "export", threads=1, provider="cpu", **FAST)
    # the run's architectures (config: efficientnet_b3 teacher, resnet18 student), which are
    # not the names of the Keras models in its files (tiny_teacher, tiny_student)
    arch = {name: RunFolder(run).arch(name) for name in models}
    assert arch == {"teacher": "efficientnet_b3", "student": "resnet18"}
    assert all(arch[name] != model.name for name, model in models.items())

    rows = result["rows"]
    assert [(r["model"], r["format"]) for r in rows] == [
        (m, f) for m in ("teacher", "student") for f in FORMATS
    ]
    runtimes = {"keras": "TensorFlow CPU", "onnx": "CPUExecutionProvider",
                "int8": "CPUExecutionProvider", "tflite": "LiteRT (ai-edge-litert) CPU",
                "tflite_int8": "LiteRT (ai-edge-litert) CPU"}  # fmt: skip
    for row in rows:
        assert set(row) == ROW_FIELDS
        assert row["arch"] == arch[row["model"]], "arch is the run's (RunFolder.arch)"
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["mean_ms"] > 0 and row["std_ms"] >= 0 and row["calls"] >= 3
        assert row["throughput_ips"] > 0 and row["throughput_iters"] == 2
        assert 0 <= row["balanced_accuracy"] <= 1 and row["size_mb"] > 0
        assert row["image_size"] == 32 and row["batch"] == 4 and row["note"] == ""
        assert row["runtime"] == runtimes[row["format"]]
        width = 4 if row["model"] == "student" else 16
        assert row["flops"] == TINY_FLOPS[width], "FLOPs of the model, on every row"
        assert row["compute_bound_ms"] == pytest.approx(
            row["flops"] / result["peak"]["gflops"] / 1e6, rel=1e-2, abs=1e-3
        )
        if row["format"] in ("onnx", "tflite"):
            assert row["threads"] == 1 and row["x_compute_bound"] > 0
        if row["format"] in ("int8", "tflite_int8"):
            assert row["x_compute_bound"] is None, "the bound is a float32 one"
    assert [(r["student"], r["teacher"]) for r in result["ratios"]] == [
        ("keras", "keras"), ("onnx", "onnx"), ("tflite", "tflite"), ("int8", "int8"),
        ("tflite_int8", "tflite_int8"), ("int8", "onnx"), ("tflite_int8", "tflite"),
    ]  # fmt: skip
    assert set(result["ratios"][0]) == {"student", "teacher", "size", "p50_latency", "throughput"}
    assert result["provider"] == "cpu" and result["threads"] == 1
    assert result["peak"]["threads"] == 1 and result["peak"]["gflops"] > 0
    assert result["image_size"] == result["trained_image_size"] == 32

    out = tmp_path / "export" / "r"
    assert json.loads((out / "benchmark.json").read_text())["rows"] == rows
    md = (out / "benchmark.md").read_text()
    assert "| model | arch | format | runtime | threads | params M | size MB | GFLOPs |" in md
    assert "student ONNX INT8 / teacher ONNX FP32" in md
    assert "student TFLite INT8 / teacher TFLite INT8" in md
    assert result["peak_rss_mb"] > 0 and result["host"]["isa_level"] == isa_level()
    assert f"peak resident memory of this command: {result['peak_rss_mb']:.0f} MB" in md
    assert ("int8_speed_note" in result) == (not has_vnni())

    # report.json names each model as its benchmark rows do
    report = evaluate_run(run)
    assert {name: entry["arch"] for name, entry in report["models"].items()} == arch
    assert {r["model"]: r["arch"] for r in rows} == arch


def test_missing_files_are_reported_not_timed(tmp_path, real_npz, capsys, caplog):
    run = make_run(tmp_path / "solo", real_npz, {"student": tiny_classifier("tiny_student", 4)})
    caplog.set_level(logging.INFO, logger="kd_keras")
    result = benchmark_run(run, tmp_path / "export", **{**FAST, "quiet": False})
    rows = {(r["model"], r["format"]): r for r in result["rows"]}
    assert rows[("student", "keras")]["p50_ms"] > 0
    assert rows[("student", "onnx")]["p50_ms"] is None
    assert "python cli.py export --onnx" in rows[("student", "onnx")]["note"]
    assert "--int8" in rows[("student", "int8")]["note"]
    assert "export --tflite --int8" in rows[("student", "tflite_int8")]["note"]
    assert rows[("teacher", "keras")]["note"] == "run has no teacher.keras"
    assert result["ratios"] == []

    # the library logs its progress (quiet=False) and prints no table: the CLI renders it
    progress = [r.getMessage() for r in caplog.records if r.name == "kd_keras.deploy.benchmark"]
    assert progress[0].startswith("measuring this machine's float32 peak")
    assert "timing student (resnet18) as keras …" in progress
    assert "Benchmark of run solo" not in capsys.readouterr().out
    caplog.clear()
    benchmark_run(run, tmp_path / "export", formats=("keras",), **FAST)
    assert not [r for r in caplog.records if r.name.startswith("kd_keras.deploy")], "quiet"

    text = render(benchmark_renderables(result))
    assert "Benchmark of run solo" in text and "run has no teacher.keras" in text
    assert "student onnx: no student.onnx: run `python cli.py export --onnx` first" in text
    assert f"written to {result['json']} and {result['md']}" in text.replace("\n", "")


def test_the_cli_prints_the_benchmark_table_and_its_progress_on_stderr(tmp_path, real_npz):
    run = make_run(tmp_path / "solo", real_npz, {"student": tiny_classifier("tiny_student", 4)})
    code, out, err = run_cli("benchmark", "--run", str(run), "--export-dir", str(tmp_path / "e"),
                             "--format", "keras", "--warmup", "1", "--iters", "3",
                             "--min-time", "0", "--batch", "4", "--threads", "1")  # fmt: skip
    assert code == 0, err
    assert "Benchmark of run solo" in out and "run has no teacher.keras" in out
    assert "written to" in out and "benchmark.json" in out.replace("\n", "")
    assert "timing student (resnet18) as keras …" in err and "timing student" not in out


def test_other_image_size_rebuilds_with_trained_weights(tmp_path, real_npz):
    keras.utils.set_random_seed(0)
    student = build_student("resnet18", 2, 32, tiny=True)
    run = make_run(tmp_path / "cnn", real_npz, {"student": student})
    result = benchmark_run(run, tmp_path / "export", image_size=64, formats=("keras",), **FAST)

    student = next(r for r in result["rows"] if r["model"] == "student")
    assert student["image_size"] == 64 and student["p50_ms"] > 0
    assert student["arch"] == RunFolder(run).arch("student") == "resnet18"
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
    timing = time_predictor(lambda x: seen.append(len(x)), images, batch=5, warmup=2, iters=10,
                            min_time=0)  # fmt: skip
    assert seen == [1] * 12 + [5] * 3, "warm-up, timed batch-1 calls, 1 + 2 throughput calls"
    assert timing["p50_ms"] <= timing["p90_ms"] <= timing["p99_ms"]
    assert timing["throughput_iters"] == 2 and timing["throughput_ips"] > 0
    assert timing["calls"] == 10 and timing["std_ms"] >= 0

    def slow(x):
        time.sleep(0.002)

    timing = time_predictor(slow, images, batch=2, warmup=0, iters=3, min_time=0.1)
    assert timing["calls"] > 3 and timing["timed_s"] >= 0.1, "time-based: more calls than iters"
    assert timing["throughput_iters"] > 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"formats": ("keras", "coreml")}, "unknown benchmark format 'coreml'; valid: keras"),
        ({"provider": "tpu"}, "unknown provider 'tpu'; valid: auto, cpu, cuda"),
        ({"min_time": -1}, "min_time >= 0"),
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


@pytest.mark.slow
def test_fresh_models_need_no_run(tmp_path):
    """`benchmark --fresh`: untrained architectures at a given size, files under --out."""
    result = benchmark_arch("resnet50", "resnet18", 32, out=tmp_path / "bench", warmup=1,
                             iters=3, batch=2, formats=("keras",), quiet=True,
                             min_time=0)  # fmt: skip
    rows = {r["model"]: r for r in result["rows"]}
    assert rows["teacher"]["params"] > rows["student"]["params"] > 1e7, "real sizes"
    assert all(r["p50_ms"] > 0 and r["note"] == "fresh weights" for r in rows.values())
    assert result["calibration"] == "random pixels" and result["ratios"]
    assert (tmp_path / "bench" / "latency_32px.json").is_file()
    assert (tmp_path / "bench" / "latency_32px.md").is_file()
    with pytest.raises(KDError, match="unknown student architecture 'vgg'"):
        benchmark_arch("resnet50", "vgg", 32, out=tmp_path, quiet=True)
    with pytest.raises(KDError, match="too small"):
        benchmark_arch("resnet50", "resnet18", 16, out=tmp_path, quiet=True)


def test_flops_and_peak(tmp_path):
    """FLOPs counted from the ONNX graph (a ViT's MatMuls need one run for their shapes)."""
    from conftest import build

    from kd_keras.deploy.onnx import to_onnx
    from kd_keras.models.flops import matmul_peak, onnx_flops

    to_onnx(tiny_classifier(width=4), tmp_path / "t.onnx")
    assert onnx_flops(tmp_path / "t.onnx") == {"flops": TINY_FLOPS[4], "uncounted": 0}
    to_onnx(build("vit_small"), tmp_path / "vit.onnx")
    vit = onnx_flops(tmp_path / "vit.onnx")
    assert vit["uncounted"] == 0 and vit["flops"] > 0
    peak = matmul_peak(1, n=64, seconds=0.01)
    assert peak["gflops"] > 0 and peak["threads"] == 1 and peak["calls"] >= 5


def test_providers():
    from kd_keras.runtimes import providers

    assert providers("cpu") == ["CPUExecutionProvider"]
    assert providers("auto")[-1] == "CPUExecutionProvider"
    with pytest.raises(KDError, match="provider cuda: ONNX Runtime .* onnxruntime-gpu"):
        providers("cuda")


@pytest.mark.parametrize(
    "arch, flops", [("mobilenet_v3_small", 3_141_760), ("resnet8x3", 51_954_432)]
)
def test_small_students_flops_and_rebuild_at_deployment_size(tmp_path, tiny_npz, arch, flops):
    """The FLOPs the registry documents (real size, 32 px), and a trained small student is
    rebuilt at 224 px with its own weights for the deployment-size benchmark rows."""
    from kd_keras.deploy.onnx import to_onnx
    from kd_keras.models.flops import onnx_flops

    to_onnx(build_student(arch, 2, 32), tmp_path / "real.onnx")
    assert onnx_flops(tmp_path / "real.onnx") == {"flops": flops, "uncounted": 0}
    run = RunFolder(make_run(tmp_path / "r", tiny_npz, {}, student=arch))
    tiny = build_student(arch, 2, 32, tiny=True)
    model, note = rebuild_at_size(run, "student", tiny, 224, 2)
    assert image_size_of(model) == 224 and "with the trained weights" in note
    assert all(np.array_equal(a, b) for a, b in zip(tiny.get_weights(), model.get_weights(),
                                                   strict=True))  # fmt: skip


def test_benchmark_fresh_is_the_deprecated_name_of_benchmark_arch(tmp_path):
    import kd_keras
    from kd_keras.deploy.benchmark import benchmark_fresh

    assert kd_keras.benchmark_arch is benchmark_arch
    with pytest.warns(
        DeprecationWarning, match="benchmark_fresh is deprecated; use benchmark_arch"
    ):
        with pytest.raises(KDError, match="unknown student architecture 'vgg'"):
            benchmark_fresh("resnet50", "vgg", 32, out=tmp_path, quiet=True)


def test_rebuild_of_a_trained_ensemble_teacher_is_the_same_ensemble_at_the_new_size(
    tmp_path, tiny_npz
):
    run = RunFolder(make_run(tmp_path / "ens", tiny_npz, {}))
    run.cfg.teacher.arch, run.cfg.teacher.members, run.cfg.teacher.variant = "resnet8x3", 2, "tiny"
    members = [build_teacher("resnet8x3", 2, 32, tiny=True) for _ in range(2)]
    trained = build_ensemble(members)
    assert run.arch("teacher") == "ensemble of 2 resnet8x3"
    model, note = rebuild_at_size(run, "teacher", trained, 48, 2)
    assert image_size_of(model) == 48 and "with the trained weights" in note
    assert all(np.array_equal(a, b) for a, b in zip(trained.get_weights(), model.get_weights(),
                                                   strict=True))  # fmt: skip
