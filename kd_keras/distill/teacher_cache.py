"""TeacherCache: the teacher's outputs on the training images computed once and replayed each
epoch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kd_keras.data.pipeline import make_dataset
from kd_keras.distill.distiller import TEACHER_PREFIX


class TeacherCache:
    """The frozen teacher's outputs for every training image, computed once.

    The teacher sees each image under deterministic preprocessing (no augmentation), at the
    training pipeline's size, through the same Distiller code that would run it per step, so
    cached and uncached losses are equal on un-augmented batches. `storage = "memory"` keeps
    numpy arrays; `"disk"` memory-maps them in `folder` (for sets larger than RAM).

    Args:
        distiller: the Distiller whose teacher (and feature tap) to run.
        split: the training split.
        image_size: the training pipeline's image size.
        batch_size: batch size of the one pass over the split.
        storage: `"memory"` or `"disk"`.
        folder: where `"disk"` writes its `.npy` files.
    """

    def __init__(self, distiller, split, image_size: int, batch_size: int,
                 storage: str = "memory", folder: Path | None = None):  # fmt: skip
        if storage not in ("memory", "disk"):
            raise ValueError(f"storage must be 'memory' or 'disk', got {storage!r}")
        if storage == "disk" and folder is None:
            raise ValueError("storage 'disk' needs a folder")
        ds = make_dataset(split, image_size, batch_size, labels=False, cache=False)
        self.arrays: dict[str, np.ndarray] = {}
        start = 0
        for batch in ds:
            out = {k: np.asarray(v) for k, v in distiller.teacher_outputs(batch).items()}
            if not self.arrays:
                for key, value in out.items():
                    shape = (len(split), *value.shape[1:])
                    if storage == "memory":
                        self.arrays[key] = np.empty(shape, "float32")
                    else:
                        folder.mkdir(parents=True, exist_ok=True)
                        self.arrays[key] = np.lib.format.open_memmap(
                            folder / f"{key}.npy", mode="w+", dtype="float32", shape=shape
                        )
            for key, value in out.items():
                self.arrays[key][start : start + len(value)] = value
            start += len(next(iter(out.values())))
        for value in self.arrays.values():
            if isinstance(value, np.memmap):
                value.flush()
        self.storage = storage

    @property
    def nbytes(self) -> int:
        """Size of the cached outputs."""
        return sum(int(v.nbytes) for v in self.arrays.values())

    def lookup(self, indices) -> dict:
        """tf ops: the cached outputs of a batch of split indices, keyed `teacher_<name>`.

        Rows are gathered by numpy (memory or memory-mapped file): a large array captured as a
        TensorFlow constant in a tf.data function is copied on every call."""
        import tensorflow as tf

        out = {}
        for key, array in self.arrays.items():
            value = tf.numpy_function(lambda i, a=array: np.asarray(a[i], "float32"), [indices],
                                      tf.float32)  # fmt: skip
            value.set_shape((None, *array.shape[1:]))
            out[TEACHER_PREFIX + key] = value
        return out
