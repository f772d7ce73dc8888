"""Make a teacher "fine-tuned elsewhere", as docs/own_teacher.md ("Bring your own teacher") uses it.

A keras.applications MobileNetV2 backbone nested inside a functional classifier (global pooling,
a Dense head with 2 logits, the output saved as a one-element list), trained at 64 px on
PneumoniaMNIST with inputs scaled to [-1, 1] — nothing of kd_keras inside it. Then distil it:

    python examples/own_teacher.py --out teacher_64px.keras
    python cli.py distill --config configs/xray.toml --stages distill,scratch \\
        --set teacher.path=teacher_64px.keras --set teacher.input_scaling=symmetric

(`teacher.input_scaling = "auto"` would read "symmetric" from the MobileNetV2 name too.)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def build_teacher(size: int = 64, alpha: float = 0.35):
    """The user's model: MobileNetV2 (fresh weights) nested in a functional classifier whose
    graph expects [-1, 1] inputs and whose output is a one-element list."""
    import keras

    inputs = keras.Input((size, size, 3), name="xray")
    backbone = keras.applications.MobileNetV2(
        input_shape=(size, size, 3), alpha=alpha, include_top=False, weights=None
    )
    for layer in backbone.layers:  # trained for minutes, not days: let BatchNorm keep up
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    x = keras.layers.GlobalAveragePooling2D()(backbone(inputs))
    x = keras.layers.Dropout(0.2)(x)
    return keras.Model(inputs, [keras.layers.Dense(2, name="diagnosis")(x)], name="xray_net")


def scaled_images(images, size: int):
    """PneumoniaMNIST grey 28 px -> RGB at `size`, scaled to [-1, 1] (the user's own recipe)."""
    import tensorflow as tf

    x = tf.image.resize(tf.cast(images[..., None], tf.float32), (size, size))
    return tf.image.grayscale_to_rgb(x) / 127.5 - 1.0


def fine_tune(npz: Path, size: int = 64, epochs: int = 4, limit: int | None = None, seed=0):
    """Train the teacher on the train split (balanced class weights, Adam); returns it."""
    import keras
    import numpy as np

    keras.utils.set_random_seed(seed)
    data = np.load(npz)
    x, y = data["train_images"], data["train_labels"].reshape(-1)
    if limit:
        pick = np.random.default_rng(seed).permutation(len(y))[:limit]
        x, y = x[pick], y[pick]
    counts = np.bincount(y, minlength=2)
    weights = {c: len(y) / (2 * counts[c]) for c in range(2)}
    model = build_teacher(size)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(scaled_images(x, size), y, batch_size=64, epochs=epochs, class_weight=weights,
              verbose=2)  # fmt: skip
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/pneumoniamnist.npz")
    parser.add_argument("--out", default="teacher_64px.keras")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    model = fine_tune(Path(args.data), args.size, args.epochs)
    model.save(args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
