import numpy as np
import pytest

from kd_keras.distill.optim import class_weights
from kd_keras.evaluation.metrics import (
    choose_threshold,
    classification_metrics,
    seed_subset_indices,
)


def test_balanced_class_weights_by_hand():
    labels = np.array([0] * 10 + [1] * 30)
    w = class_weights(labels, 2)
    assert w == pytest.approx({0: 40 / (2 * 10), 1: 40 / (2 * 30)})
    # weighted counts are equal, which is what "balanced" means
    assert 10 * w[0] == pytest.approx(30 * w[1])


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


def test_seed_subset_is_reproducible_and_has_the_ratio():
    labels = np.array([0] * 234 + [1] * 390)
    a = seed_subset_indices(labels, 0, 21, 279, seed=0)
    b = seed_subset_indices(labels, 0, 21, 279, seed=0)
    np.testing.assert_array_equal(a, b)
    assert np.bincount(labels[a]).tolist() == [21, 279]
    assert not np.array_equal(a, seed_subset_indices(labels, 0, 21, 279, seed=1))


def test_metrics_expose_majority_collapse():
    """Seed 000's failure: high accuracy, balanced accuracy 0.5, minority recall 0."""
    y = np.array([0] * 21 + [1] * 279)
    probs = np.tile([0.1, 0.9], (300, 1))
    m = classification_metrics(y, probs, ["0", "1"])
    assert m["accuracy"] == pytest.approx(0.93)
    assert m["balanced_accuracy"] == 0.5 and m["per_class"]["0"]["recall"] == 0.0


def test_weight_decay_is_decoupled_by_default_and_coupled_l2_on_request():
    """Keras 3 decouples decay in every optimizer ("adam" + decay is AdamW); "l2" moves the
    decay into the loss (PyTorch's SGD/Adam `weight_decay`) and out of the optimizer."""
    from kd_keras.config import TrainConfig
    from kd_keras.distill.optim import make_optimizer

    sgd = make_optimizer(TrainConfig(optimizer="sgd", weight_decay=1e-4), 0.1, 2, 10)
    assert sgd.weight_decay == pytest.approx(1e-4)
    adam = make_optimizer(TrainConfig(optimizer="adam", weight_decay=1e-4), 0.1, 2, 10)
    adamw = make_optimizer(TrainConfig(optimizer="adamw", weight_decay=1e-4), 0.1, 2, 10)
    assert type(adam) is type(adamw) and adam.weight_decay == adamw.weight_decay
    l2 = make_optimizer(TrainConfig(optimizer="sgd", weight_decay=1e-4, weight_decay_mode="l2"),
                        0.1, 2, 10)  # fmt: skip
    assert l2.weight_decay is None


def test_best_epoch_is_chosen_with_the_evaluation_rule_and_ties_go_to_auc():
    """A model that ranks well but sits on one side of 0.5 (balanced accuracy 0.5 at argmax in
    every epoch) must not keep its worst epoch: selection uses the validation threshold."""
    import keras

    from kd_keras.distill.callbacks import SelectBest

    y = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    epochs = [  # P(class 1) per epoch: always >= 0.5 (argmax says "1"), ranking improves
        np.array([0.9, 0.6, 0.8, 0.7, 0.85, 0.6, 0.95, 0.9]),
        np.array([0.6, 0.65, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99]),
        np.array([0.55, 0.6, 0.62, 0.8, 0.85, 0.9, 0.95, 0.99]),
    ]
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(2)])
    for tune, last_balanced_accuracy in ((False, 0.5), (True, 1.0)):
        select = SelectBest(
            model, None, y, ["a", "b"], "val_balanced_accuracy", tune_threshold=tune
        )
        for epoch, p in enumerate(epochs):
            select.predictor = lambda x, p=p: np.log(np.stack([1 - p, p], axis=1))
            select.val_ds = [np.zeros((8, 1))]
            logs = {}
            select.on_epoch_end(epoch, logs)
        # argmax: every epoch ties at 0.5 and AUC breaks the tie (then the later epoch);
        # the evaluation rule: epochs 2 and 3 separate the classes, the later one is kept
        assert logs["val_balanced_accuracy"] == last_balanced_accuracy
        assert select.best_epoch == 2, (tune, select.best_epoch)
