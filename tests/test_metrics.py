"""Pure metrics (`kd_keras.evaluation.metrics`): thresholds chosen on validation, the seed
subset, metrics that expose a collapsed classifier."""

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from kd_keras.evaluation.metrics import (
    choose_threshold,
    classification_metrics,
    imbalanced_subset_indices,
)


def test_threshold_is_chosen_on_validation_and_applied():
    y_val = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    p1 = np.array([0.55, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99])
    probs = np.stack([1 - p1, p1], axis=1)
    t = choose_threshold(y_val, probs)
    assert 0.7 < t <= 0.8  # separates the classes perfectly
    argmax = classification_metrics(y_val, probs, ["a", "b"])
    tuned = classification_metrics(y_val, probs, ["a", "b"], threshold=t)
    assert argmax["balanced_accuracy"] == 0.5 and tuned["balanced_accuracy"] == 1.0
    assert tuned["threshold"] == t


def reference_threshold(y_val, probs):
    """The definition, one candidate at a time: scikit-learn's balanced accuracy of
    `P(class 1) >= t` for t in 0.5 and every probability; ties to the closest to 0.5."""
    best, best_score = 0.5, -1.0
    for t in np.unique(np.concatenate([probs[:, 1], [0.5]])):
        score = balanced_accuracy_score(y_val, (probs[:, 1] >= t).astype("int64"))
        if score > best_score + 1e-12 or (
            abs(score - best_score) <= 1e-12 and abs(t - 0.5) < abs(best - 0.5)
        ):
            best, best_score = float(t), score
    return best


@pytest.mark.filterwarnings("ignore::UserWarning")  # scikit-learn on one-class cases
@pytest.mark.parametrize("case", range(40))
def test_threshold_matches_the_one_candidate_at_a_time_definition(case):
    rng = np.random.default_rng(case)
    n = int(rng.integers(1, 300))
    y = rng.integers(0, 2, n) if case % 10 else np.full(n, case % 20 // 10)  # one class too
    p1 = rng.uniform(0, 1, n)
    if case % 3 == 0:  # coarse probabilities: many ties, some exactly 0.5
        p1 = np.round(p1 * 4) / 4
    elif case % 3 == 1:  # informative scores
        p1 = np.clip(p1 * 0.6 + 0.4 * y, 0, 1)
    probs = np.stack([1 - p1, p1], axis=1)
    assert choose_threshold(y, probs) == reference_threshold(y, probs)


def test_imbalanced_subset_is_reproducible_and_has_the_ratio():
    labels = np.array([0] * 234 + [1] * 390)
    a = imbalanced_subset_indices(labels, 0, 21, 279, seed=0)
    b = imbalanced_subset_indices(labels, 0, 21, 279, seed=0)
    np.testing.assert_array_equal(a, b)
    assert np.bincount(labels[a]).tolist() == [21, 279]
    assert not np.array_equal(a, imbalanced_subset_indices(labels, 0, 21, 279, seed=1))


def test_metrics_expose_majority_collapse():
    """Seed 000's failure: high accuracy, balanced accuracy 0.5, minority recall 0."""
    y = np.array([0] * 21 + [1] * 279)
    probs = np.tile([0.1, 0.9], (300, 1))
    m = classification_metrics(y, probs, ["0", "1"])
    assert m["accuracy"] == pytest.approx(0.93)
    assert m["balanced_accuracy"] == 0.5 and m["per_class"]["0"]["recall"] == 0.0
