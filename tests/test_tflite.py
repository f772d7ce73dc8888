"""TFLite / LiteRT export: FP32 parity, full-integer INT8 with its own threshold, metadata."""

import json

import keras
import numpy as np
import pytest
from conftest import CLASSES, make_run, tiny_classifier

from kd_keras.data.pipeline import make_dataset
from kd_keras.evaluation.metrics import choose_threshold
from kd_keras.run.folder import RunFolder
from kd_keras.runtimes import (
    keras_predictor,
    load_predictor,
    predict,
    read_metadata,
    read_tflite_metadata,
    softmax,
    tflite_interpreter,
    tflite_io,
)
from kd_keras.workflows.export import export_run


def test_fp32_parity_metadata_and_predictor(tmp_path, real_npz):
    keras.utils.set_random_seed(0)
    model = tiny_classifier("tiny_student", 4)
    run = make_run(tmp_path / "r", real_npz, {"student": model})
    result = export_run(run, tmp_path / "export", formats="tflite", limit=64, quiet=True)

    entry = result["artefacts"]["student.tflite"]
    assert entry["parity"]["status"] == "PASS" and entry["parity"]["max_abs_diff"] <= 1e-4
    assert entry["parity"]["n"] == 64 and entry["parity"]["argmax_agreement"] == 1.0
    path = tmp_path / "export" / "r" / "student.tflite"
    assert {p.suffix for p in path.parent.iterdir()} == {".tflite", ".json", ".md"}, "no .onnx"

    meta = read_tflite_metadata(path)
    assert json.loads(meta["class_names"]) == CLASSES
    assert meta["image_size"] == "32" and meta["input_range"] == "0-255 RGB NHWC"
    assert meta["decision_threshold"] == "0.4" and meta["precision"] == "float32"
    assert meta["source_run"] == str(run.resolve())
    assert json.loads(meta["preprocessing"])["source"] == "medmnist"
    io = tflite_io(tflite_interpreter(path))
    assert io["images"]["dtype"] == io["logits"]["dtype"] == "float32"
    assert set(io) == {"images", "logits", "probabilities"}

    images = np.random.default_rng(0).uniform(0, 255, (5, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(load_predictor(path)(images), keras_predictor(model)(images),
                               atol=1e-5)  # fmt: skip


def test_int8_files_choose_their_own_threshold_on_validation(tmp_path, real_npz):
    """ONNX INT8 and full-integer TFLite INT8: each file's metadata threshold is what
    `choose_threshold` gives on that file's own validation probabilities. The FP32 threshold
    is chosen the same way on the Keras model, as evaluation does; quantisation moves the
    probabilities, so the INT8 thresholds land elsewhere."""
    keras.utils.set_random_seed(3)
    model = tiny_classifier("tiny_student", 8)
    folder = tmp_path / "q"
    run = RunFolder(make_run(folder, real_npz, {"student": model}, threshold=None))
    val = run.load_splits().val
    val_batches = make_dataset(val, 32, 128, labels=False, cache=False)
    fp32 = choose_threshold(val.labels, softmax(predict(keras_predictor(model), val_batches)))
    report = json.loads(run.report_path.read_text())
    report["models"]["student"]["threshold"] = fp32
    run.report_path.write_text(json.dumps(report))

    result = export_run(folder, tmp_path / "export", formats="onnx,tflite", int8=True, limit=64,
                        quiet=True)  # fmt: skip
    out = tmp_path / "export" / "q"
    chosen = {}
    for key, meta_of in (("student.int8", read_metadata),
                         ("student.int8.tflite", read_tflite_metadata)):  # fmt: skip
        entry = result["artefacts"][key]
        path = out / entry["file"]
        own = choose_threshold(val.labels, softmax(predict(load_predictor(path), val_batches)))
        assert float(meta_of(path)["decision_threshold"]) == pytest.approx(own)
        assert entry["threshold"] == pytest.approx(own) and entry["threshold_fp32"] == fp32
        assert entry["metrics"]["threshold"] == pytest.approx(own)
        assert entry["vs_keras"]["argmax_agreement"] > 0.5
        chosen[key] = own
    assert all(t != pytest.approx(fp32) for t in chosen.values()), "quantisation moved them"

    meta = read_tflite_metadata(out / "student.int8.tflite")
    io = json.loads(meta["io_quantization"])
    assert io["images"]["dtype"] == "int8" and "zero_point" in meta["input"]
    assert json.loads(meta["quantization"])["calibration_samples"] == 32
    assert result["artefacts"]["student.tflite"]["parity"]["passed"]


def test_cli_exports_both_formats_and_needs_one(tmp_path, real_npz):
    from conftest import run_cli

    run = make_run(tmp_path / "c", real_npz, {"student": tiny_classifier()})
    code, out, err = run_cli("export", "--onnx", "--tflite", "--run", str(run), "--out",
                             str(tmp_path / "export"), "--no-teacher")  # fmt: skip
    assert code == 0, err
    assert "student.onnx" in out and "student.tflite" in out and "PASS" in out
    code, _, err = run_cli("export", "--run", str(run))
    assert code == 2 and "choose a format: --onnx and/or --tflite" in err


def test_conversion_failures_are_user_errors_and_bugs_keep_their_type():
    """The converter's own errors (ConverterError; RuntimeError from the calibrator) name the
    model; any other exception while converting (a bug) keeps its type and traceback."""
    from kd_keras import compat
    from kd_keras.deploy import tflite
    from kd_keras.errors import KDError

    with pytest.raises(KDError, match="TFLite could not convert 'tiny': .*resize"):
        tflite.convert(tiny_classifier(), [np.zeros((2, 8, 8, 3), "float32")])  # wrong size

    class Converter:
        def __init__(self, error):
            self.error = error

        def convert(self):
            raise self.error

    failure = compat.tflite_converter_error()("op not supported")
    with pytest.raises(KDError, match="TFLite could not convert 'm': op not supported"):
        tflite._convert(Converter(failure), "m", None)
    with pytest.raises(TypeError, match="bug"):
        tflite._convert(Converter(TypeError("bug")), "m", None)
