"""Evaluating a run: every model on validation and test, `report.json` / `report.md`.

All metrics are computed from predicted class probabilities on one split. For binary tasks a
decision threshold on the positive-class probability (class index 1) may replace argmax; it is
chosen on the validation split (`kd_keras.evaluation.metrics.choose_threshold`), never on
test.
"""

from __future__ import annotations

from pathlib import Path

from kd_keras.data.checks import minority_class
from kd_keras.data.pipeline import make_dataset
from kd_keras.errors import KDError
from kd_keras.evaluation.metrics import (
    choose_threshold,
    classification_metrics,
    imbalanced_subset_indices,
)
from kd_keras.evaluation.predictions import save_confusion, save_predictions
from kd_keras.io import write_json, write_text
from kd_keras.models.taps import image_size_of
from kd_keras.run.files import MODEL_STAGES
from kd_keras.run.folder import RunFolder
from kd_keras.runtimes import keras_predictor, predict_probs


def imbalanced_subset_table(report: dict, key: str = "test_subset") -> str:
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
            imbalanced_subset_table(report),
            "",
        ]
    for name, entry in report["models"].items():
        if entry.get("train_seconds") is None:
            continue
        trained = f"- {name}: trained {entry['train_seconds'] / 60:.1f} min, "
        if entry.get("members"):
            lines.append(trained + f"ensemble of {entry['members']} members of {entry['epochs']} "
                         "epochs, each at its best epoch (selected on validation)")  # fmt: skip
        else:
            lines.append(trained + f"best epoch {entry['best_epoch']} of {entry['epochs']} "
                         "(selected on validation)")  # fmt: skip
    return "\n".join(lines) + "\n"


def evaluate_run(run_dir: str | Path | RunFolder, splits=None) -> dict:
    """(Re)compute validation and test metrics of every model saved in a run folder and write
    `report.json`, `report.md`, confusion matrices (JSON and PNG) and per-image predictions
    (`predictions_<model>.npz`). It writes no `report.html` (reporting sits above evaluation):
    `kd_keras.workflows.distill.evaluate_and_report` evaluates, then writes it."""
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
    if cfg.eval.imbalanced_subset and splits.num_classes == 2:
        minority = minority_class(splits.train.labels)
        subset = imbalanced_subset_indices(test_split.labels, minority, cfg.eval.subset_minority,
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
            "arch": run.arch(name),  # the one name reports, exports and the model card use
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
        members = len(stage.get("members", [])) or None  # a teacher.members ensemble
        entry.update(train_seconds=stage.get("seconds"), best_epoch=stage.get("best_epoch"),
                     epochs=stage.get("epochs"), members=members)  # fmt: skip
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
