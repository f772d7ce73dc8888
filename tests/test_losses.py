import numpy as np
import pytest

from kd_keras import losses


def np_softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_soft_kd_matches_hand_computed_t2_kl():
    t = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]], "float32")
    s = np.array([[0.0, 1.0, 0.0], [1.0, -1.0, 0.5]], "float32")
    for temperature in (1.0, 4.0):
        p, q = np_softmax(t / temperature), np_softmax(s / temperature)
        expected = temperature**2 * (p * np.log(p / q)).sum(axis=1)
        got = np.asarray(losses.soft_kd(t, s, temperature))
        np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_soft_kd_zero_when_student_equals_teacher():
    z = np.random.default_rng(0).normal(size=(4, 5)).astype("float32")
    np.testing.assert_allclose(np.asarray(losses.soft_kd(z, z, 3.0)), 0.0, atol=1e-6)


def test_hard_kd_is_ce_on_teacher_argmax():
    t = np.array([[0.0, 3.0], [5.0, 1.0]], "float32")
    s = np.array([[1.0, 0.0], [0.0, 2.0]], "float32")
    expected = -np.log(np_softmax(s)[[0, 1], [1, 0]])
    np.testing.assert_allclose(np.asarray(losses.hard_kd(t, s)), expected, rtol=1e-5)


@pytest.mark.parametrize("norm", ["none", "l2"])
def test_feature_l2_zero_when_features_match_and_mse_otherwise(norm):
    f = np.random.default_rng(1).normal(size=(2, 3, 3, 4)).astype("float32")
    np.testing.assert_allclose(np.asarray(losses.feature_l2(f, f, norm)), 0.0, atol=1e-7)
    g = f + 1.0
    got = np.asarray(losses.feature_l2(f, g, "none"))
    np.testing.assert_allclose(got, [1.0, 1.0], rtol=1e-6)


def test_feature_l2_normalised_is_squared_distance_of_unit_vectors():
    t = np.zeros((1, 1, 2, 3), "float32")
    s = np.zeros((1, 1, 2, 3), "float32")
    t[0, 0, 0, 0], s[0, 0, 0, 1] = 5.0, 2.0  # orthogonal: |a - b|^2 = 2
    t[0, 0, 1, 2], s[0, 0, 1, 2] = 3.0, 7.0  # parallel: 0, whatever the scale
    np.testing.assert_allclose(np.asarray(losses.feature_l2(t, s, "l2")), [1.0], rtol=1e-5)


def test_weighted_mean_uses_keras_convention():
    per_sample = np.array([1.0, 2.0, 3.0, 4.0], "float32")
    weights = np.array([2.0, 0.0, 1.0, 1.0], "float32")
    assert float(losses.weighted_mean(per_sample)) == pytest.approx(2.5)
    assert float(losses.weighted_mean(per_sample, weights)) == pytest.approx((2 + 3 + 4) / 4)
