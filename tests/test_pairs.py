"""Every teacher/student pair distils, and the DeiT student's two heads do what DeiT says.

The tiny variant of every architecture (the same code at small width and depth, 32 px, patch 8
for token students: a 4x4 grid) is built once per session and shared; each case compares weights
just before and after its own step. The matrix runs the Distiller's own `train_step` eagerly;
graph mode, which `fit` uses, is checked for the DeiT student here and for CNN pairs in
test_distiller.py and the end-to-end runs.
"""

import time

import keras
import numpy as np
import pytest
from conftest import PATCH, SIZE

from kd_keras.distill import losses
from kd_keras.distill.distiller import Distiller
from kd_keras.errors import KDError
from kd_keras.models.layers import CLS_LOGITS_LAYER, DIST_LOGITS_LAYER
from kd_keras.models.loading import load_model
from kd_keras.models.registry import build_student
from kd_keras.models.taps import feature_and_logits, has_layer

CLASSES = 3
RNG = np.random.default_rng(0)
X = RNG.uniform(0, 255, (4, SIZE, SIZE, 3)).astype("float32")
Y = np.array([0, 1, 2, 1])

TEACHERS = ["resnet50", "efficientnet_b3"]
STUDENTS = ["resnet18", "mobilenet_v3_small", "resnet8x3", "vit_small", "deit_small"]
# tiny variants' taps at 32 px: teachers stride 16 (2x2); resnet18 P4 and mobilenet_v3_small's
# stride-16 stage 2x2; resnet8x3's last stage (stride 8) and token grids 4x4
TEACHER_FEATURES = {"resnet50": (2, 2, 128), "efficientnet_b3": (2, 2, 32)}
STUDENT_FEATURES = {"resnet18": (2, 2, 64), "mobilenet_v3_small": (2, 2, 16),
                    "resnet8x3": (4, 4, 32), "vit_small": (4, 4, 32),
                    "deit_small": (4, 4, 32)}  # fmt: skip


@pytest.fixture(scope="module")
def zoo(tiny_zoo):
    return lambda arch: tiny_zoo(arch, CLASSES)


@pytest.mark.parametrize("beta", [0.0, 1.0], ids=["logits", "features"])
@pytest.mark.parametrize("mode", ["soft", "hard"])
@pytest.mark.parametrize("student_arch", STUDENTS)
@pytest.mark.parametrize("teacher_arch", TEACHERS)
def test_pair_distils_one_batch(zoo, teacher_arch, student_arch, mode, beta):
    teacher, student = zoo(teacher_arch), zoo(student_arch)
    d = Distiller(student, teacher, alpha=0.5, temperature=4.0, beta=beta, mode=mode)
    if beta:
        t_shape = tuple(feature_and_logits(teacher)[0].shape[1:])
        s_shape = tuple(feature_and_logits(student)[0].shape[1:])
        assert t_shape == TEACHER_FEATURES[teacher_arch]
        assert s_shape == STUDENT_FEATURES[student_arch]
        assert len(d.adapters) == 1
        projected = d.adapters[0](np.zeros((1, *s_shape), "float32"))
        assert tuple(projected.shape[1:]) == t_shape, "adapter maps the student onto the teacher"
    d.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), run_eagerly=True)
    t_before = [w.copy() for w in teacher.get_weights()]
    s_before = [w.copy() for w in student.get_weights()]
    logs = d.train_on_batch(X, Y, return_dict=True)
    expected = {"loss", "ce", "kd", "accuracy"} | ({"feat"} if beta else set())
    assert set(logs) == expected
    assert all(np.isfinite(v) for v in logs.values()), logs
    assert all(np.array_equal(a, b) for a, b in zip(t_before, teacher.get_weights()))
    s_after = student.get_weights()
    assert any(not np.array_equal(a, b) for a, b in zip(s_before, s_after))


# ---------------------------------------------------------------- DeiT


def head_outputs(student):
    return keras.Model(
        student.input,
        [
            student.get_layer(CLS_LOGITS_LAYER).output,
            student.get_layer(DIST_LOGITS_LAYER).output,
            student.output,
        ],
    )


def test_deit_output_is_the_mean_of_its_two_heads(zoo):
    deit = zoo("deit_small")
    backbone = deit.get_layer("deit_backbone")
    assert tuple(backbone.output.shape[1:]) == (2 + (SIZE // PATCH) ** 2, 32)
    cls, dist, out = (np.asarray(t) for t in head_outputs(deit)(X))
    assert not np.allclose(cls, dist), "two independent heads"
    np.testing.assert_allclose(out, (cls + dist) / 2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_deit_class_head_learns_labels_and_dist_head_the_teacher(zoo, mode):
    teacher, deit = zoo("resnet50"), zoo("deit_small")
    d = Distiller(deit, teacher, alpha=0.4, temperature=2.0, beta=0.0, mode=mode)
    terms = {k: float(v) for k, v in
             d.compute_terms(Y, d._student_graph(X), d.teacher_outputs(X)).items()}  # fmt: skip
    assert "reg" not in terms
    cls, dist, _ = (np.asarray(t) for t in head_outputs(deit)(X))
    t_logits = np.asarray(teacher(X, training=False))
    ce = float(np.mean(losses.cross_entropy(Y, cls)))
    if mode == "hard":
        kd = float(np.mean(losses.cross_entropy(t_logits.argmax(axis=1), dist)))
    else:
        kd = float(np.mean(losses.soft_kd(t_logits, dist, 2.0)))
    assert terms["ce"] == pytest.approx(ce, rel=1e-4)
    assert terms["kd"] == pytest.approx(kd, rel=1e-4)
    assert terms["loss"] == pytest.approx(0.4 * ce + 0.6 * kd, rel=1e-4)
    # only the teacher term (alpha = 0): it trains the deployed (averaged) output, so the class
    # head, half of what is deployed, is not left at its random initialisation
    d = Distiller(deit, teacher, alpha=0.0, beta=0.0, mode=mode)
    t_logits_kd = d.compute_terms(Y, d._student_graph(X), d.teacher_outputs(X))["kd"]
    out = np.asarray(deit(X))
    expected = (losses.soft_kd(t_logits, out, 4.0) if mode == "soft"
                else losses.cross_entropy(t_logits.argmax(axis=1), out))  # fmt: skip
    assert float(t_logits_kd) == pytest.approx(float(np.mean(expected)), rel=1e-4)
    d.compile(optimizer=keras.optimizers.SGD(0.01), run_eagerly=True)
    heads = (CLS_LOGITS_LAYER, DIST_LOGITS_LAYER)
    before = {n: [w.copy() for w in deit.get_layer(n).get_weights()] for n in heads}
    d.train_on_batch(X, Y)
    after = {n: deit.get_layer(n).get_weights() for n in heads}
    for n in heads:
        assert not np.array_equal(before[n][0], after[n][0]), n


def test_deit_without_kd_term_trains_its_deployed_output(zoo):
    """Teacher fine-tuning and the scratch baseline (alpha = 1): CE on the averaged logits, so
    neither head is left at its random initialisation."""
    deit = zoo("deit_small")
    d = Distiller(deit, None, alpha=1.0)
    s_out = d._student_graph(X)
    out = np.asarray(deit(X))
    assert float(d.compute_terms(Y, s_out, {})["ce"]) == pytest.approx(
        float(np.mean(losses.cross_entropy(Y, out))), rel=1e-4
    )
    d.compile(optimizer=keras.optimizers.SGD(0.01), run_eagerly=True)
    heads = (CLS_LOGITS_LAYER, DIST_LOGITS_LAYER)
    before = {n: deit.get_layer(n).get_weights()[0].copy() for n in heads}
    d.train_on_batch(X, Y)
    for n in heads:
        assert not np.array_equal(before[n], deit.get_layer(n).get_weights()[0]), n


def test_deit_saves_and_loads_with_identical_outputs_and_feature_tap(zoo, tmp_path):
    deit = zoo("deit_small")
    path = tmp_path / "deit.keras"
    deit.save(path)
    loaded = load_model(path)
    # equal up to float32 rounding: the two models' compiled functions may pick other kernels
    np.testing.assert_allclose(loaded.predict(X, verbose=0), deit.predict(X, verbose=0),
                               rtol=1e-6, atol=1e-6)  # fmt: skip
    assert has_layer(loaded, CLS_LOGITS_LAYER)
    assert has_layer(loaded, DIST_LOGITS_LAYER)
    f1, _ = keras.Model(deit.inputs, feature_and_logits(deit))(X)
    f2, _ = keras.Model(loaded.inputs, feature_and_logits(loaded))(X)
    assert tuple(f2.shape) == (4, SIZE // PATCH, SIZE // PATCH, 32)
    np.testing.assert_array_equal(np.asarray(f2), np.asarray(f1))
    # the tap is the patch tokens in grid order: row r, column c = token 2 + r * grid + c
    tokens = np.asarray(deit.get_layer("deit_backbone")(deit.get_layer("preprocessing")(X)))
    np.testing.assert_array_equal(np.asarray(f1)[:, 1, 2], tokens[:, 2 + 1 * 4 + 2])


def test_deit_distils_in_graph_mode(zoo):
    """One compiled (traced) step, as `fit` runs it: hard KD plus feature matching."""
    teacher, deit = zoo("resnet50"), zoo("deit_small")
    d = Distiller(deit, teacher, alpha=0.5, beta=1.0, mode="hard")
    d.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9))
    before = [w.copy() for w in deit.get_weights()]
    logs = d.train_on_batch(X, Y, return_dict=True)
    assert set(logs) == {"loss", "ce", "kd", "feat", "accuracy"}
    assert all(np.isfinite(v) for v in logs.values()), logs
    assert any(not np.array_equal(a, b) for a, b in zip(before, deit.get_weights()))


def test_deit_imagenet_weights_need_224_px_patch_16_and_fail_fast_offline():
    with pytest.raises(KDError, match="image_size = 224 and student.patch_size = 16"):
        build_student("deit_small", 2, 32, weights="imagenet", patch_size=8)
    start = time.perf_counter()
    try:
        model = build_student("deit_small", 2, 224, weights="imagenet", patch_size=16)
    except KDError as err:  # offline: the preset download fails
        assert "could not load ImageNet weights for deit_small" in str(err)
        assert "student.weights" in str(err)
        assert time.perf_counter() - start < 10, "the offline failure must be quick"
    else:  # with internet: the preset's backbone with its distillation token, 2-class head
        assert model.output_shape == (None, 2)
        assert has_layer(model, DIST_LOGITS_LAYER)


def test_deit_loads_a_local_preset_folder_and_checks_its_grid(tmp_path):
    import keras_hub

    keras.utils.set_random_seed(0)
    small = keras_hub.models.DeiTBackbone(
        image_shape=(SIZE, SIZE, 3), patch_size=PATCH, num_layers=1, num_heads=2,
        hidden_dim=32, intermediate_dim=64,
    )  # fmt: skip
    small.save_to_preset(str(tmp_path / "preset"))
    student = build_student("deit_small", 2, SIZE, str(tmp_path / "preset"), PATCH)
    backbone = student.get_layer("deit_backbone")  # renamed, so the feature tap finds it
    for a, b in zip(small.get_weights(), backbone.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert tuple(feature_and_logits(student)[0].shape[1:]) == (4, 4, 32)
    with pytest.raises(KDError, match="DeiT for 32 px images with patch 8"):
        build_student("deit_small", 2, SIZE, str(tmp_path / "preset"), 4)
