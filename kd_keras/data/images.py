"""Image files on disk: the folder walk and the decoder shared by training data and prediction."""

from __future__ import annotations

import os
from pathlib import Path

import tensorflow as tf

from kd_keras.errors import KDError

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".gif")


def image_files(folder: Path) -> list[Path]:
    """The image files under `folder` (recursively, by extension), sorted by their path string."""
    return sorted(
        (p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
        key=str,
    )


def decode_file(path: tf.Tensor) -> tf.Tensor:
    data = tf.io.read_file(path)
    return tf.io.decode_image(data, channels=3, expand_animations=False)


def decode_errors() -> tuple[type[Exception], ...]:
    """What reading an unreadable image file raises (not a bug): TensorFlow's op errors
    (InvalidArgumentError for a foreign, empty or truncated file, NotFoundError) and, on ~2,500
    truncated and bit-flipped PNG, JPEG, GIF and BMP files, PIL's OSError (UnidentifiedImageError,
    "image file is truncated"), SyntaxError (a broken PNG chunk) and DecompressionBombError."""
    from PIL import Image

    return (tf.errors.OpError, OSError, SyntaxError, Image.DecompressionBombError)


def to_rgb(image: tf.Tensor) -> tf.Tensor:
    if image.shape.rank == 2:
        image = image[..., tf.newaxis]
    if image.shape[-1] == 1:
        image = tf.image.grayscale_to_rgb(image)
    return image


def list_images(inputs: list[str | os.PathLike]) -> list[Path]:
    """Image files named by `inputs` (files as given; folders searched recursively for image
    extensions, sorted). A path that does not exist, or no image at all, is a `KDError`."""
    if not inputs:
        raise KDError("no images given: pass image files or folders")
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += sorted(image_files(item))
        elif item.is_file():
            found.append(item)
        else:
            raise KDError(f"image file or folder not found: {item}")
    if not found:
        raise KDError(f"no image files (JPEG, PNG, BMP, GIF) in {', '.join(map(str, inputs))}")
    return found
