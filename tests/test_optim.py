"""Optimizers and class weights (`kd_keras.distill.optim`)."""

import numpy as np
import pytest

from kd_keras.distill.optim import class_weights


def test_balanced_class_weights_by_hand():
    labels = np.array([0] * 10 + [1] * 30)
    w = class_weights(labels, 2)
    assert w == pytest.approx({0: 40 / (2 * 10), 1: 40 / (2 * 30)})
    # weighted counts are equal, which is what "balanced" means
    assert 10 * w[0] == pytest.approx(30 * w[1])


def test_weight_decay_is_decoupled_by_default_and_coupled_l2_on_request():
    """Keras 3 decouples decay in every optimizer ("adam" + decay is AdamW); "l2" moves the
    decay into the loss (PyTorch's SGD/Adam `weight_decay`) and out of the optimizer."""
    from kd_keras.config import TrainConfig
    from kd_keras.distill.optim import make_optimizer

    sgd = make_optimizer(TrainConfig(optimizer="sgd", weight_decay=1e-4), 0.1, 2, 10)
    # the fused optimizers apply the decay inside their update (kd_keras.distill.fused_updates),
    # so Keras's own decay pass is off and the configured decay is theirs
    assert sgd.decoupled_weight_decay == pytest.approx(1e-4) and sgd.weight_decay is None
    assert sgd.get_config()["weight_decay"] == pytest.approx(1e-4)
    adam = make_optimizer(TrainConfig(optimizer="adam", weight_decay=1e-4), 0.1, 2, 10)
    adamw = make_optimizer(TrainConfig(optimizer="adamw", weight_decay=1e-4), 0.1, 2, 10)
    unnamed = ({k: v for k, v in o.get_config().items() if k != "name"} for o in (adam, adamw))
    assert type(adam) is type(adamw) and next(unnamed) == next(unnamed)
    assert adam.decoupled_weight_decay == pytest.approx(1e-4)
    l2 = make_optimizer(TrainConfig(optimizer="sgd", weight_decay=1e-4, weight_decay_mode="l2"),
                        0.1, 2, 10)  # fmt: skip
    assert l2.weight_decay is None and l2.decoupled_weight_decay is None
    assert l2.get_config()["weight_decay"] is None
