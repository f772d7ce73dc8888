"""tf.data pipelines: decode, resize, augment, batch; repeat-and-shuffle streams for training."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from kd_keras.config import AugmentConfig
from kd_keras.data.augment import augment_image
from kd_keras.data.images import decode_file, to_rgb
from kd_keras.data.sources import Split


def training_steps(num_images: int, batch_size: int) -> int:
    """Batches in one training epoch (the last one may be partial)."""
    return -(-num_images // batch_size)


def _epoch_stream(images, n: int, image_size: int, batch_size: int, augment, seed: int,
                  first_epoch: int, epochs: int | None) -> tf.data.Dataset:  # fmt: skip
    """Training batches of epochs `first_epoch` to `epochs - 1` (one epoch when `epochs` is
    None), one after the other: epoch e shuffles `images` (image, label, index) with the op
    seed (seed, e) and augments image i with the stateless seed pair (seed * 1_000_003 + e, i).
    So epoch e's batches depend on the run seed and e only, not on how many iterators were
    opened before (Keras's `fit` and a resumed run do not open them alike)."""

    def one_epoch(epoch: int) -> tf.data.Dataset:
        epoch_seed = seed * 1_000_003 + epoch
        ds = images.shuffle(min(n, 10_000), seed=epoch_seed % (2**31 - 1),
                            reshuffle_each_iteration=False)  # fmt: skip
        if augment is not None:
            key = tf.constant(epoch_seed, tf.int64)
            ds = ds.map(
                lambda x, y, i: (augment_image(x, image_size, augment, tf.stack([key, i])), y, i),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
        return ds.batch(batch_size)

    last = first_epoch + 1 if epochs is None else max(epochs, first_epoch + 1)
    ds = one_epoch(first_epoch)
    for epoch in range(first_epoch + 1, last):
        ds = ds.concatenate(one_epoch(epoch))
    return ds


def make_dataset(
    split: Split,
    image_size: int,
    batch_size: int,
    *,
    training: bool = False,
    augment: AugmentConfig | None = None,
    seed: int = 0,
    cache: bool = True,
    labels: bool = True,
    balanced: bool = False,
    teacher_cache=None,
    first_epoch: int = 0,
    epochs: int | None = None,
) -> tf.data.Dataset:
    """Batches of (images, labels), or images only with `labels=False`.

    Evaluation pipelines keep order. Training pipelines are the epochs `first_epoch` to
    `epochs - 1` as one stream (one epoch when `epochs` is None; pass `steps_per_epoch =
    training_steps(len(split), batch_size)` to `fit`): epoch e is the split shuffled and
    augmented with seeds that are a function of (`seed`, e) alone, so a run resumed at
    `first_epoch = k` sees exactly the batches the uninterrupted run saw from its epoch k on.
    With `balanced=True` every class is drawn with equal probability from one endless stream
    seeded by `seed` (a resumed run restarts that stream). With a `teacher_cache`
    (`kd_keras.distill.teacher_cache.TeacherCache` of this split) the inputs are a dict of the
    images and the teacher's cached outputs for exactly those images.
    """
    files = not isinstance(split.images, np.ndarray)

    def load(image, label, index):
        image = decode_file(image) if files else to_rgb(image)
        image = tf.image.resize(tf.cast(image, tf.float32), (image_size, image_size))
        return tf.clip_by_value(image, 0.0, 255.0), label, index

    def source(index: np.ndarray) -> tf.data.Dataset:
        part = split.subset(index)
        ds = tf.data.Dataset.from_tensor_slices(
            (part.images, part.labels.astype("int32"), index.astype("int64"))
        )
        ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
        return ds.cache() if cache else ds

    if training and balanced:
        classes = np.unique(split.labels)
        streams = [
            source(np.flatnonzero(split.labels == c))
            .shuffle(10_000, seed=seed + int(c), reshuffle_each_iteration=True)
            .repeat()
            for c in classes
        ]
        ds = tf.data.Dataset.sample_from_datasets(
            streams, weights=[1.0 / len(classes)] * len(classes), seed=seed
        )
        if augment is not None:  # one seed pair per drawn image, from a stream seeded once
            draws = tf.data.Dataset.random(seed=seed).batch(2)
            ds = tf.data.Dataset.zip(ds, draws).map(
                lambda xyi, pair: (augment_image(xyi[0], image_size, augment, pair), *xyi[1:]),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
        ds = ds.batch(batch_size)
    elif training:
        ds = _epoch_stream(source(np.arange(len(split))), len(split), image_size, batch_size,
                           augment, seed, first_epoch, epochs)  # fmt: skip
    else:
        ds = source(np.arange(len(split))).batch(batch_size)
    if teacher_cache is not None:
        ds = ds.map(lambda x, y, i: ({"images": x, **teacher_cache.lookup(i)}, y))
    else:
        ds = ds.map(lambda x, y, i: (x, y))
    if not labels:
        ds = ds.map(lambda x, y: x)
    return ds.prefetch(tf.data.AUTOTUNE)
