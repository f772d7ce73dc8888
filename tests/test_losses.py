import numpy as np
import pytest

from kd_keras.distill import losses


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


# ---------------------------------------------------------------- registry


def np_log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_dkd(labels, t, s, temperature, alpha, beta):
    """Decoupled KD written from the paper's equations (Zhao et al., 2022, eq. 1-4)."""
    out = []
    for y, tt, ss in zip(labels, t / temperature, s / temperature):
        p_t, p_s = np.exp(np_log_softmax(tt)), np.exp(np_log_softmax(ss))
        b_t, b_s = np.array([p_t[y], 1 - p_t[y]]), np.array([p_s[y], 1 - p_s[y]])
        tckd = np.sum(b_t * np.log(b_t / b_s))
        rest = [k for k in range(len(tt)) if k != y]
        q_t, q_s = p_t[rest] / p_t[rest].sum(), p_s[rest] / p_s[rest].sum()
        nckd = np.sum(q_t * np.log(q_t / q_s))
        out.append(temperature**2 * (alpha * tckd + beta * nckd))
    return np.array(out)


def test_registry_lists_valid_names_and_keeps_the_existing_terms():
    with pytest.raises(ValueError, match="unknown distillation loss 'crd'; valid: soft, hard, dkd"):
        losses.kd_loss("crd")
    with pytest.raises(ValueError, match="valid: fitnet, attention"):
        losses.feature_loss("vid")
    rng = np.random.default_rng(1)
    t, s = rng.normal(size=(6, 4)) * 3, rng.normal(size=(6, 4)) * 3
    y = rng.integers(0, 4, 6)
    np.testing.assert_allclose(losses.kd_loss("soft", temperature=2.5)(y, t, s),
                               losses.soft_kd(t, s, 2.5), rtol=1e-6)  # fmt: skip
    np.testing.assert_allclose(losses.kd_loss("hard")(y, t, s), losses.hard_kd(t, s), rtol=1e-6)
    ft, fs = rng.normal(size=(2, 3, 3, 8)), rng.normal(size=(2, 3, 3, 8))
    np.testing.assert_allclose(losses.feature_loss("fitnet", feature_norm="none")(ft, fs),
                               losses.feature_l2(ft, fs, "none"), rtol=1e-6)  # fmt: skip


def test_decoupled_kd_matches_the_paper_by_numpy():
    rng = np.random.default_rng(2)
    t, s = rng.normal(size=(8, 5)) * 2, rng.normal(size=(8, 5)) * 2
    y = rng.integers(0, 5, 8)
    got = np.asarray(losses.kd_loss("dkd", temperature=3.0, dkd_alpha=1.0, dkd_beta=8.0)(y, t, s))
    np.testing.assert_allclose(got, np_dkd(y, t, s, 3.0, 1.0, 8.0), rtol=1e-4, atol=1e-6)
    # with two classes NCKD vanishes and TCKD is the whole KL: DKD = alpha * soft KD
    t2, s2, y2 = t[:, :2], s[:, :2], (y % 2)
    dkd2 = losses.kd_loss("dkd", temperature=3.0, dkd_alpha=0.7, dkd_beta=8.0)(y2, t2, s2)
    np.testing.assert_allclose(dkd2, 0.7 * np.asarray(losses.soft_kd(t2, s2, 3.0)), rtol=1e-4)


def test_attention_transfer_matches_numpy():
    rng = np.random.default_rng(3)
    ft = rng.normal(size=(2, 4, 4, 16)).astype("float32")
    fs = rng.normal(size=(2, 4, 4, 8)).astype("float32")  # other channel count: AT is free of it

    def np_at(f):
        a = (np.abs(f) ** 2).mean(axis=-1).reshape(len(f), -1)
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    expected = ((np_at(ft) - np_at(fs)) ** 2).mean(axis=1)
    got = losses.feature_loss("attention")(ft, fs)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert float(np.max(losses.feature_loss("attention")(ft, ft))) < 1e-12


def test_every_loss_declares_exactly_its_parameters():
    """No loss swallows unknown keywords: a misspelt parameter is an error naming it and the
    loss's valid parameters, not a silently ignored setting."""
    for registry in (losses.KD_LOSSES, losses.FEATURE_LOSSES):
        for cls in registry.values():
            assert losses.declared_params(cls) is not None  # raises on **kwargs
    assert losses.declared_params(losses.KD_LOSSES["dkd"]) == (
        "temperature",
        "dkd_alpha",
        "dkd_beta",
    )
    with pytest.raises(ValueError, match=r"distillation loss 'soft' has no parameter "
                                         r"'temprature'; its parameters: temperature"):  # fmt: skip
        losses.kd_loss("soft", temprature=2.0)
    with pytest.raises(
        ValueError, match="'hard' has no parameter 'temperature'; its parameters: none"
    ):
        losses.kd_loss("hard", temperature=2.0)
    with pytest.raises(
        ValueError, match="feature loss 'attention' has no parameter 'feature_norm'"
    ):
        losses.feature_loss("attention", feature_norm="l2")


def test_a_loss_with_var_keywords_is_refused():
    class Loose:
        def __init__(self, temperature=1.0, **_):
            pass

    with pytest.raises(TypeError, match="must declare its parameters"):
        losses.declared_params(Loose)


def test_select_params_passes_each_loss_only_what_it_declares():
    settings = {"temperature": 3.0, "dkd_alpha": 0.5, "dkd_beta": 2.0, "feature_norm": "none"}
    assert losses.select_params(losses.KD_LOSSES["soft"], settings) == {"temperature": 3.0}
    assert losses.select_params(losses.KD_LOSSES["hard"], settings) == {}
    assert losses.select_params(losses.FEATURE_LOSSES["fitnet"], settings) == {
        "feature_norm": "none"
    }
    dkd = losses.kd_loss("dkd", **losses.select_params(losses.KD_LOSSES["dkd"], settings))
    assert (dkd.temperature, dkd.alpha, dkd.beta) == (3.0, 0.5, 2.0)
