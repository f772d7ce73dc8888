"""Training-time augmentation (random resized crop, flips, brightness/contrast) as tf.data ops."""

from __future__ import annotations

import tensorflow as tf

from kd_keras.config import AugmentConfig


def random_resized_crop(image, size: int, scale_min: float, seed) -> tf.Tensor:
    """Crop a random region (area in [scale_min, 1], aspect 3/4..4/3) and resize to `size`.

    `seed` is a shape-[2] integer tensor: the crop is a pure function of image and seed
    (stateless), so a pipeline reproduces its crops whatever else ran in the process.
    """
    begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        area_range=(scale_min, 1.0),
        aspect_ratio_range=(3 / 4, 4 / 3),
        min_object_covered=0.0,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
        seed=seed,
    )
    image = tf.slice(image, begin, crop)
    return tf.image.resize(image, (size, size))


def augment_image(image, size: int, aug: AugmentConfig, seed) -> tf.Tensor:
    """Random resized crop, horizontal flip, brightness and contrast jitter of one [0, 255]
    image, all stateless: a pure function of the image and its shape-[2] `seed`, so training
    batches are reproduced exactly by the run seed (parallel maps and global seeds included).
    Jitter `j` shifts brightness by up to j * 255 and scales contrast by a factor in [1-j, 1+j],
    as Keras's RandomBrightness / RandomContrast with the same factor do."""
    crop_seed, flip_seed, bright_seed, contrast_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 4)
    )
    if aug.random_resized_crop:
        image = random_resized_crop(image, size, aug.crop_scale_min, crop_seed)
    if aug.horizontal_flip:
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    if aug.color_jitter > 0:
        j = aug.color_jitter
        image = tf.image.stateless_random_brightness(image, j * 255.0, bright_seed)
        image = tf.image.stateless_random_contrast(image, 1.0 - j, 1.0 + j, contrast_seed)
    return tf.clip_by_value(image, 0.0, 255.0)
