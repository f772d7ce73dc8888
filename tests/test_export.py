"""ONNX export: parity with Keras on real test images, INT8, metadata, and the user's mistakes."""

import json
import os
import time
from pathlib import Path

import keras
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from kd_keras import export
from kd_keras.errors import KDError
from kd_keras.export import export_run, find_run, read_metadata
from kd_keras.models import build_student, build_teacher

CLASSES = ["normal", "pneumonia"]


def make_run(folder: Path, npz: Path, models: dict, student="resnet18", teacher="efficientnet_b3",
             threshold=0.4) -> Path:  # fmt: skip
    """A run folder as training leaves it: config.toml, <name>.keras files and report.json."""
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(
        f'[run]\nname = "{folder.name}"\nseed = 0\n'
        f'[data]\npath = "{npz}"\nimage_size = 32\nbatch_size = 128\nlimit_train = 64\n'
        f'[teacher]\narch = "{teacher}"\n[student]\narch = "{student}"\npatch_size = 8\n'
        "[export]\ncalibration_samples = 32\n"
    )
    for name, model in models.items():
        model.save(folder / f"{name}.keras")
    entries = {name: {"threshold": threshold if name == "student" else None} for name in models}
    (folder / "report.json").write_text(
        json.dumps({"class_names": CLASSES, "image_size": 32, "models": entries})
    )
    return folder


def tiny_model(name="tiny") -> keras.Model:
    """Same contract as the real models (pixels in [0, 255] named `images`, logits out); it
    converts in about a second, for the tests of error paths."""
    inputs = keras.Input((32, 32, 3), name="images")
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="logits")(x), name=name)


def run_onnx(path: Path, images: np.ndarray) -> dict:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"images": images}), strict=True))


def test_cnn_student_and_teacher_pass_parity_with_int8(tmp_path, real_npz, monkeypatch):
    keras.utils.set_random_seed(0)
    monkeypatch.chdir(tmp_path)  # a relative output folder, as `cli.py export` uses by default
    run = make_run(tmp_path / "runs" / "cnn", real_npz, {
        "student": build_student("resnet18", 2, 32),
        "teacher": build_teacher("efficientnet_b3", 2, 32),
    })  # fmt: skip
    result = export_run(run, out_dir="export", int8=True, quiet=True)

    out = tmp_path / "export" / "cnn"
    files = {"student.onnx", "student.int8.onnx", "teacher.onnx", "teacher.int8.onnx"}
    assert files | {"export.json"} == {p.name for p in out.iterdir()}
    for name in ("student", "teacher"):
        parity = result["artefacts"][name]["parity"]
        assert parity["status"] == "PASS" and parity["max_abs_diff"] <= 1e-4
        assert parity["n"] == 624, "default: the whole real test split"
        assert parity["argmax_agreement"] == 1.0
        assert parity["outputs"] == [
            {"name": "logits", "shape": ["batch", 2]},
            {"name": "probabilities", "shape": ["batch", 2]},
        ]
        int8 = result["artefacts"][f"{name}.int8"]
        assert int8["quantization"]["method"] == "static"
        assert int8["quantization"]["calibration_split"] == "train"
        assert int8["size_mb"] < 0.3 * result["artefacts"][name]["size_mb"]
        for entry in (result["artefacts"][name], int8):
            assert 0.0 <= entry["metrics"]["balanced_accuracy"] <= 1.0
            assert entry["metrics"]["n"] == 624
    assert result["artefacts"]["student"]["metrics"]["threshold"] == 0.4

    meta = read_metadata(out / "student.onnx")
    assert json.loads(meta["class_names"]) == CLASSES
    assert meta["image_size"] == "32" and meta["input_range"] == "0-255 RGB NHWC"
    assert meta["decision_threshold"] == "0.4"
    assert meta["source_run"] == str(run.resolve()) and meta["kd_keras_version"]
    assert (
        json.loads(read_metadata(out / "student.int8.onnx")["quantization"])["method"] == "static"
    )
    assert "decision_threshold" not in read_metadata(out / "teacher.onnx")

    images = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    outputs = run_onnx(out / "student.int8.onnx", images)
    assert outputs["logits"].shape == (3, 2)
    np.testing.assert_allclose(outputs["probabilities"].sum(axis=1), 1.0, rtol=1e-5)
    on_disk = json.loads((out / "export.json").read_text())
    assert on_disk["artefacts"].keys() == result["artefacts"].keys()


def test_vit_student_exports_gelu_and_quantizes_dynamically(tmp_path, real_npz):
    keras.utils.set_random_seed(0)
    student = build_student("vit_small", 2, 32, patch_size=8)
    run = make_run(tmp_path / "vit", real_npz, {"student": student}, student="vit_small")
    result = export_run(run, tmp_path / "export", models=["student"], int8=True, limit=64,
                        quiet=True)  # fmt: skip

    parity = result["artefacts"]["student"]["parity"]
    assert parity["status"] == "PASS" and parity["n"] == 64
    ops = {node.op_type for node in onnx.load(tmp_path / "export/vit/student.onnx").graph.node}
    assert "Erf" in ops and "Erfc" not in ops, "exact GELU's Erfc is rewritten as 1 - Erf"
    int8 = result["artefacts"]["student.int8"]
    assert int8["quantization"]["method"] == "dynamic"
    assert int8["vs_keras"]["argmax_agreement"] > 0.9
    assert result["skipped"] == {}


def test_parity_failure_deletes_the_file_and_raises(tmp_path, real_npz, monkeypatch):
    run = make_run(tmp_path / "bad", real_npz, {"student": tiny_model()})
    stale = tmp_path / "export" / "bad" / "student.onnx"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"an older export")

    real = export.keras_predictor
    monkeypatch.setattr(export, "keras_predictor", lambda m: lambda x: real(m)(x) + 1.0)
    with pytest.raises(KDError, match="parity check FAILED.*deleted"):
        export_run(run, tmp_path / "export", models=["student"], quiet=True)
    assert not stale.exists(), "a file that disagrees with its model is never left behind"
    assert not (tmp_path / "export" / "bad" / "export.json").exists()


def test_missing_teacher_is_skipped(tmp_path, real_npz):
    run = make_run(tmp_path / "solo", real_npz, {"student": tiny_model()})
    result = export_run(run, tmp_path / "export", limit=32, quiet=True)
    assert list(result["artefacts"]) == ["student"]
    assert result["skipped"] == {"teacher": "run has no teacher.keras"}


def test_run_without_student_is_an_error(tmp_path, real_npz):
    run = make_run(tmp_path / "teacher_only", real_npz, {"teacher": tiny_model()})
    with pytest.raises(KDError, match="has no student.keras"):
        export_run(run, tmp_path / "export", quiet=True)


def test_unwritable_output_folder_is_an_error(tmp_path, real_npz):
    run = make_run(tmp_path / "r", real_npz, {"student": tiny_model()})
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(KDError, match="not writable"):
        export_run(run, blocker, quiet=True)


def test_unknown_format_lists_the_valid_ones(tmp_path):
    with pytest.raises(KDError, match="unknown export format 'tflite'; valid: onnx"):
        export_run(tmp_path, fmt="tflite")


def test_find_run(tmp_path):
    with pytest.raises(KDError, match="no run found under .*cli.py distill"):
        find_run(None, runs_dir=tmp_path / "runs")
    with pytest.raises(KDError, match="run folder not found"):
        find_run(tmp_path / "nowhere")
    (tmp_path / "not_a_run").mkdir()
    with pytest.raises(KDError, match="no config.toml"):
        find_run(tmp_path / "not_a_run")
    for i, name in enumerate(["older", "newer"]):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "config.toml").write_text("")
        stamp = time.time() - 100 + i * 50
        os.utime(tmp_path / "runs" / name / "config.toml", (stamp, stamp))
        os.utime(tmp_path / "runs" / name, (stamp, stamp))
    assert find_run(None, runs_dir=tmp_path / "runs").name == "newer"
