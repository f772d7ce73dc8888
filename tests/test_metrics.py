"""Pure metrics (`kd_keras.evaluation.metrics`): thresholds chosen on validation, the seed
subset, metrics that expose a collapsed classifier."""

import numpy as np
import pytest

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
