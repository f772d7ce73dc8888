"""Evaluation: classification metrics, confusion matrices and the run report.

All metrics are computed from predicted class probabilities on one split. For binary tasks a
decision threshold on the positive-class probability (class index 1) may replace argmax; it is
chosen on the validation split (`choose_threshold`), never on test.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn import metrics as skm

from kd_keras.errors import KDError, atomic_write, write_json, write_text
from kd_keras.run import MODEL_STAGES, RunFolder


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


def seed_subset_indices(
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


def seed_table(report: dict, key: str = "test_subset") -> str:
    """Seed 000's table format: one column per model, one row per metric."""
    names = report["class_names"]
    models = {n: e[key] for n, e in report["models"].items() if key in e}
    rows = [("accuracy", lambda m: m["accuracy"]),
            ("balanced accuracy", lambda m: m["balanced_accuracy"])]  # fmt: skip
    rows += [(f"recall {c}", lambda m, c=c: m["per_class"][c]["recall"]) for c in names]
    rows += [("macro F1", lambda m: m["macro_f1"])]
    lines = ["| metric | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    lines += [f"| {label} | " + " | ".join(f"{get(m):.3f}" for m in models.values()) + " |"
              for label, get in rows]  # fmt: skip
    return "\n".join(lines)


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


def model_summary_row(name: str, entry: dict, class_names: list[str]) -> str:
    """One markdown table row of the report: a model's test metrics."""
    t = entry["test"]
    recalls = " | ".join(f"{t['per_class'][c]['recall']:.3f}" for c in class_names)
    auc = f"{t['roc_auc']:.3f}" if t["roc_auc"] is not None else "n/a"
    return (
        f"| {name} | {entry['arch']} | {entry['params'] / 1e6:.1f} M | {entry['size_mb']:.1f} | "
        f"{t['accuracy']:.3f} | {t['balanced_accuracy']:.3f} | {recalls} | {t['macro_f1']:.3f} | "
        f"{auc} |"
    )


def metrics_table(report: dict) -> str:
    """The markdown table of every model's test metrics (one row per model)."""
    names = report["class_names"]
    lines = [
        "| model | arch | params | size (MB) | accuracy | balanced acc. | "
        + " | ".join(f"recall {c}" for c in names)
        + " | macro F1 | ROC AUC |",
        "|---|---|---|---|---|---|" + "---|" * len(names) + "---|---|",
    ]
    lines += [model_summary_row(n, e, names) for n, e in report["models"].items()]
    return "\n".join(lines)


def report_markdown(report: dict) -> str:
    """The run report as markdown: the test table, the imbalanced subset, training times."""
    names = report["class_names"]
    lines = [
        f"# Run `{report['run']}`: test split ({report['test_size']} images)",
        "",
        f"Image size {report['image_size']} px. Decision rule: {report['decision_rule']}.",
        "",
        metrics_table(report),
        "",
    ]
    if "subset" in report:
        sub = report["subset"]
        lines += [
            f"## Imbalanced test subset ({sub['minority']} {names[sub['minority_class']]} vs "
            f"{sub['majority']} {names[1 - sub['minority_class']]}, seed {sub['seed']}: "
            "seed 000's ratio)",
            "",
            seed_table(report),
            "",
        ]
    for name, entry in report["models"].items():
        if entry.get("train_seconds") is not None:
            lines.append(
                f"- {name}: trained {entry['train_seconds'] / 60:.1f} min, best epoch "
                f"{entry['best_epoch']} of {entry['epochs']} (selected on validation)"
            )
    return "\n".join(lines) + "\n"


def evaluate_run(run_dir: str | Path | RunFolder, splits=None) -> dict:
    """(Re)compute validation and test metrics of every model saved in a run folder and write
    `report.json`, `report.md`, confusion matrices (JSON and PNG), per-image predictions
    (`predictions_<model>.npz`) and `report.html`."""
    from kd_keras.data import make_dataset
    from kd_keras.inference import keras_predictor, predict_probs
    from kd_keras.models import image_size_of

    run = run_dir if isinstance(run_dir, RunFolder) else RunFolder.find(run_dir)
    run.check_consistent(report=False)
    cfg = run.cfg
    splits = splits or run.load_splits()
    size, batch = cfg.data.image_size, cfg.data.batch_size
    test_split = splits.test if cfg.eval.split == "test" else splits.val
    datasets = {}

    def at_size(n: int):  # each model is evaluated at its own input size
        if n not in datasets:
            datasets[n] = (make_dataset(splits.val, n, batch, labels=False),
                           make_dataset(test_split, n, batch, labels=False))  # fmt: skip
        return datasets[n]

    log = run.train_log()
    tune = cfg.eval.threshold != "argmax" and splits.num_classes == 2
    subset = None
    if cfg.eval.seed_subset and splits.num_classes == 2:
        minority = int(np.argmin(np.bincount(splits.train.labels, minlength=2)))
        subset = seed_subset_indices(test_split.labels, minority, cfg.eval.subset_minority,
                                     cfg.eval.subset_majority, cfg.eval.subset_seed)  # fmt: skip

    models = {}
    for name, path in run.models().items():
        model = run.load_model(name)
        val_ds, test_ds = at_size(image_size_of(model))
        predictor = keras_predictor(model)
        val_probs = predict_probs(predictor, val_ds, f"{name} ({path.name})")
        threshold = choose_threshold(splits.val.labels, val_probs) if tune else None
        test_probs = predict_probs(predictor, test_ds, f"{name} ({path.name})")
        test = classification_metrics(test_split.labels, test_probs, splits.class_names, threshold)
        stage = log.get(MODEL_STAGES[name], {})
        entry = {
            "file": path.name,
            "arch": model.name,
            "image_size": image_size_of(model),
            "params": int(model.count_params()),
            "size_mb": path.stat().st_size / 1e6,
            "threshold": threshold,
            "val": classification_metrics(
                splits.val.labels, val_probs, splits.class_names, threshold
            ),
            "test": test,
        }
        if subset is not None:
            entry["test_subset"] = classification_metrics(
                test_split.labels[subset], test_probs[subset], splits.class_names, threshold
            )
        entry.update(train_seconds=stage.get("seconds"), best_epoch=stage.get("best_epoch"),
                     epochs=stage.get("epochs"))  # fmt: skip
        models[name] = entry
        save_confusion(run, name, test, splits.class_names)
        save_predictions(run.predictions_path(name), test_split.labels, test_probs, threshold)
    if not models:
        names = ", ".join(run.model_path(n).name for n in MODEL_STAGES)
        raise KDError(f"run {run.path} holds no trained model ({names})")
    report = {
        "run": cfg.run.name,
        "class_names": splits.class_names,
        "image_size": size,
        "split": cfg.eval.split,
        "test_size": len(test_split),
        "decision_rule": (
            "binary threshold on P(class 1) chosen on validation (max balanced accuracy)"
            if tune
            else "argmax"
        ),  # fmt: skip
        "data": splits.summary(),
        "models": models,
    }
    if subset is not None:
        report["subset"] = {
            "minority_class": minority, "minority": cfg.eval.subset_minority,
            "majority": cfg.eval.subset_majority, "seed": cfg.eval.subset_seed,
            "indices": subset.tolist(),
        }  # fmt: skip
    write_json(run.report_path, report)
    write_text(run.report_md_path, report_markdown(report))
    return report
