"""Fused optimizer updates (`kd_keras.distill.fused_updates`): Keras's formulas, one kernel."""

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from kd_keras.config import build_config
from kd_keras.distill.fused_updates import FusedAdam, FusedSGD
from kd_keras.distill.optim import make_optimizer

# Keras takes 1 - beta in double precision, TensorFlow's kernel in float32: the moments differ
# in the last bit (measured 2.4e-7 after one Adam step on values of order 1, 4.8e-7 after
# three). A wrong formula (a missing bias correction, decay applied twice) is off by 1e-3 or
# more at these learning rates.
UPDATE_ATOL = 1e-5


def cosine():
    return keras.optimizers.schedules.CosineDecay(1e-2, decay_steps=4)


CASES = {
    "adam": (lambda: keras.optimizers.Adam(1e-2), lambda: FusedAdam(1e-2)),
    "adamw_cosine": (
        lambda: keras.optimizers.Adam(cosine(), weight_decay=0.05),
        lambda: FusedAdam(cosine(), weight_decay=0.05),
    ),
    "sgd": (lambda: keras.optimizers.SGD(0.1), lambda: FusedSGD(0.1)),
    "sgd_momentum_decay": (
        lambda: keras.optimizers.SGD(0.1, momentum=0.9, weight_decay=0.05),
        lambda: FusedSGD(0.1, momentum=0.9, weight_decay=0.05),
    ),
    "nesterov": (
        lambda: keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
        lambda: FusedSGD(0.1, momentum=0.9, nesterov=True),
    ),
}


def three_steps(optimizer, sparse: bool = False):
    """Variable and slot values after 3 traced steps from the same start and gradients."""
    rng = np.random.default_rng(0)
    variable = keras.Variable(rng.normal(size=(50, 20)).astype("float32"), name="w")
    grads = [rng.normal(size=(50, 20)).astype("float32") for _ in range(3)]

    @tf.function
    def step(g):
        if sparse:  # rows 3 and 7 only, as an embedding lookup's gradient
            g = tf.IndexedSlices(tf.gather(g, [3, 7]), tf.constant([3, 7]), tf.constant([50, 20]))
        optimizer.apply_gradients([(g, variable)])

    for g in grads:
        step(tf.constant(g))
    return variable.numpy(), [v.numpy() for v in optimizer.variables], step


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_update_is_keras_update(case):
    keras_make, fused_make = CASES[case]
    reference, fused = keras_make(), fused_make()
    want, want_slots, _ = three_steps(reference)
    got, got_slots, _ = three_steps(fused)
    start = np.random.default_rng(0).normal(size=(50, 20))
    assert np.max(np.abs(want - start)) > 1e-2  # the steps moved the variable
    np.testing.assert_allclose(got, want, rtol=0, atol=UPDATE_ATOL)
    # same slot variables, same names and order: stage checkpoints stay readable
    assert [v.name for v in fused.variables] == [v.name for v in reference.variables]
    for g, w in zip(got_slots, want_slots):
        np.testing.assert_allclose(g, w, rtol=0, atol=UPDATE_ATOL)


@pytest.mark.parametrize(
    "make, kernel",
    [(lambda: FusedAdam(1e-2, weight_decay=0.01), "ResourceApplyAdam"),
     (lambda: FusedSGD(0.1, momentum=0.9), "ResourceApplyKerasMomentum"),
     (lambda: FusedSGD(0.1), "ResourceApplyGradientDescent")],
)  # fmt: skip
def test_dense_update_runs_the_fused_kernel(make, kernel):
    _, _, step = three_steps(make())
    graph = step.get_concrete_function(tf.TensorSpec((50, 20), tf.float32)).graph
    ops = [op.type for op in graph.get_operations()]
    assert ops.count(kernel) == 1
    assert "Sqrt" not in ops  # no elementwise Adam left beside the kernel


def test_sparse_gradients_take_keras_update():
    want, _, _ = three_steps(keras.optimizers.Adam(1e-2, weight_decay=0.05), sparse=True)
    got, _, step = three_steps(FusedAdam(1e-2, weight_decay=0.05), sparse=True)
    np.testing.assert_allclose(got, want, rtol=0, atol=UPDATE_ATOL)
    ops = [op.type for op in step.get_concrete_function(
        tf.TensorSpec((50, 20), tf.float32)).graph.get_operations()]  # fmt: skip
    assert "ResourceApplyAdam" not in ops


def test_config_round_trip_keeps_the_decay():
    opt = FusedAdam(3e-4, weight_decay=0.02, beta_2=0.99)
    config = opt.get_config()
    assert config["weight_decay"] == 0.02 and config["beta_2"] == 0.99
    again = FusedAdam.from_config(config)
    assert again.decoupled_weight_decay == 0.02 and again.weight_decay is None
    sgd = FusedSGD.from_config(FusedSGD(0.1, momentum=0.8, nesterov=True).get_config())
    assert sgd.momentum == 0.8 and sgd.nesterov and sgd.decoupled_weight_decay is None
    with pytest.raises(NotImplementedError, match="keras.optimizers.Adam"):
        opt.exclude_from_weight_decay(var_names=["bias"])


def test_make_optimizer_builds_the_fused_optimizers():
    cfg = build_config({"train": {"optimizer": "adam", "weight_decay": 1e-4}}, Path("."))
    adam = make_optimizer(cfg.train, 1e-3, epochs=2, steps_per_epoch=10)
    assert isinstance(adam, FusedAdam) and adam.decoupled_weight_decay == pytest.approx(1e-4)
    cfg = build_config(
        {"train": {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 0}}, Path(".")
    )
    sgd = make_optimizer(cfg.train, 1e-2, epochs=2, steps_per_epoch=10)
    assert isinstance(sgd, FusedSGD) and sgd.momentum == 0.9 and sgd.decoupled_weight_decay is None
