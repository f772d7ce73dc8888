import numpy as np
import pytest

from kd_keras import models
from kd_keras.errors import KDError

X = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")

CASES = [
    ("teacher", "resnet50", (2, 2, 1024)),
    ("teacher", "efficientnet_b3", (2, 2, 136)),
    ("student", "resnet18", (2, 2, 256)),
    ("student", "vit_small", (4, 4, 384)),
]


def build(kind, arch, n=3):
    if kind == "teacher":
        return models.build_teacher(arch, n, 32)
    return models.build_student(arch, n, 32, patch_size=8)


@pytest.mark.parametrize("kind, arch, feature_shape", CASES)
def test_model_builds_runs_and_round_trips(tmp_path, kind, arch, feature_shape):
    model = build(kind, arch)
    feature, logits = models.feature_extractor(model)(X)
    assert logits.shape == (2, 3) and np.isfinite(np.asarray(logits)).all()
    assert tuple(feature.shape[1:]) == feature_shape
    path = tmp_path / f"{arch}.keras"
    model.save(path)
    loaded = models.load_model(path)
    np.testing.assert_array_equal(loaded.predict(X, verbose=0), model.predict(X, verbose=0))
    f2, _ = models.feature_extractor(loaded)(X)
    np.testing.assert_array_equal(np.asarray(f2), np.asarray(feature))
    assert models.image_size_of(loaded) == 32


def test_preprocessing_is_inside_the_model():
    layer = models.ImagePreprocessing("imagenet")
    white = np.asarray(layer(np.full((1, 1, 1, 3), 255.0, "float32")))[0, 0, 0]
    np.testing.assert_allclose(white, (1 - np.array(models.IMAGENET_MEAN)) / models.IMAGENET_STD,
                               rtol=1e-5)  # fmt: skip
    caffe = np.asarray(models.ImagePreprocessing("caffe")(np.array([[[[10.0, 20.0, 30.0]]]])))
    np.testing.assert_allclose(caffe[0, 0, 0], np.array([30, 20, 10]) - models.CAFFE_MEAN_BGR,
                               rtol=1e-5)  # fmt: skip


def test_registry_errors_list_valid_names(tmp_path):
    with pytest.raises(KDError, match="valid: resnet50, efficientnet_b3"):
        models.build_teacher("vgg", 2, 32)
    with pytest.raises(KDError, match="student.weights file not found"):
        models.build_student("resnet18", 2, 32, weights=str(tmp_path / "missing"))
    with pytest.raises(KDError, match="model file not found"):
        models.load_model(tmp_path / "x.keras")
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"garbage")
    with pytest.raises(KDError, match="bad.keras could not be loaded"):
        models.load_model(bad)


def test_imagenet_weights_offline_fail_fast_with_advice():
    """On machines without internet the download fails; the error says what to do."""
    try:
        models.build_teacher("resnet50", 2, 32, weights="imagenet")
    except KDError as err:
        assert "teacher.weights" in str(err) and "local file" in str(err)
    # with internet the weights load and the model builds: nothing to assert offline
