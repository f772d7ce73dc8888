"""MixUp in the Distiller: the blend, the mixed labels and weights, stateless draws, the teacher
seeing the mixed images, and the config rule."""

import keras
import numpy as np
import pytest
from scipy import stats

from kd_keras.config import load_config
from kd_keras.distill import losses
from kd_keras.distill.distiller import Distiller
from kd_keras.errors import KDError

RNG = np.random.default_rng(0)
N = 16
X = RNG.uniform(0, 255, (N, 8, 8, 3)).astype("float32")
Y = RNG.integers(0, 2, N)


def small_classifier(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    x = keras.layers.Rescaling(1 / 64.0)(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="logits")(x))


def mixer(a: float = 0.4, seed: int = 3, teacher: bool = False) -> Distiller:
    t = small_classifier(1) if teacher else None
    return Distiller(small_classifier(0), t, alpha=0.5 if teacher else 1.0, mixup=a,
                     mixup_seed=seed)  # fmt: skip


def test_blend_is_a_per_image_convex_combination_with_a_batch_partner():
    w = RNG.uniform(0.5, 2.0, N).astype("float32")
    mixed, mixed_w, (partner_y, lam) = mixer().mix_batch(X, Y, w, 5)
    mixed, mixed_w, partner_y, lam = map(np.asarray, (mixed, mixed_w, partner_y, lam))
    assert lam.shape == (N,) and np.all(lam >= 0.5) and np.all(lam <= 1.0)
    # recover the partner of each image from its label and blend
    for i in range(N):
        blends = lam[i] * X[i] + (1 - lam[i]) * X
        residual = [np.abs(mixed[i] - blends[j]).max() for j in range(N)]
        j = int(np.argmin(residual))
        assert residual[j] < 1e-3
        assert partner_y[i] == Y[j]
        assert mixed_w[i] == pytest.approx(lam[i] * w[i] + (1 - lam[i]) * w[j], rel=1e-5)


def test_partners_are_a_permutation_and_draws_are_stateless():
    d = mixer()
    _, _, (_, lam_a) = d.mix_batch(X, Y, None, 7)
    _, none_w, (_, lam_b) = d.mix_batch(X, Y, None, 7)
    _, _, (_, lam_c) = d.mix_batch(X, Y, None, 8)
    _, _, (_, lam_d) = mixer(seed=4).mix_batch(X, Y, None, 7)
    assert none_w is None
    np.testing.assert_array_equal(lam_a, lam_b)  # same (seed, step): same draw (resume)
    assert not np.allclose(lam_a, lam_c) and not np.allclose(lam_a, lam_d)
    # the partner of image i is image perm[i]: with distinct labels 0..N-1 it is readable
    ids = np.arange(N)
    _, _, (partner, _) = d.mix_batch(X, ids, None, 7)
    assert sorted(np.asarray(partner).tolist()) == ids.tolist()


def test_weights_follow_the_folded_beta_distribution():
    a = 0.4
    d = mixer(a)
    big = np.zeros((4000, 1, 1, 1), "float32")
    _, _, (_, lam) = d.mix_batch(big, np.zeros(4000, "int64"), None, 1)
    lam = np.asarray(lam, "float64")
    # folded Beta(a, a) on [0.5, 1]: P(lam <= x) = 2 F(x) - 1; chi-square on 10 equal-mass bins
    # (a KS test is thrown by float32 rounding of the atom near 1.0)
    edges = stats.beta.ppf(0.5 + 0.5 * np.linspace(0, 1, 11), a, a)
    edges[0], edges[-1] = 0.5, 1.0 + 1e-6
    observed = np.histogram(lam, edges)[0]
    assert stats.chisquare(observed).pvalue > 1e-3
    folded_mean = 2 * stats.beta.expect(lambda x: x, (a, a), lb=0.5)
    assert np.mean(lam) == pytest.approx(folded_mean, abs=0.01)


def test_ce_term_mixes_both_labels_by_lambda():
    d = mixer()
    mixed, w, mix = d.mix_batch(X, Y, None, 2)
    s_out = d.student_outputs(mixed, training=False)
    ce = float(d.compute_terms(Y, s_out, {}, w, mix=mix)["ce"])
    logits = np.asarray(s_out["logits"])
    partner, lam = map(np.asarray, mix)
    own, other = losses.cross_entropy(Y, logits), losses.cross_entropy(partner, logits)
    want = np.mean(lam * own + (1 - lam) * other)
    assert ce == pytest.approx(float(want), rel=1e-5)


def test_teacher_and_student_see_the_same_mixed_images(monkeypatch):
    d = mixer(teacher=True)
    seen = {}
    orig_t, orig_s = d.teacher_outputs, d.student_outputs

    def teacher_outputs(x):
        seen["teacher"] = np.asarray(x)
        return orig_t(x)

    def student_outputs(images, training):
        seen["student"] = np.asarray(images)
        return orig_s(images, training)

    monkeypatch.setattr(d, "teacher_outputs", teacher_outputs)
    monkeypatch.setattr(d, "student_outputs", student_outputs)
    d.compile(optimizer="sgd", run_eagerly=True)
    d.train_on_batch(X, Y)
    np.testing.assert_array_equal(seen["teacher"], seen["student"])
    assert not np.allclose(seen["student"], X), "the batch was mixed"
    want, _, _ = d.mix_batch(X, Y, None, 0)  # the first step's draw
    np.testing.assert_allclose(seen["student"], np.asarray(want), rtol=1e-6)


def test_fit_without_teacher_config_roundtrip_and_errors():
    d = mixer(0.2)
    d.compile(optimizer="adam")
    logs = d.fit(X, Y, batch_size=8, epochs=1, verbose=0).history
    assert np.isfinite(logs["loss"][0])
    cfg = d.get_config()
    assert cfg["mixup"] == 0.2 and cfg["mixup_seed"] == 3
    with pytest.raises(ValueError, match="mixup must be >= 0"):
        Distiller(small_classifier(0), mixup=-0.1)
    cached = mixer(teacher=True)
    cached.compile(optimizer="sgd", run_eagerly=True)
    x = {"images": X, "teacher_logits": np.zeros((N, 2), "float32")}
    with pytest.raises(ValueError, match="MixUp needs the teacher"):
        cached.train_on_batch(x, Y)


def test_config_refuses_mixup_with_a_teacher_cache(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[augment]\nmixup = 0.2\n[teacher]\ncache = "memory"\n')
    with pytest.raises(KDError, match="augment.mixup = 0.2 and teacher.cache"):
        load_config(path)
    path.write_text("[augment]\nmixup = 0.2\n")
    assert load_config(path).augment.mixup == 0.2
