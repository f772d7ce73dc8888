"""The model registry: every architecture builds, runs, taps its feature map and round-trips
through `.keras`; real sizes are checked once per architecture."""

from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import PATCH, SIZE, build, url_fetch_failure

from kd_keras import compat
from kd_keras.errors import KDError
from kd_keras.models.layers import CAFFE_MEAN_BGR, IMAGENET_MEAN, IMAGENET_STD, ImagePreprocessing
from kd_keras.models.loading import load_model
from kd_keras.models.registry import STUDENTS, TEACHERS, build_student, build_teacher
from kd_keras.models.taps import (
    all_layers,
    feature_and_logits,
    image_size_of,
    set_batchnorm_momentum,
)

X = np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 3)).astype("float32")

# (architecture, real parameter count with 3 classes (millions), real feature tap at 32 px,
#  tiny feature tap at 32 px)
ARCHS = [
    ("resnet50", 23.59, (2, 2, 1024), (2, 2, 128)),
    ("efficientnet_b3", 10.79, (2, 2, 136), (2, 2, 32)),
    ("resnet18", 11.19, (2, 2, 256), (2, 2, 64)),
    ("mobilenet_v3_small", 0.94, (2, 2, 48), (2, 2, 16)),
    ("resnet8x3", 0.69, (4, 4, 192), (4, 4, 32)),
    ("vit_small", 21.38, (4, 4, 384), (4, 4, 32)),
    ("deit_small", 21.38, (4, 4, 384), (4, 4, 32)),
]
IDS = [a[0] for a in ARCHS]


def test_every_architecture_is_registered():
    assert list(TEACHERS) == ["resnet50", "efficientnet_b3"]
    assert list(STUDENTS) == [
        "resnet18", "mobilenet_v3_small", "resnet8x3", "vit_small", "deit_small",
    ]  # fmt: skip
    assert sorted(IDS) == sorted([*TEACHERS, *STUDENTS])


@pytest.mark.parametrize("arch, params, real_tap, tiny_tap", ARCHS, ids=IDS)
def test_tiny_variant_builds_runs_and_round_trips(tmp_path, tiny_zoo, arch, params, real_tap,
                                                  tiny_tap):  # fmt: skip
    model = tiny_zoo(arch)
    assert model.count_params() < 400_000, "tiny means tiny"
    feature, logits = keras.Model(model.inputs, feature_and_logits(model))(X)
    assert logits.shape == (2, 3) and np.isfinite(np.asarray(logits)).all()
    assert tuple(feature.shape[1:]) == tiny_tap
    path = tmp_path / f"{arch}.keras"
    model.save(path)
    loaded = load_model(path)
    np.testing.assert_array_equal(loaded.predict(X, verbose=0), model.predict(X, verbose=0))
    f2, _ = keras.Model(loaded.inputs, feature_and_logits(loaded))(X)
    np.testing.assert_array_equal(np.asarray(f2), np.asarray(feature))
    assert image_size_of(loaded) == SIZE


@pytest.mark.parametrize("arch, params, real_tap, tiny_tap", ARCHS, ids=IDS)
def test_real_size_parameters_and_feature_tap(real_zoo, arch, params, real_tap, tiny_tap):
    """What the benchmark's size claims rest on: the parameter counts (millions, 3 classes)
    and feature taps of the real-size models, as in ARCHS."""
    model = real_zoo(arch)
    assert model.count_params() / 1e6 == pytest.approx(params, abs=0.01)
    feature, logits = keras.Model(model.inputs, feature_and_logits(model))(X)
    assert tuple(feature.shape[1:]) == real_tap and logits.shape == (2, 3)
    assert np.isfinite(np.asarray(logits)).all()


def test_real_taps_are_the_documented_layers(real_zoo):
    def tap(arch):
        return compat.producing_layer(feature_and_logits(real_zoo(arch))[0]).name

    assert tap("resnet50") == "conv4_block6_out"
    assert tap("efficientnet_b3") == "block5e_add"
    assert tap("mobilenet_v3_small") == "expanded_conv_7_add"
    assert tap("resnet8x3") == "narrow_stage3_out"
    backbone = real_zoo("deit_small").get_layer("deit_backbone")
    assert (backbone.hidden_dim, backbone.num_layers, backbone.num_heads) == (384, 12, 6)
    assert backbone.intermediate_dim == 1536
    assert tuple(backbone.output.shape[1:]) == (2 + (SIZE // PATCH) ** 2, 384)


def test_small_student_is_at_most_a_twentieth_of_the_teacher(real_zoo):
    """Issue 22: the edge student has <= 1/20 of the default ResNet50 teacher's parameters."""
    teacher = real_zoo("resnet50", 2).count_params()
    small = {arch: real_zoo(arch, 2).count_params() for arch in ("mobilenet_v3_small", "resnet8x3")}
    assert all(n <= teacher / 20 for n in small.values()), (small, teacher)
    assert small == {"mobilenet_v3_small": 940_274, "resnet8x3": 686_626}


@pytest.mark.parametrize("arch, last_map", [("mobilenet_v3_small", 1), ("resnet8x3", 2)])
def test_no_stage_collapses_at_the_minimum_image_size(arch, last_map):
    """At `MIN_IMAGE_SIZE` every feature map of the real model is at least `last_map` wide and
    the tap at least 2x2; one pixel less is refused by the config."""
    from kd_keras.archs import MIN_IMAGE_SIZE
    from kd_keras.config import build_config

    size = MIN_IMAGE_SIZE[arch]
    model = build_student(arch, 2, size)
    maps = [lay.output.shape for lay in model.layers if len(lay.output.shape) == 4]
    assert maps and min(min(s[1], s[2]) for s in maps) == last_map
    assert tuple(feature_and_logits(model)[0].shape[1:3]) == (2, 2)
    with pytest.raises(KDError, match=f"data.image_size = {size - 1} is too small"):
        build_config({"data": {"image_size": size - 1}, "student": {"arch": arch}}, Path("."))


def test_preprocessing_is_inside_the_model():
    layer = ImagePreprocessing("imagenet")
    white = np.asarray(layer(np.full((1, 1, 1, 3), 255.0, "float32")))[0, 0, 0]
    np.testing.assert_allclose(white, (1 - np.array(IMAGENET_MEAN)) / IMAGENET_STD,
                               rtol=1e-5)  # fmt: skip
    caffe = np.asarray(ImagePreprocessing("caffe")(np.array([[[[10.0, 20.0, 30.0]]]])))
    np.testing.assert_allclose(caffe[0, 0, 0], np.array([30, 20, 10]) - CAFFE_MEAN_BGR,
                               rtol=1e-5)  # fmt: skip


def test_registry_errors_list_valid_names(tmp_path):
    with pytest.raises(KDError, match="valid: resnet50, efficientnet_b3"):
        build_teacher("vgg", 2, 32)
    with pytest.raises(KDError, match="student.weights file not found"):
        build_student("resnet18", 2, 32, weights=str(tmp_path / "missing"))
    with pytest.raises(KDError, match="model file not found"):
        load_model(tmp_path / "x.keras")
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"garbage")
    with pytest.raises(KDError, match="bad.keras could not be loaded"):
        load_model(bad)
    with pytest.raises(KDError, match='tiny resnet18 has no pretrained weights.*"none"'):
        build_student("resnet18", 2, 32, weights="imagenet", tiny=True)
    with pytest.raises(KDError, match="tiny mobilenet_v3_small has no pretrained weights"):
        build_student("mobilenet_v3_small", 2, 32, weights="imagenet", tiny=True)
    with pytest.raises(KDError, match="student.weights file not found"):
        build_student("mobilenet_v3_small", 2, 32, weights=str(tmp_path / "missing"))
    with pytest.raises(KDError, match='resnet8x3 has no ImageNet weights.*"none"'):
        build_student("resnet8x3", 2, 32, weights="imagenet")


def test_internal_build_failures_are_not_reported_as_weight_problems(monkeypatch):
    """A bug while building a from-scratch model keeps its own exception (and traceback)."""
    import keras

    def broken(**kwargs):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(keras.applications, "ResNet50", broken)
    with pytest.raises(RuntimeError, match="an internal bug"):
        build_teacher("resnet50", 2, 32, weights="none")


@pytest.mark.parametrize(
    "arch, advice",
    [
        ("resnet50", ("teacher.weights", "local file")),
        ("mobilenet_v3_small", ("student.weights", "mobilenet_v3_small")),
    ],
)
def test_imagenet_weights_offline_fail_fast_with_advice(arch, advice):
    """On machines without internet the download fails; the error says what to do."""
    build_ = build_teacher if arch in TEACHERS else build_student
    try:
        model = build_(arch, 2, 32, weights="imagenet")
    except KDError as err:
        assert all(words in str(err) for words in advice), str(err)
    else:  # with internet: the pretrained backbone under a fresh 2-class head
        assert model.output_shape == (None, 2)
        assert np.isfinite(np.asarray(model(X[:1, :32, :32]))).all()


def test_batchnorm_momentum_reaches_nested_layers_and_is_saved(tmp_path):
    """train.batchnorm_momentum reaches the batch norms inside a keras.applications backbone
    (nested model) and survives saving; transformer students have none to set."""
    model = build("efficientnet_b3")
    count = set_batchnorm_momentum(model, 0.9)
    assert count > 10
    model.save(tmp_path / "m.keras")
    loaded = load_model(tmp_path / "m.keras", "model")
    bns = [lay for lay in all_layers(loaded)
           if isinstance(lay, keras.layers.BatchNormalization)]  # fmt: skip
    assert len(bns) == count and {b.momentum for b in bns} == {0.9}
    assert set_batchnorm_momentum(build("deit_small"), 0.9) == 0


def test_every_registered_architecture_has_its_facts():
    """One kd_keras.archs entry (minimum size or patch rule, feature tap, XLA preference) per
    builder in the registry, in the same order (the taps are tried in it)."""
    from kd_keras.archs import ARCHS, STUDENT_ARCHS, TEACHER_ARCHS, TOKEN_ARCHS

    assert tuple(TEACHERS) + tuple(STUDENTS) == tuple(ARCHS) and tuple(STUDENTS) == STUDENT_ARCHS
    # every convolutional student can also be trained as the teacher (teacher.members)
    convolutional = tuple(a for a in STUDENTS if a not in TOKEN_ARCHS)
    assert TEACHER_ARCHS == tuple(TEACHERS) + convolutional


def _bug(exc_type, message="bug"):
    def raise_bug(*args, **kwargs):
        raise exc_type(message)

    return raise_bug


def test_bugs_while_loading_or_fetching_weights_keep_their_type(tmp_path, monkeypatch):
    """Only the exception types Keras and keras-hub raise for a bad file or a failed download
    become a KDError; any other type (a bug) keeps its own exception and traceback."""
    import zipfile

    import keras_hub

    from kd_keras.models.backbones import hub_backbone

    # a .keras archive without config.json: Keras raises KeyError, a user error
    with zipfile.ZipFile(tmp_path / "noconfig.keras", "w") as archive:
        archive.writestr("metadata.json", "{}")
    with pytest.raises(KDError, match="noconfig.keras could not be loaded: .*config.json"):
        load_model(tmp_path / "noconfig.keras")
    monkeypatch.setattr(keras.saving, "load_model", _bug(AttributeError))
    with pytest.raises(AttributeError, match="bug"):
        load_model(tmp_path / "noconfig.keras")

    monkeypatch.setattr(keras.applications, "ResNet50", url_fetch_failure)
    with pytest.raises(KDError, match="could not load ImageNet weights for resnet50"):
        build_teacher("resnet50", 2, 32, weights="imagenet")
    monkeypatch.setattr(keras.applications, "ResNet50", _bug(TypeError))
    with pytest.raises(TypeError, match="bug"):
        build_teacher("resnet50", 2, 32, weights="imagenet")

    (tmp_path / "empty_preset").mkdir()
    with pytest.raises(KDError, match="could not load student.weights = .*empty_preset.*config"):
        hub_backbone(keras_hub.models.ViTBackbone, "vit", str(tmp_path / "empty_preset"),
                     "vit_small", "student.weights")  # fmt: skip

    class Broken:
        from_preset = staticmethod(_bug(TypeError))

    with pytest.raises(TypeError, match="bug"):
        hub_backbone(Broken, "vit", "imagenet", "vit_small", "student.weights")
    Broken.from_preset = staticmethod(_bug(OSError, "Max retries exceeded"))
    with pytest.raises(KDError, match="ImageNet weights for vit_small .Max retries exceeded"):
        hub_backbone(Broken, "vit", "imagenet", "vit_small", "student.weights")
