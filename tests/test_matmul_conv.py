"""Matrix-product convolutions: the same numbers and gradients as Conv2D, the same variables."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import build

from kd_keras.models.matmul_conv import MatmulConv, matmul_plan, matmul_view
from kd_keras.models.taps import all_layers

RNG = np.random.default_rng(0)

CASES = [  # (input h, w, c), filters, kernel, strides, padding, is a matrix product
    ((1, 1, 8), 6, 1, 1, "same", True),
    ((5, 3, 8), 6, 1, 2, "valid", True),
    ((4, 4, 8), 6, 1, 2, "same", True),
    ((1, 1, 8), 6, 3, 1, "same", True),
    ((2, 2, 8), 6, 3, 2, "same", True),
    ((3, 3, 8), 6, 3, 1, "valid", True),
    ((2, 3, 8), 6, (2, 3), 1, "valid", True),
    ((3, 3, 8), 6, 7, 3, "same", True),
    ((4, 4, 8), 6, 3, 1, "same", False),
    ((2, 2, 8), 6, 5, 1, "same", False),
]


@pytest.mark.parametrize("shape, filters, kernel, strides, padding, product", CASES)
def test_matmul_conv_matches_conv2d_values_and_gradients(shape, filters, kernel, strides,
                                                         padding, product):  # fmt: skip
    conv = keras.layers.Conv2D(filters, kernel, strides, padding=padding, activation="relu")
    x = tf.constant(RNG.normal(size=(3, *shape)).astype("float32"))
    conv.build(x.shape)
    conv.bias.assign(RNG.normal(size=filters).astype("float32"))
    view = MatmulConv(conv)
    assert (matmul_plan(conv, tuple(x.shape)) is not None) == product
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        a, b = conv(x), view(x)
        la, lb = tf.reduce_sum(a * a), tf.reduce_sum(b * b)
    np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-5)
    for ga, gb in zip(tape.gradient(la, [x, conv.kernel, conv.bias]),
                      tape.gradient(lb, [x, conv.kernel, conv.bias])):  # fmt: skip
        np.testing.assert_allclose(gb.numpy(), ga.numpy(), rtol=1e-4, atol=1e-4)


def test_only_plain_convolutions_are_viewed():
    assert matmul_plan(keras.layers.DepthwiseConv2D(1), (2, 1, 1, 4)) is None
    dilated = keras.layers.Conv2D(4, 3, dilation_rate=2, padding="same")
    assert matmul_plan(dilated, (2, 1, 1, 4)) is None
    assert matmul_plan(keras.layers.Conv2D(4, 1), (None, None, None, 4)) is None
    with pytest.raises(ValueError, match="Conv2D"):
        MatmulConv(keras.layers.DepthwiseConv2D(1))


@pytest.mark.parametrize("arch", ["resnet50", "resnet18", "efficientnet_b3"])
def test_view_shares_every_variable_and_gives_the_models_outputs(arch):
    model = build(arch)
    view = matmul_view(model)
    assert view is not model
    assert any(isinstance(layer, MatmulConv) for layer in all_layers(view))
    assert [id(v) for v in view.trainable_variables] == [id(v) for v in model.trainable_variables]
    x = RNG.uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(view(x)), np.asarray(model(x)), atol=1e-4)


def test_models_without_convolutions_are_returned_as_they_are():
    inputs = keras.Input((4,))
    dense = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    assert matmul_view(dense) is dense and matmul_view(None) is None


def test_distiller_trains_the_original_student_through_its_view(tiny_npz):
    from kd_keras.distill.distiller import Distiller

    student = build("resnet18")
    before = [w.copy() for w in student.get_weights()]
    trainer = Distiller(student, None, alpha=1.0, beta=0.0)
    trainer.compile(optimizer=keras.optimizers.Adam(1e-2))
    x = RNG.uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    trainer.train_on_batch(x, np.array([0, 1] * 4))
    after = student.get_weights()
    assert any(not np.array_equal(a, b) for a, b in zip(before, after)), "student trained"
    assert all(type(layer) is not MatmulConv for layer in all_layers(student)), "saved as is"
