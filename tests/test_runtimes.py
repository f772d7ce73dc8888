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
