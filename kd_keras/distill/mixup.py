"""MixUp (Zhang et al., 2018) for the Distiller's train step, with stateless draws.

Image i of a batch is blended with image perm[i] of the same batch, lam_i * x_i + (1 - lam_i)
* x_perm[i], lam_i ~ Beta(a, a) folded to max(lam, 1 - lam) so each image keeps its own label
as the larger share. In a distillation step the teacher labels the mixed image itself (function
matching: Beyer et al., 2022, "Knowledge distillation: a good teacher is patient and
consistent"); the label term mixes both labels by lam (`mixed_cross_entropy`).
"""

from __future__ import annotations

import tensorflow as tf
from keras import ops

from kd_keras.distill import losses


def mix_batch(images, y, sample_weight, strength: float, seed: int, step) -> tuple:
    """MixUp of one batch: (mixed images, mixed sample weights, (partner labels, lam)).

    `strength` is a (> 0) of Beta(a, a). Sample weights mix by the same lam (None stays None).
    The draws are stateless in (`seed`, `step`): a resumed run mixes as the uninterrupted one.
    """
    n = ops.shape(images)[0]
    key = tf.stack([tf.constant(seed, tf.int64), tf.cast(step, tf.int64)])
    seeds = tf.random.experimental.stateless_split(key, num=3)
    a = tf.constant(strength, tf.float32)
    g1 = tf.random.stateless_gamma([n], seed=seeds[0], alpha=a)
    g2 = tf.random.stateless_gamma([n], seed=seeds[1], alpha=a)
    lam = g1 / tf.maximum(g1 + g2, 1e-12)  # Beta(a, a) from two Gamma(a) draws
    lam = tf.maximum(lam, 1.0 - lam)
    perm = tf.argsort(tf.random.stateless_uniform([n], seed=seeds[2]))
    lam_x = tf.cast(tf.reshape(lam, [-1] + [1] * (len(images.shape) - 1)), images.dtype)
    mixed = lam_x * images + (1.0 - lam_x) * tf.gather(images, perm)
    if sample_weight is not None:
        w = tf.cast(tf.reshape(sample_weight, (-1,)), tf.float32)
        sample_weight = lam * w + (1.0 - lam) * tf.gather(w, perm)
    return mixed, sample_weight, (tf.gather(y, perm), lam)


def mixed_cross_entropy(y, logits, mix=None):
    """Per-sample CE of `logits`; with `mix` = (partner labels, lam) of `mix_batch`,
    lam * CE(y) + (1 - lam) * CE(partner labels)."""
    per_image = losses.cross_entropy(y, logits)
    if mix is None:
        return per_image
    partner_y, lam = mix
    lam = ops.reshape(ops.cast(lam, "float32"), (-1,))
    return lam * per_image + (1.0 - lam) * losses.cross_entropy(partner_y, logits)
