"""Figures of the HTML reports, drawn with matplotlib from already computed numbers.

Every function takes plain arrays or tables and returns a matplotlib `Figure`, made directly
(no pyplot: no global backend is chosen and no figure registry holds them); `png_bytes`
renders one. Nothing here reads a file or runs a model:
`kd_keras.reporting.run_report` reads the run folder and decides what to draw.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from kd_keras.evaluation.predictions import Predictions

LOSS_TERMS = ("loss", "ce", "kd", "feat")
PANEL_WIDTH, PANEL_HEIGHT = 3.4, 2.8


def png_bytes(fig: Figure, dpi: int = 90) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _panels(n: int, cols: int, width: float = PANEL_WIDTH, height: float = PANEL_HEIGHT):
    cols = max(1, min(cols, n))
    rows = int(np.ceil(n / cols))
    fig = Figure(figsize=(width * cols, height * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    flat = axes.ravel()
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


# ---------------------------------------------------------------- training curves


def curve_panels(history: pd.DataFrame) -> list[tuple[str, list[str]]]:
    """Which columns of a history table share a panel: each loss term, then each metric with
    its `val_` counterpart, then the learning rate. Loss terms that are zero in every epoch
    (not used by the stage) are left out."""
    columns = [c for c in history.columns if c != "epoch"]
    bases = list(dict.fromkeys(c.removeprefix("val_") for c in columns))
    order = [b for b in LOSS_TERMS if b in bases] + [
        b for b in bases if b not in LOSS_TERMS and b != "learning_rate"
    ]
    if "learning_rate" in bases:
        order.append("learning_rate")
    panels = []
    for base in order:
        cols = [c for c in (base, f"val_{base}") if c in columns]
        values = history[cols].to_numpy(dtype="float64")
        if base in LOSS_TERMS and base != "loss" and np.all(np.nan_to_num(values) == 0):
            continue
        panels.append((base, cols))
    return panels


def training_curves(
    history: pd.DataFrame, best_epoch: int | None, monitor: str | None, title: str = ""
) -> Figure:
    """One panel per loss term and metric against epoch (training solid, validation dashed);
    the selected epoch is a vertical line, and a dot on the monitored metric."""
    panels = curve_panels(history)
    fig, axes = _panels(len(panels), cols=4)
    epochs = history["epoch"].to_numpy()
    for ax, (base, cols) in zip(axes, panels):
        for col in cols:
            val = col.startswith("val_")
            ax.plot(epochs, history[col], "--" if val else "-", marker="o", markersize=3,
                    label="validation" if val else "training")  # fmt: skip
            if best_epoch is not None and col == monitor and best_epoch in set(epochs):
                y = history.loc[history["epoch"] == best_epoch, col].iloc[0]
                ax.plot([best_epoch], [y], "o", color="crimson", markersize=8, zorder=5)
        if best_epoch is not None:
            ax.axvline(best_epoch, color="crimson", linestyle=":", linewidth=1.2)
        ax.set_title(base.replace("_", " "))
        ax.set_xlabel("epoch")
        if base == "learning_rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- test-split curves


def _curve_points(scores: np.ndarray, positive: np.ndarray):
    """ROC (fpr, tpr) and precision-recall (recall, precision) over every threshold."""
    from sklearn import metrics as skm

    fpr, tpr, _ = skm.roc_curve(positive, scores)
    precision, recall, _ = skm.precision_recall_curve(positive, scores)
    return (fpr, tpr), (recall, precision)


def _operating_point(p: Predictions, cls: int) -> tuple[float, float, float]:
    """(fpr, tpr = recall, precision) of the model's actual decisions for class `cls`."""
    pos, said = p.labels == cls, p.predicted == cls
    tpr = float((said & pos).sum() / max(pos.sum(), 1))
    fpr = float((said & ~pos).sum() / max((~pos).sum(), 1))
    precision = float((said & pos).sum() / said.sum()) if said.any() else float("nan")
    return fpr, tpr, precision


def _roc_classes(n_classes: int) -> list[int]:
    # for two classes the ROC of class 0 mirrors that of class 1: draw one
    return [1] if n_classes == 2 else list(range(n_classes))


def _rule(p: Predictions) -> str:
    return "argmax" if p.threshold is None else f"threshold {p.threshold:.3f}"


def roc_figure(preds: dict[str, Predictions], class_names: Sequence[str]) -> Figure:
    """ROC curves (one-vs-rest) per model, the model's operating point marked."""
    fig, axes = _panels(len(preds), cols=len(preds))
    for ax, (name, p) in zip(axes, preds.items()):
        for cls in _roc_classes(len(class_names)):
            positive = p.labels == cls
            if positive.all() or not positive.any():
                continue
            (fpr, tpr), _ = _curve_points(p.probs[:, cls], positive)
            line = ax.plot(fpr, tpr, label=f"{class_names[cls]}")[0]
            op_fpr, op_tpr, _ = _operating_point(p, cls)
            ax.plot([op_fpr], [op_tpr], "o", color=line.get_color(), markersize=8,
                    markeredgecolor="black")  # fmt: skip
        ax.plot([0, 1], [0, 1], ":", color="grey", linewidth=1)
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate",
               ylabel="true positive rate")  # fmt: skip
        ax.set_title(f"{name}\n{_rule(p)}", fontsize=9)
        ax.legend(fontsize=7, title="positive class (dot: decision)", title_fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def pr_figure(preds: dict[str, Predictions], class_names: Sequence[str]) -> Figure:
    """Precision-recall curves of every class (one-vs-rest) per model, operating point marked;
    the dotted line of each class is its prevalence (a random classifier's precision)."""
    fig, axes = _panels(len(preds), cols=len(preds))
    for ax, (name, p) in zip(axes, preds.items()):
        for cls, cname in enumerate(class_names):
            positive = p.labels == cls
            if positive.all() or not positive.any():
                continue
            _, (recall, precision) = _curve_points(p.probs[:, cls], positive)
            line = ax.plot(recall, precision, label=cname)[0]
            ax.axhline(positive.mean(), color=line.get_color(), linestyle=":", linewidth=1)
            _, op_recall, op_precision = _operating_point(p, cls)
            if np.isfinite(op_precision):
                ax.plot([op_recall], [op_precision], "o", color=line.get_color(), markersize=8,
                        markeredgecolor="black")  # fmt: skip
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="recall", ylabel="precision")
        ax.set_title(f"{name}\n{_rule(p)}", fontsize=9)
        ax.legend(fontsize=7, title="class (dot: decision)", title_fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def expected_calibration_error(p: Predictions, bins: int = 10) -> tuple[float, list[dict]]:
    """Top-label calibration: the probability of the argmax class binned into `bins` equal
    bins against the fraction of those images classified correctly by argmax; ECE is the
    image-weighted mean gap."""
    confidence = p.probs.max(axis=1)
    correct = p.probs.argmax(axis=1) == p.labels
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        inside = which == b
        if not inside.any():
            continue
        conf, acc = float(confidence[inside].mean()), float(correct[inside].mean())
        ece += inside.mean() * abs(conf - acc)
        table.append({"lo": edges[b], "hi": edges[b + 1], "n": int(inside.sum()),
                      "confidence": conf, "accuracy": acc})  # fmt: skip
    return float(ece), table


def reliability_figure(preds: dict[str, Predictions], bins: int = 10) -> Figure:
    """Reliability diagram per model: accuracy against confidence per bin (bars; the
    diagonal is perfect calibration), image counts above the bars, ECE in the title."""
    fig, axes = _panels(len(preds), cols=len(preds))
    for ax, (name, p) in zip(axes, preds.items()):
        ece, table = expected_calibration_error(p, bins)
        width = 1.0 / bins
        for row in table:
            ax.bar(row["lo"], row["accuracy"], width=width, align="edge", color="tab:blue",
                   edgecolor="black", alpha=0.8)  # fmt: skip
            ax.text(row["lo"] + width / 2, min(row["accuracy"] + 0.02, 0.95), str(row["n"]),
                    ha="center", fontsize=6)  # fmt: skip
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="confidence (top-class probability)",
               ylabel="accuracy")  # fmt: skip
        ax.set_title(f"{name}\nECE {ece:.3f}", fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def mistakes_figure(
    images: np.ndarray, true: Sequence[str], predicted: Sequence[str], prob: Sequence[float],
    title: str = "", cols: int = 8,
) -> Figure:  # fmt: skip
    """A grid of images (N x H x W x 3, 0-255) captioned with the true class, the predicted
    class and the probability the model gave it."""
    fig, axes = _panels(len(images), cols=cols, width=1.55, height=1.85)
    for ax, image, t, pred, pr in zip(axes, images, true, predicted, prob):
        ax.imshow(np.clip(image, 0, 255).astype("uint8"))
        ax.set_title(f"true {t}\nsaid {pred} {pr:.2f}", fontsize=7)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- deployment and sweeps


def deployment_figure(rows: list[dict]) -> Figure:
    """Balanced accuracy against p50 latency and against size, one point per (model, format)
    row of a benchmark (rows without latency or accuracy are left out of that panel)."""
    fig, axes = _panels(2, cols=2, width=4.6, height=3.4)
    for ax, (key, label) in zip(axes, (("p50_ms", "p50 latency at batch 1 (ms)"),
                                       ("size_mb", "size on disk (MB)"))):  # fmt: skip
        for row in rows:
            x, y = row.get(key), row.get("balanced_accuracy")
            if x is None or y is None:
                continue
            marker = "s" if row["model"] == "teacher" else "o"
            ax.plot([x], [y], marker, markersize=8, label=f"{row['model']} {row['format']}")
            ax.annotate(f"{row['model']} {row['format']}", (x, y), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")  # fmt: skip
        ax.set(xlabel=label, ylabel="test balanced accuracy")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def seed_spread_figure(runs: pd.DataFrame, metrics: Sequence[tuple[str, str]]) -> Figure:
    """Per sweep cell, every seed's value of each metric (dots) and their mean (bar), one
    panel per `(column, title)` in `metrics`."""
    names = list(dict.fromkeys(runs["name"]))
    fig, axes = _panels(len(metrics), cols=len(metrics), width=max(4.0, 0.55 * len(names) + 2),
                        height=3.6)  # fmt: skip
    for ax, (column, title) in zip(axes, metrics):
        for i, name in enumerate(names):
            values = runs.loc[runs["name"] == name, column].astype("float64").dropna()
            if values.empty:
                continue
            ax.bar(i, values.mean(), color="lightsteelblue", edgecolor="grey")
            ax.plot(np.full(len(values), i), values, "o", color="black", markersize=4)
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=7)
        finite = runs[column].astype("float64").dropna()
        if not finite.empty:
            lo = max(0.0, float(finite.min()) - 0.05)
            ax.set_ylim(lo, min(1.0, float(finite.max()) + 0.03))
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig
