"""Bring your own teacher: any Keras classifier, SavedModel or preset, at its own resolution and
input scaling, checked before training, its outputs cached when the teacher is frozen."""

import importlib.util
import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import ROOT, SIZE, run_cli

from kd_keras.config import build_config
from kd_keras.data.pipeline import make_dataset
from kd_keras.data.sources import load_splits
from kd_keras.distill.distiller import Distiller
from kd_keras.distill.teacher import resolve_view, teacher_view
from kd_keras.distill.teacher_cache import TeacherCache
from kd_keras.errors import KDError
from kd_keras.models.loading import load_model, load_teacher
from kd_keras.models.registry import build_student, build_teacher
from kd_keras.models.taps import feature_and_logits

X = np.random.default_rng(0).uniform(0, 255, (4, SIZE, SIZE, 3)).astype("float32")
Y = np.array([0, 1, 1, 0])
CLASSES = ["normal", "pneumonia"]
XRAY = str(ROOT / "configs" / "xray.toml")


def example():
    """examples/own_teacher.py, the README's worked example, as a module."""
    spec = importlib.util.spec_from_file_location("own_teacher", ROOT / "examples/own_teacher.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cfg_with(tmp_path, **teacher_keys):
    return build_config({"teacher": teacher_keys}, tmp_path)


def view_of(path, tmp_path, **teacher_keys):
    model = load_teacher(str(path))
    view = resolve_view(model, cfg_with(tmp_path, **teacher_keys), CLASSES)
    return model, view, teacher_view(model, view)


def distil_one_step(view_model, beta=1.0):
    student = build_student("resnet18", 2, SIZE, tiny=True)
    d = Distiller(student, view_model, alpha=0.5, beta=beta)
    d.compile(optimizer=keras.optimizers.SGD(0.01))
    logs = d.train_on_batch(X, Y, return_dict=True)
    assert all(np.isfinite(v) for v in logs.values()), logs
    return d, logs


@pytest.fixture(scope="module")
def nested_file(tmp_path_factory):
    """The issue's teacher: a keras.applications backbone nested in a functional model, a
    one-element output list, 48 px, [-1, 1] inputs (untrained: shapes and plumbing only)."""
    path = tmp_path_factory.mktemp("nested") / "nested.keras"
    example().build_teacher(48).save(path)
    return path


def test_nested_application_teacher_sees_its_own_size_and_scaling(nested_file, tmp_path):
    model, view, wrapped = view_of(nested_file, tmp_path)
    assert isinstance(model.output, list) and len(model.outputs) == 1, "saved as a list"
    assert (view.image_size, view.scaling, view.outputs) == (48, "symmetric", "logits")
    d, logs = distil_one_step(wrapped)
    assert {"kd", "feat"} <= set(logs)
    # what the teacher got: the 32 px batch resized to 48 px and scaled to [-1, 1]
    expected = model(tf.image.resize(X, (48, 48), antialias=True) / 127.5 - 1.0)
    expected = expected[0] if isinstance(expected, list) else expected
    np.testing.assert_allclose(d.teacher_outputs(X)["logits"], expected, atol=1e-5)
    # the feature tap was found inside the nested backbone
    tap = feature_and_logits(wrapped)[0]
    assert tuple(tap.shape[1:3]) == (2, 2) and tap.shape[-1] == 1280


def test_named_feature_layer_through_nested_models_and_missing_one(nested_file, tmp_path):
    _, _, wrapped = view_of(nested_file, tmp_path)
    name = "xray_net.mobilenetv2_0.35_48.block_13_expand_relu"  # layer names may hold dots
    feature, logits = feature_and_logits(wrapped, name)
    assert tuple(feature.shape[1:]) == (3, 3, 192) and tuple(logits.shape[1:]) == (2,)
    with pytest.raises(KDError, match="'xray_net.nope' not found.*spatial output.*out_relu"):
        feature_and_logits(wrapped, "xray_net.nope")


def test_sequential_probability_teacher(tmp_path):
    seq = keras.Sequential([
        keras.Input((SIZE, SIZE, 3)), keras.layers.Rescaling(1 / 255.0),
        keras.layers.Conv2D(4, 3), keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(2, activation="softmax"),
    ])  # fmt: skip
    seq.save(tmp_path / "seq.keras")
    model, view, wrapped = view_of(tmp_path / "seq.keras", tmp_path)
    assert (view.scaling, view.outputs) == ("raw", "probabilities"), "Rescaling first: raw"
    d, _ = distil_one_step(wrapped)
    np.testing.assert_allclose(d.teacher_outputs(X)["logits"], np.log(model(X)), atol=1e-5)


def test_saved_model_teacher_distils_logits_only(tmp_path):
    inputs = keras.Input((40, 40, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inputs / 255.0))
    keras.Model(inputs, keras.layers.Dense(2)(x)).export(str(tmp_path / "sm"), verbose=False)
    model, view, wrapped = view_of(tmp_path / "sm", tmp_path, input_scaling="raw")
    assert view.image_size == 40
    with pytest.raises(KDError, match="no spatial feature map.*distill.beta = 0"):
        distil_one_step(wrapped, beta=1.0)
    d, logs = distil_one_step(wrapped, beta=0.0)
    expected = model(tf.image.resize(X, (40, 40), antialias=True))
    np.testing.assert_allclose(d.teacher_outputs(X)["logits"], expected, atol=1e-5)
    wrapped.save(tmp_path / "view.keras")  # the run folder keeps this view as teacher.keras
    again = load_model(tmp_path / "view.keras")  # safe mode: the SavedModel is trusted
    x40 = tf.image.resize(X, (40, 40))
    np.testing.assert_allclose(again(x40), wrapped(x40), atol=1e-6)


def test_unknown_scaling_class_order_and_class_count(tmp_path):
    inputs = keras.Input((SIZE, SIZE, 3))
    plain = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(inputs)), name="m")
    plain.save(tmp_path / "plain.keras")
    with pytest.raises(KDError, match="cannot tell which input scaling.*teacher.input_scaling"):
        view_of(tmp_path / "plain.keras", tmp_path)
    model, view, wrapped = view_of(tmp_path / "plain.keras", tmp_path, input_scaling="unit",
                                   class_order=["pneumonia", "normal"])  # fmt: skip
    assert view.class_order == [1, 0]
    np.testing.assert_allclose(wrapped(X), np.asarray(model(X / 255.0))[:, ::-1], atol=1e-5)
    with pytest.raises(KDError, match="teacher.class_order"):
        view_of(tmp_path / "plain.keras", tmp_path, input_scaling="unit", class_order=["a", "b"])
    with pytest.raises(KDError, match="outputs 2 classes but the data has 3"):
        resolve_view(model, cfg_with(tmp_path, input_scaling="raw"), ["a", "b", "c"])


def test_loading_errors_name_what_to_do(tmp_path):
    @keras.saving.register_keras_serializable(package="user_code")
    class Secret(keras.layers.Layer):
        def call(self, x):
            return x

    inputs = keras.Input((SIZE, SIZE, 3))
    out = keras.layers.Dense(2)(keras.layers.Flatten()(Secret()(inputs)))
    keras.Model(inputs, out).save(tmp_path / "custom.keras")
    keras.saving.get_custom_objects().pop("user_code>Secret")
    with pytest.raises(KDError, match="needs the custom class 'Secret'"):
        load_teacher(str(tmp_path / "custom.keras"))
    with pytest.raises(KDError, match="teacher.path file not found"):
        load_teacher(str(tmp_path / "absent.keras"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(KDError, match="neither a SavedModel"):
        load_teacher(str(tmp_path / "folder"))
    with pytest.raises(KDError, match="could not load the keras-hub preset"):
        load_teacher("kaggle://nobody/no-such-model/keras/none")


def test_cached_teacher_outputs_give_the_uncached_loss(tmp_path, real_npz):
    """The cache holds exactly what the teacher computes per step on un-augmented batches."""
    train = load_splits(build_config({"data": {"path": str(real_npz)}}, tmp_path).data).train
    train = train.subset(np.arange(48))
    keras.utils.set_random_seed(0)
    student = build_student("resnet18", 2, SIZE, tiny=True)
    d = Distiller(student, build_teacher("resnet50", 2, 48, tiny=True), beta=1.0)
    for storage in ("memory", "disk"):
        cache = TeacherCache(d, train, 48, 16, storage, tmp_path / "cache")
        assert set(cache.arrays) == {"logits", "feature"} and cache.nbytes > 0
        cached = make_dataset(train, 48, 16, training=True, seed=1, teacher_cache=cache)
        plain = make_dataset(train, 48, 16, training=True, seed=1)
        (xc, yc), (xp, yp) = next(iter(cached)), next(iter(plain))
        np.testing.assert_array_equal(yc, yp)
        assert set(xc) == {"images", "teacher_logits", "teacher_feature"}
        with_cache = d.compute_terms(yc, d.student_outputs(xc["images"], False),
                                     d.teacher_outputs(xc))  # fmt: skip
        without = d.compute_terms(yp, d.student_outputs(xp, False), d.teacher_outputs(xp))
        for key in ("loss", "kd", "feat"):
            assert float(with_cache[key]) == pytest.approx(float(without[key]), rel=1e-5), key


@pytest.fixture(scope="module")
def trained_symmetric_teacher(real_npz, tmp_path_factory):
    """A teacher fine-tuned "elsewhere" (examples/own_teacher.py) at 48 px on [-1, 1] inputs
    (2000 training images: validation balanced accuracy about 0.9, the tests need > 0.7)."""
    path = tmp_path_factory.mktemp("own") / "teacher_48px.keras"
    example().fine_tune(real_npz, size=48, epochs=3, limit=2000).save(path)
    return path


def common_sets(npz, out, name):
    sets = [
        f"data.path={npz}",
        f"run.output_dir={out}",
        f"run.name={name}",
        "data.limit_train=200",
        "student.epochs=1",
        "student.variant=tiny",
        "train.verbose=0",
    ]
    return [a for s in sets for a in ("--set", s)]  # fmt: skip


@pytest.mark.slow
def test_scaling_mismatch_is_stopped_by_the_teacher_check(trained_symmetric_teacher, real_npz,
                                                          tmp_path):  # fmt: skip
    code, out, err = run_cli(
        "distill", "--config", XRAY, "--stages", "distill",
        "--set", f"teacher.path={trained_symmetric_teacher}", "--set", "teacher.input_scaling=raw",
        *common_sets(real_npz, tmp_path, "mismatch"),
    )  # fmt: skip
    assert code == 2, err
    assert "no better than chance" in err and "teacher.input_scaling (now 'raw'" in err
    assert not (tmp_path / "mismatch" / "student.keras").exists(), "stopped before training"


@pytest.mark.slow
def test_own_teacher_end_to_end(trained_symmetric_teacher, real_npz, tmp_path):
    """The real file, a teacher at 48 px on [-1, 1] inputs, a student at 32 px on raw pixels."""
    code, out, err = run_cli(
        "distill", "--config", XRAY, "--stages", "distill",
        "--set", f"teacher.path={trained_symmetric_teacher}",
        "--set", "augment.random_resized_crop=false", "--set", "augment.horizontal_flip=false",
        "--set", "augment.color_jitter=0.0",
        *common_sets(real_npz, tmp_path, "own"),
    )  # fmt: skip
    assert code == 0, err[-3000:]
    assert "input scaling symmetric" in out and "teacher check on validation" in out
    assert "teacher cache (memory)" in out, "augmentation off: the frozen teacher is cached"
    report = json.loads((tmp_path / "own" / "report.json").read_text())
    assert list(report["models"]) == ["teacher", "student"]
    assert report["models"]["teacher"]["image_size"] == 48
    assert report["models"]["student"]["image_size"] == 32
    assert report["models"]["teacher"]["val"]["balanced_accuracy"] > 0.7
    assert "| student |" in out


def test_bugs_while_loading_a_teacher_keep_their_type(tmp_path, monkeypatch):
    """A SavedModel or preset that cannot be read is a KDError; any other exception raised
    while loading it (a bug) keeps its own type and traceback."""
    import keras_hub

    def bug(*args, **kwargs):
        raise TypeError("bug")

    folder = tmp_path / "garbage"
    folder.mkdir()
    (folder / "saved_model.pb").write_bytes(np.random.default_rng(0).bytes(500))
    with pytest.raises(KDError, match="garbage is not a readable SavedModel: Cannot parse"):
        load_teacher(str(folder))

    class NoSignature(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
        def f(self, x):
            return x

    tf.saved_model.save(NoSignature(), str(tmp_path / "nosig"), signatures={})
    with pytest.raises(KDError, match="nosig is not a readable SavedModel: 'serving_default'"):
        load_teacher(str(tmp_path / "nosig"))
    monkeypatch.setattr(tf.saved_model, "load", bug)
    with pytest.raises(TypeError, match="bug"):
        load_teacher(str(folder))
    monkeypatch.setattr(keras_hub.models.ImageClassifier, "from_preset", bug)
    with pytest.raises(TypeError, match="bug"):
        load_teacher("kaggle://nobody/no-such-model/keras/none")
