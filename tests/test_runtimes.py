"""Running models (`kd_keras.runtimes`): predictors by file suffix, batched probabilities."""

import numpy as np
import pytest
from conftest import tiny_classifier

from kd_keras.errors import KDError
from kd_keras.runtimes import keras_predictor, load_predictor, predict_probs


def test_non_finite_outputs_are_an_error_naming_the_model():
    images = [np.zeros((2, 32, 32, 3), "float32")]
    with pytest.raises(KDError, match="student.keras outputs non-finite logits for 1 of 2"):
        predict_probs(lambda x: np.array([[0.0, 1.0], [np.nan, 0.0]]), images, "student.keras")
    probs = predict_probs(keras_predictor(tiny_classifier()), images)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)


def test_load_predictor_by_suffix(tmp_path):
    model = tiny_classifier()
    model.save(tmp_path / "m.keras")
    x = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(load_predictor(tmp_path / "m.keras")(x), model(x), atol=1e-6)
    with pytest.raises(KDError, match="expected a .keras, .onnx"):
        load_predictor(tmp_path / "m.h5")


# ---------------------------------------------------------------- bad files vs. our own bugs
# A file the runtime cannot read is a one-line KDError; any other exception raised inside the
# same call is a bug and must keep its own type (and traceback).


def test_unreadable_exported_files_are_user_errors(tmp_path):
    from kd_keras.runtimes import (
        file_metadata,
        onnx_session,
        read_tflite_metadata,
        tflite_interpreter,
    )

    junk = np.random.default_rng(0).bytes(1000)
    for name in ("junk.onnx", "junk.tflite"):
        (tmp_path / name).write_bytes(junk)
    with pytest.raises(KDError, match="ONNX Runtime could not load .*junk.onnx"):
        onnx_session(tmp_path / "junk.onnx")
    with pytest.raises(KDError, match="ONNX Runtime could not load .*missing.onnx"):
        onnx_session(tmp_path / "missing.onnx")
    with pytest.raises(KDError, match="junk.onnx is not a readable ONNX file"):
        file_metadata(tmp_path / "junk.onnx")
    with pytest.raises(KDError, match="LiteRT could not load .*junk.tflite"):
        tflite_interpreter(tmp_path / "junk.tflite")
    with pytest.raises(KDError, match="LiteRT could not load TFLite flatbuffer"):
        tflite_interpreter(junk)
    with pytest.raises(KDError, match="junk.tflite is not a readable .tflite file"):
        read_tflite_metadata(tmp_path / "junk.tflite")
    (tmp_path / "short.tflite").write_bytes(junk[:3])
    with pytest.raises(KDError, match="short.tflite is not a readable .tflite file"):
        file_metadata(tmp_path / "short.tflite")


def _bug(exc_type):
    def raise_bug(*args, **kwargs):
        raise exc_type("bug")

    return raise_bug


def test_bugs_inside_the_runtime_calls_keep_their_type(tmp_path, monkeypatch):
    import onnxruntime as ort
    from ai_edge_litert import interpreter, schema_py_generated

    from kd_keras import runtimes

    (tmp_path / "m.onnx").write_bytes(b"x")
    (tmp_path / "m.tflite").write_bytes(b"x" * 16)
    monkeypatch.setattr(ort, "InferenceSession", _bug(TypeError))
    with pytest.raises(TypeError, match="bug"):
        runtimes.onnx_session(tmp_path / "m.onnx")
    monkeypatch.setattr(interpreter, "Interpreter", _bug(TypeError))
    with pytest.raises(TypeError, match="bug"):
        runtimes.tflite_interpreter(tmp_path / "m.tflite")
    # flatbuffers itself raises TypeError on a bad offset, so the bug here is an AttributeError
    monkeypatch.setattr(schema_py_generated.Model, "GetRootAs", _bug(AttributeError))
    with pytest.raises(AttributeError, match="bug"):
        runtimes.read_tflite_metadata(tmp_path / "m.tflite")
    monkeypatch.setattr(runtimes, "read_metadata", _bug(TypeError))
    with pytest.raises(TypeError, match="bug"):
        runtimes.file_metadata(tmp_path / "m.onnx")
