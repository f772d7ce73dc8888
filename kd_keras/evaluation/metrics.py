"""Pure metrics on labels and probabilities: classification metrics, the decision threshold, the
imbalanced seed subset.
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

from kd_keras.errors import KDError


def predict_classes(probs: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Argmax, or for two classes `P(class 1) >= threshold` when a threshold is given."""
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

    ROC AUC is one-vs-rest macro for more than two classes; it is None when a class is absent
    from `y_true` (undefined then). Non-finite probabilities are an error, never a metric.
    """
    y_true = np.asarray(y_true).reshape(-1)
    if not np.isfinite(probs).all():
        raise ValueError("classification_metrics got non-finite probabilities")
    y_pred = predict_classes(probs, threshold)
    labels = list(range(len(class_names)))
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    auc = None
    if len(np.unique(y_true)) == len(class_names):
        if len(class_names) == 2:
            auc = float(skm.roc_auc_score(y_true, probs[:, 1]))
        else:
            auc = float(skm.roc_auc_score(y_true, probs, multi_class="ovr", labels=labels))
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
    """Binary decision threshold on P(class 1) that maximises validation balanced accuracy.

    The candidates are 0.5 and every validation probability; ties go to the threshold closest
    to 0.5 (the least surprising choice), then to the smaller one. Balanced accuracy is the
    mean recall of the classes present in `y_val` (scikit-learn's `balanced_accuracy_score`),
    counted for all candidates at once from the sorted probabilities of each class."""
    y = np.asarray(y_val).reshape(-1)
    p1 = np.asarray(probs_val)[:, 1]
    candidates = np.unique(np.concatenate([p1, [0.5]]))
    recalls = []
    for cls in (0, 1):
        scores = np.sort(p1[y == cls])
        if not len(scores):
            continue  # a class absent from y_val has no recall (as in scikit-learn)
        below = np.searchsorted(scores, candidates, side="left")  # predicted 0: p < t
        hits = below if cls == 0 else len(scores) - below
        recalls.append(hits / len(scores))
    balanced = np.mean(recalls, axis=0)
    best = balanced >= balanced.max() - 1e-12
    return float(candidates[best][np.argmin(np.abs(candidates[best] - 0.5))])


def imbalanced_subset_indices(
    labels: np.ndarray, minority: int, n_minority: int, n_majority: int, seed: int
) -> np.ndarray:
    """A reproducible binary subset with seed 000's imbalance (default 21 minority vs 279
    majority images), drawn without replacement with a fixed seed; sorted indices."""
    rng = np.random.default_rng(seed)
    picked = []
    for cls, n in ((minority, n_minority), (1 - minority, n_majority)):
        pool = np.flatnonzero(labels == cls)
        if len(pool) < n:
            raise KDError(f"the test split has only {len(pool)} images of class {cls}, "
                          f"{n} needed for the imbalanced subset")  # fmt: skip
        picked.append(rng.choice(pool, size=n, replace=False))
    return np.sort(np.concatenate(picked))
