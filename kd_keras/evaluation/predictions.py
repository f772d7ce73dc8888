"""Saved predictions and confusion matrices of an evaluated run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kd_keras.evaluation.metrics import predict_classes
from kd_keras.io import atomic_write, write_json
from kd_keras.run.folder import RunFolder


def save_confusion_matrix(path: str | Path, matrix: list[list[int]], class_names: list[str],
                          title: str) -> Path:  # fmt: skip
    """Confusion matrix as a PNG (rows: true class, columns: predicted class)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no figure registry

    m = np.asarray(matrix)
    fig = Figure(figsize=(1.2 * len(class_names) + 2.5, 1.2 * len(class_names) + 2))
    ax = fig.subplots()
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=30, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            color = "white" if m[i, j] > m.max() / 2 else "black"
            ax.text(j, i, str(m[i, j]), ha="center", va="center", color=color)
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100))


def save_confusion(run: RunFolder, model_name: str, result: dict, class_names: list[str]) -> None:
    """The test confusion matrix of one model as JSON and PNG in the run folder."""
    write_json(run.confusion_path(model_name, ".json"),
               {"class_names": class_names, "matrix": result["confusion_matrix"]})  # fmt: skip
    save_confusion_matrix(run.confusion_path(model_name, ".png"), result["confusion_matrix"],
                          class_names, f"{model_name} (test)")  # fmt: skip


@dataclass
class Predictions:
    """One model's per-image outputs on the evaluated split: `probs` (N x classes), `labels`
    and `predicted` (N), and the `threshold` behind `predicted` (None: argmax)."""

    probs: np.ndarray
    labels: np.ndarray
    predicted: np.ndarray
    threshold: float | None = None


def save_predictions(path: str | Path, labels: np.ndarray, probs: np.ndarray,
                     threshold: float | None) -> Path:  # fmt: skip
    """Per-image probabilities, labels and decisions of one model as `.npz` (atomically)."""
    arrays = {
        "probs": np.asarray(probs, "float32"),
        "labels": np.asarray(labels, "int64").reshape(-1),
        "predicted": predict_classes(probs, threshold),
        "threshold": np.asarray(np.nan if threshold is None else threshold, "float64"),
    }
    return atomic_write(path, lambda tmp: np.savez_compressed(tmp, **arrays))


def load_predictions(path: str | Path) -> Predictions:
    """Read what `save_predictions` wrote."""
    with np.load(path) as data:
        threshold = float(data["threshold"])
        return Predictions(data["probs"].astype("float64"), data["labels"], data["predicted"],
                           None if np.isnan(threshold) else threshold)  # fmt: skip
