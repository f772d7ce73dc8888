"""ONNX export: parity with Keras on real test images, INT8, metadata, and the user's mistakes."""

import json
import logging
from pathlib import Path

import keras
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import CLASSES, make_run, render, run_cli, tiny_classifier

from kd_keras.deploy import export
from kd_keras.deploy.tables import summary_renderables
from kd_keras.errors import KDError
from kd_keras.models.registry import build_student, build_teacher
from kd_keras.runtimes import read_metadata
from kd_keras.workflows.export import export_run


def run_onnx(path: Path, images: np.ndarray) -> dict:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"images": images}), strict=True))


def test_cnn_student_and_teacher_pass_parity_with_int8(tmp_path, real_npz, monkeypatch):
    keras.utils.set_random_seed(0)
    monkeypatch.chdir(tmp_path)  # a relative output folder, as `cli.py export` uses by default
    run = make_run(tmp_path / "runs" / "cnn", real_npz, {
        "student": build_student("resnet18", 2, 32, tiny=True),
        "teacher": build_teacher("resnet50", 2, 32, tiny=True),
    }, teacher="resnet50")  # fmt: skip
    result = export_run(run, out_dir="export", int8=True, quiet=True)

    out = tmp_path / "export" / "cnn"
    files = {"student.onnx", "student.int8.onnx", "teacher.onnx", "teacher.int8.onnx"}
    assert files | {"export.json", "MODEL_CARD.md"} == {p.name for p in out.iterdir()}
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
        # int8 weights are 1/4 of float32; the tiny ResNet50's many small tensors carry
        # per-channel scales and zero points that weigh more than its few weights
        limit = 0.3 if name == "student" else 0.5
        assert int8["size_mb"] < limit * result["artefacts"][name]["size_mb"]
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
    student = build_student("vit_small", 2, 32, patch_size=8, tiny=True)
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
    # the same on a CPU without VNNI: 7-bit weights cannot saturate its 16-bit pair sums
    # (2 * 255 * 64 <= 32767), so the agreement measured here is the agreement there
    assert int8["quantization"]["reduce_range"] is True
    graph = onnx.load(tmp_path / "export/vit/student.int8.onnx").graph
    weights = [onnx.numpy_helper.to_array(t) for t in graph.initializer
               if t.data_type == onnx.TensorProto.INT8]  # fmt: skip
    assert weights and max(int(np.abs(w.astype(np.int32)).max()) for w in weights) <= 64
    assert result["skipped"] == {}


def _with_batch_statistics(model, images):
    """`model` with its batch norms' moving statistics set from `images`: untrained, their
    moving variance of 1 shrinks MobileNetV3's signal to ~1e-8 by the logits, where any
    parity check passes; one training-mode pass at momentum 0 makes the logits O(1)."""
    from kd_keras.models.taps import set_batchnorm_momentum

    set_batchnorm_momentum(model, 0.0)
    model(images, training=True)
    set_batchnorm_momentum(model, 0.9)
    return model


@pytest.mark.parametrize(
    "arch", [pytest.param("mobilenet_v3_small", marks=pytest.mark.slow), "resnet8x3"]
)  # MobileNetV3's TFLite INT8 conversion alone takes about 20 s
def test_small_student_exports_onnx_tflite_and_int8(tmp_path, real_npz, arch):
    """The small students (MobileNetV3: squeeze-excite, hard-swish; the narrow ResNet): FP32
    parity on ONNX and TFLite, static INT8 ONNX and full-integer TFLite that still agree with
    Keras."""
    keras.utils.set_random_seed(0)
    images = np.random.default_rng(0).uniform(0, 255, (64, 32, 32, 3)).astype("float32")
    student = _with_batch_statistics(build_student(arch, 2, 32, tiny=True), images)
    logits = student.predict(images, verbose=0)
    assert np.abs(logits).max() > 0.05, "a parity check on near-zero logits would prove nothing"
    run = make_run(tmp_path / "edge", real_npz, {"student": student}, student=arch)
    result = export_run(run, tmp_path / "export", models=["student"], formats="onnx,tflite",
                        int8=True, limit=64, quiet=True)  # fmt: skip
    arts = result["artefacts"]
    for key in ("student", "student.tflite"):
        parity = arts[key]["parity"]
        assert parity["status"] == "PASS" and parity["max_abs_diff"] <= 1e-4, (key, parity)
    assert arts["student.int8"]["quantization"]["method"] == "static"
    for key in ("student.int8", "student.int8.tflite"):
        assert arts[key]["vs_keras"]["argmax_agreement"] > 0.5, (key, arts[key]["vs_keras"])
    out = tmp_path / "export" / "edge"
    np.testing.assert_allclose(run_onnx(out / "student.onnx", images[:8])["logits"], logits[:8],
                               atol=1e-4)  # fmt: skip


@pytest.mark.parametrize("fmt, what", [("onnx", "ONNX"), ("tflite", "TFLite")])
def test_parity_failure_deletes_the_file_and_raises(tmp_path, real_npz, monkeypatch, fmt, what):
    run = make_run(tmp_path / "bad", real_npz, {"student": tiny_classifier()})
    stale = tmp_path / "export" / "bad" / f"student.{fmt}"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"an older export")

    real = export.keras_predictor
    monkeypatch.setattr(export, "keras_predictor", lambda m: lambda x: real(m)(x) + 1.0)
    with pytest.raises(KDError, match=f"{what} parity check FAILED.*deleted"):
        export_run(run, tmp_path / "export", models=["student"], formats=fmt, limit=64, quiet=True)
    assert not stale.exists(), "a file that disagrees with its model is never left behind"
    assert not (tmp_path / "export" / "bad" / "export.json").exists()


def test_missing_teacher_is_skipped(tmp_path, real_npz, capsys, caplog):
    run = make_run(tmp_path / "solo", real_npz, {"student": tiny_classifier()})
    caplog.set_level(logging.INFO, logger="kd_keras")
    result = export_run(run, tmp_path / "export", limit=32, quiet=True)
    assert list(result["artefacts"]) == ["student"]
    assert result["skipped"] == {"teacher": "run has no teacher.keras"}
    # the library returns the summary and prints nothing; quiet: it logs no progress either
    assert "Export of run" not in capsys.readouterr().out
    assert not [r for r in caplog.records if r.name.startswith("kd_keras.deploy")]
    text = render(summary_renderables(result))
    assert "Export of run solo (32 test images)" in text and "PASS" in text
    assert "skipped teacher: run has no teacher.keras" in text
    assert f"written to {tmp_path / 'export' / 'solo'}" in text.replace("\n", "")


def test_the_cli_prints_the_export_summary_and_its_progress_on_stderr(tmp_path, real_npz):
    run = make_run(tmp_path / "solo", real_npz, {"student": tiny_classifier()})
    code, out, err = run_cli("export", "--onnx", "--run", str(run),
                             "--out", str(tmp_path / "export"))  # fmt: skip
    assert code == 0, err
    assert "Export of run solo (624 test images)" in out and "PASS" in out
    assert "skipped teacher: run has no teacher.keras" in out
    assert "student: converting student.keras (resnet18, 32 px) to ONNX …" in err
    assert "converting" not in out


def test_run_without_student_is_an_error(tmp_path, real_npz):
    run = make_run(tmp_path / "teacher_only", real_npz, {"teacher": tiny_classifier()})
    with pytest.raises(KDError, match="has no student.keras"):
        export_run(run, tmp_path / "export", quiet=True)


def test_unwritable_output_folder_is_an_error(tmp_path, real_npz):
    run = make_run(tmp_path / "r", real_npz, {"student": tiny_classifier()})
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(KDError, match="not writable"):
        export_run(run, blocker, quiet=True)


def test_unknown_format_lists_the_valid_ones(tmp_path):
    with pytest.raises(KDError, match="unknown export format 'coreml'; valid: onnx, tflite"):
        export_run(tmp_path, formats="coreml")


def test_fmt_is_the_deprecated_name_of_formats(tmp_path):
    """`export_run(fmt=...)` still works for one release, with a DeprecationWarning."""
    with pytest.warns(DeprecationWarning, match=r"export_run\(fmt=...\) is deprecated"):
        with pytest.raises(KDError, match="unknown export format 'coreml'; valid: onnx, tflite"):
            export_run(tmp_path, fmt="coreml")


def test_tf2onnx_failures_are_user_errors_and_bugs_keep_their_type(tmp_path, monkeypatch):
    import tf2onnx

    from kd_keras.deploy.onnx import to_onnx

    def failing(error):
        def from_keras(*args, **kwargs):
            raise error

        return from_keras

    monkeypatch.setattr(tf2onnx.convert, "from_keras", failing(ValueError("make_sure failure")))
    with pytest.raises(KDError, match="tf2onnx could not convert 'tiny': make_sure failure"):
        to_onnx(tiny_classifier(), tmp_path / "m.onnx")
    monkeypatch.setattr(tf2onnx.convert, "from_keras", failing(TypeError("bug")))
    with pytest.raises(TypeError, match="bug"):
        to_onnx(tiny_classifier(), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
