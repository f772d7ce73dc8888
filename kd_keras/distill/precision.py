"""How a train step runs on this host: dtype policy (`train.precision`), XLA
(`train.jit_compile`), and models back in float32 for saving.

Both `"auto"` settings are decided from what the host has, never from a table measured on
one machine alone, and each decision comes with the reason the run log prints:

- precision: `mixed_float16` on a GPU; `float32` on every CPU class measured: with AMX
  (Intel Sapphire Rapids class) the ResNet50 -> ResNet18 distillation step at 32 px was no
  faster in bfloat16 (170 vs 173 ms, `benchmarks/training_speed.py`), with AVX-512 BF16 alone
  (AMD Zen 4) slower (154 vs 133 ms), and AVX2-only CPUs have no bfloat16 arithmetic.
- XLA: on a CPU, only for steps whose every model is attention-based (`JIT_FASTER`: DeiT-small
  1.35x faster with XLA on AVX-512); convolutional steps stay on oneDNN, which XLA's CPU
  convolutions trail on both host classes (ResNet18/50 at 32 px: 4-5x slower on AVX-512,
  1.4-1.7x on AVX2); Keras's own choice on GPUs and under a distribution strategy.

Variables stay float32 under every policy (Keras's mixed precision), logits layers compute in
float32, and every saved model is rebuilt in float32 with the trained weights, so `.keras`,
ONNX and TFLite files are float32 whatever trained them. bfloat16 has float32's exponent
range: no loss scaling; float16 gets Keras's `LossScaleOptimizer`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import keras

from kd_keras import host
from kd_keras.archs import JIT_FASTER
from kd_keras.models.taps import all_layers

POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")


def _has_gpu() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def choose_policy(setting: str, flags: frozenset[str] | None = None) -> tuple[str, str]:
    """`train.precision` as a Keras dtype policy name and the reason (`auto` decided from the
    host: GPU, then the CPU's ISA `flags`, default this machine's)."""
    if setting != "auto":
        return setting, f"train.precision = {setting!r}"
    if _has_gpu():
        return "mixed_float16", "auto: a GPU is present"
    features = host.isa_features(flags)
    if "AMX" in features:
        return "float32", "auto: AMX bfloat16 measured no faster than float32 at these sizes"
    if "BF16" in features:
        return "float32", "auto: AVX-512 BF16 without AMX measured slower than float32"
    return "float32", "auto: the CPU has no native bfloat16"


def resolve_policy(setting: str) -> str:
    """`train.precision` as a Keras dtype policy name (`auto` decided for this host)."""
    return choose_policy(setting)[0]


def choose_jit_compile(setting: bool | str, archs: list[str]) -> tuple[bool | str, str]:
    """`train.jit_compile` for a step running `archs`, and the reason: True/False as set;
    `"auto"` is XLA on a CPU only when every model in the step is in `JIT_FASTER` and no
    distribution strategy is in use, and Keras's own choice (`"auto"`) on GPUs."""
    if setting != "auto":
        return bool(setting), f"train.jit_compile = {setting!r}"
    import tensorflow as tf

    if _has_gpu() or tf.distribute.has_strategy():
        return "auto", "auto: Keras decides (GPU or distribution strategy)"
    if all(arch in JIT_FASTER for arch in archs):
        return True, f"auto: {', '.join(archs)} measured faster with XLA on CPU"
    slower = [arch for arch in archs if arch not in JIT_FASTER]
    return False, f"auto: convolutional or unmeasured step ({', '.join(slower)}): oneDNN"


def resolve_jit_compile(setting: bool | str, archs: list[str]) -> bool | str:
    """`train.jit_compile` for a step running `archs` (see `choose_jit_compile`)."""
    return choose_jit_compile(setting, archs)[0]


@contextlib.contextmanager
def policy_scope(policy: str) -> Iterator[None]:
    """Models built inside use `policy`; the global policy is restored afterwards."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def float32_copy(model: keras.Model, build: Callable[[], keras.Model]) -> keras.Model:
    """`model` rebuilt in float32 by `build` with the same (float32) weights: what is saved."""
    if all(layer.dtype_policy.name == "float32" for layer in all_layers(model)):
        return model
    with policy_scope("float32"):
        copy = build()
    copy.set_weights(model.get_weights())
    return copy
