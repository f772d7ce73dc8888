"""Evaluation: classification metrics, confusion matrices and the run report.

All metrics are computed from predicted class probabilities on one split. For binary tasks a
decision threshold on the positive-class probability (class index 1) may replace argmax; it is
chosen on the validation split (`choose_threshold`), never on test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn import metrics as skm

from kd_keras.errors import atomic_write, write_json


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predict_classes(probs: np.ndarray, threshold: float | None = None) -> np.ndarray:
    if threshold is None or probs.shape[1] != 2:
        return probs.argmax(axis=1)
    return (probs[:, 1] >= threshold).astype("int64")


def classification_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: list[str],
    threshold: float | None = None,
) -> dict:
    """Accuracy, balanced accuracy, macro F1, ROC AUC, per-class precision/recall, confusion.

    ROC AUC is one-vs-rest macro for more than two classes; it is None when a class is absent.
    """
    y_true = np.asarray(y_true).reshape(-1)
    y_pred = predict_classes(probs, threshold)
    labels = list(range(len(class_names)))
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    try:
        if len(class_names) == 2:
            auc = float(skm.roc_auc_score(y_true, probs[:, 1]))
        else:
            auc = float(skm.roc_auc_score(y_true, probs, multi_class="ovr", labels=labels))
    except ValueError:
        auc = None
    return {
        "n": int(len(y_true)),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(np.mean(recall[support > 0])) if support.any() else 0.0,
        "macro_f1": float(np.mean(f1)),
        "roc_auc": auc,
        "threshold": threshold,
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": skm.confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def choose_threshold(y_val: np.ndarray, probs_val: np.ndarray) -> float:
    """Binary decision threshold on P(class 1) that maximises validation balanced accuracy."""
    candidates = np.unique(np.concatenate([probs_val[:, 1], [0.5]]))
    best, best_score = 0.5, -1.0
    for t in candidates:
        score = skm.balanced_accuracy_score(y_val, (probs_val[:, 1] >= t).astype("int64"))
        # ties go to the threshold closest to 0.5, the least surprising choice
        if score > best_score + 1e-12 or (
            abs(score - best_score) <= 1e-12 and abs(t - 0.5) < abs(best - 0.5)
        ):
            best, best_score = float(t), score
    return best


def save_confusion_matrix(path: str | Path, matrix: list[list[int]], class_names: list[str],
                          title: str) -> Path:  # fmt: skip
    """Confusion matrix as a PNG (rows: true class, columns: predicted class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(1.2 * len(class_names) + 2.5, 1.2 * len(class_names) + 2))
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
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100))
    finally:
        plt.close(fig)


def save_confusion(run_dir: Path, model_name: str, result: dict, class_names: list[str]) -> None:
    write_json(run_dir / f"confusion_{model_name}.json",
               {"class_names": class_names, "matrix": result["confusion_matrix"]})  # fmt: skip
    save_confusion_matrix(run_dir / f"confusion_{model_name}.png", result["confusion_matrix"],
                          class_names, f"{model_name} (test)")  # fmt: skip
