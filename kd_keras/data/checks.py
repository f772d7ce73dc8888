"""Checks on loaded data before any slow work: unreadable images, split sizes, the evaluation
subset.
"""

from __future__ import annotations

import logging

import numpy as np
import tensorflow as tf

from kd_keras.data.sources import Split, Splits
from kd_keras.errors import KDError

logger = logging.getLogger(__name__)


def minority_class(labels: np.ndarray) -> int:
    """The rarer class of binary `labels` (the training split's, for the evaluation subset)."""
    return int(np.argmin(np.bincount(labels, minlength=2)))


def bad_image_files(split: Split) -> list[str]:
    """Paths of a file-based split that do not decode as images (empty for arrays)."""
    if isinstance(split.images, np.ndarray):
        return []
    bad = []
    for path in split.images:
        try:
            image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
            if image.shape[0] == 0 or image.shape[1] == 0:
                bad.append(path)
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError):
            bad.append(path)
    return bad


def check_splits(splits: Splits, cfg) -> Splits:
    """Everything training needs from the data, checked before the first step; prints the
    classes and counts. Every file decodes (bad ones are listed; with `data.skip_bad_files`
    they are dropped and counted); every class has images in train, val and test; the
    imbalanced-subset evaluation finds its images in the test split."""
    for name in ("train", "val", "test"):
        split = getattr(splits, name)
        bad = bad_image_files(split)
        if bad and not cfg.data.skip_bad_files:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise KDError(
                f"{len(bad)} file(s) of the {name} split are not readable images: {shown}; "
                "remove them or set data.skip_bad_files = true"
            )
        if bad:
            unreadable = set(bad)
            keep = np.flatnonzero([p not in unreadable for p in split.images])
            setattr(splits, name, split.subset(keep))
            logger.info(f"data: skipped {len(bad)} unreadable file(s) of the {name} split")
    counts = splits.summary()
    for name, per_class in counts.items():
        empty = [c for c, k in per_class.items() if k == 0]
        if empty:
            raise KDError(
                f"the {name} split has no images of class(es) {empty} (classes "
                f"{splits.class_names}); every class needs images in train, val and test"
            )
    logger.info(f"data: classes {splits.class_names}; images per split and class {counts}")
    ev = cfg.eval
    if ev.imbalanced_subset and splits.num_classes == 2:
        minority = minority_class(splits.train.labels)
        need = {minority: ev.subset_minority, 1 - minority: ev.subset_majority}
        test = splits.test if ev.split == "test" else splits.val
        for cls, n in need.items():
            have = int((test.labels == cls).sum())
            if have < n:
                raise KDError(
                    f"the {ev.split} split has {have} images of class "
                    f"{splits.class_names[cls]!r}; the imbalanced-subset evaluation needs {n}: "
                    "set eval.imbalanced_subset = false or lower eval.subset_minority / "
                    "eval.subset_majority"
                )
    return splits
