"""Adam and SGD whose per-variable update is one fused TensorFlow kernel.

Keras 3's `Adam.update_step` is written in backend ops: on TensorFlow every variable's update is
about ten elementwise kernels (the moments, their bias-corrected step, the variable), each a
full pass over a tensor the size of the variable, and decoupled weight decay adds three more.
The update of a 24 M-parameter ResNet50 then costs more than a fifth of its CPU train step at
32 px (Zen 4, 2 threads: 83 ms for Keras's Adam with decay, 31 ms for `FusedAdam`).

`FusedAdam` and `FusedSGD` keep Keras's optimizers (schedules, loss scaling, tf.distribute,
`iterations`, the slot variables by the same names and order, so checkpoints are unchanged) and
replace only the update of a dense float variable on the TensorFlow backend by the kernels that
compute Keras's own formulas in one pass:

- Adam: `ResourceApplyAdam`, m += (g - m)(1 - b1), v += (g^2 - v)(1 - b2), var -= lr_t m /
  (sqrt(v) + eps) with lr_t = lr sqrt(1 - b2^t) / (1 - b1^t) (Keras's `Adam.update_step`);
- SGD with momentum: `ResourceApplyKerasMomentum`, m = momentum m - lr g, var += m (Nesterov:
  var += momentum m - lr g); without momentum `ResourceApplyGradientDescent`;
- decoupled weight decay (`weight_decay`): var = var (1 - lr wd) before the update, one pass
  (Keras's `_apply_weight_decay`: var -= var wd lr, three).

Keras computes 1 - beta in double precision, TensorFlow's kernel in float32, so the moments
differ from Keras's in the last bit (about 1e-7 relative per step): equal up to rounding, not
bitwise.

Sparse gradients (`tf.IndexedSlices`), AMSGrad and other backends take Keras's own update.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from kd_keras.compat import optimizer_slots

_ON_TENSORFLOW = keras.backend.backend() == "tensorflow"


def _fusable(gradient, variable) -> bool:
    """Whether `variable`'s update can be a fused kernel: a dense gradient of a TensorFlow
    resource variable (a replica's component under tf.distribute) of a float dtype."""
    return (
        _ON_TENSORFLOW
        and not isinstance(gradient, tf.IndexedSlices)
        and hasattr(variable, "handle")
        and variable.dtype.is_floating
    )


def _handle(variable):
    """The resource handle of a Keras slot variable (the current replica's under tf.distribute)
    or of a TensorFlow variable."""
    if isinstance(variable, keras.Variable):
        variable = variable.value
    return variable.handle


class _DecoupledDecay:
    """Mixin: decoupled weight decay applied inside the fused update (one kernel per variable)
    instead of Keras's separate pass over every variable."""

    def _decay(self, variable, learning_rate) -> None:
        if self.decoupled_weight_decay is None:
            return
        rate = tf.cast(learning_rate, variable.dtype) * tf.cast(self.decoupled_weight_decay,
                                                                variable.dtype)  # fmt: skip
        variable.assign(variable.read_value() * (1.0 - rate))  # one pass, no copy

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        """Not supported: the fused decay applies to every trained variable."""
        raise NotImplementedError(
            f"{type(self).__name__} decays every variable; use keras.optimizers."
            f"{type(self).__name__.removeprefix('Fused')} to exclude some"
        )

    def _keras_decay(self, variable, learning_rate) -> None:
        """What Keras's optimizer does when the update itself is not fused."""
        if self.decoupled_weight_decay is not None:
            lr = tf.cast(learning_rate, variable.dtype)
            wd = tf.cast(self.decoupled_weight_decay, variable.dtype)
            variable.assign_sub(variable * wd * lr)

    def _with_decay(self, config: dict) -> dict:
        config["weight_decay"] = self.decoupled_weight_decay
        return config


class FusedAdam(_DecoupledDecay, keras.optimizers.Adam):
    """`keras.optimizers.Adam` (decoupled weight decay included) with one fused kernel per
    variable update on TensorFlow; same arguments, slots and results up to float rounding."""

    def __init__(self, *args, weight_decay=None, **kwargs):
        super().__init__(*args, **kwargs)  # Keras's own decay pass stays off
        self.decoupled_weight_decay = weight_decay or None

    def update_step(self, gradient, variable, learning_rate):
        if self.amsgrad or not _fusable(gradient, variable):
            self._keras_decay(variable, learning_rate)
            return super().update_step(gradient, variable, learning_rate)
        self._decay(variable, learning_rate)
        dtype = variable.dtype
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        m, v = optimizer_slots(self, variable, "momentum", "velocity")
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=_handle(m), v=_handle(v), beta1_power=tf.pow(beta_1, step),
            beta2_power=tf.pow(beta_2, step), lr=tf.cast(learning_rate, dtype), beta1=beta_1,
            beta2=beta_2, epsilon=tf.cast(self.epsilon, dtype), grad=tf.cast(gradient, dtype),
        )  # fmt: skip

    def get_config(self):
        return self._with_decay(super().get_config())


class FusedSGD(_DecoupledDecay, keras.optimizers.SGD):
    """`keras.optimizers.SGD` (momentum, Nesterov, decoupled weight decay) with one fused kernel
    per variable update on TensorFlow; same arguments, slots and results up to float rounding."""

    def __init__(self, *args, weight_decay=None, **kwargs):
        super().__init__(*args, **kwargs)  # Keras's own decay pass stays off
        self.decoupled_weight_decay = weight_decay or None

    def update_step(self, gradient, variable, learning_rate):
        if not _fusable(gradient, variable):
            self._keras_decay(variable, learning_rate)
            return super().update_step(gradient, variable, learning_rate)
        self._decay(variable, learning_rate)
        dtype = variable.dtype
        lr, grad = tf.cast(learning_rate, dtype), tf.cast(gradient, dtype)
        if self.momentum == 0:
            tf.raw_ops.ResourceApplyGradientDescent(var=variable.handle, alpha=lr, delta=grad)
            return
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=variable.handle, accum=_handle(*optimizer_slots(self, variable, "momentum")),
            lr=lr, grad=grad, momentum=tf.cast(self.momentum, dtype), use_nesterov=self.nesterov,
        )  # fmt: skip

    def get_config(self):
        return self._with_decay(super().get_config())
