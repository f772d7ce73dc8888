"""The HTML report of a run (`report.html`; a sweep's `results.html` is
`kd_keras.reporting.sweep_report`).

Each report is one self-contained file: figures are inlined as base64 PNG, there are no scripts, no
fonts and no links outside the page, so it opens offline and can be mailed around.

The run report only reads what is already saved (through `RunFolder`): `config.toml`,
`report.json`, `history_<stage>.csv`, `train_log.json`, `confusion_<model>.png`,
`predictions_<model>.npz`, and from the export folder `export.json` and `benchmark.json`. No
model is run. The grid of mistakes shows the run's own test images, read from its data source.
Anything optional that is missing (no export yet, an old run without predictions) leaves its
section out with a note saying how to get it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from kd_keras.data.pipeline import make_dataset
from kd_keras.errors import KDError
from kd_keras.evaluation.evaluate import report_markdown
from kd_keras.evaluation.predictions import Predictions, load_predictions
from kd_keras.host import host_line
from kd_keras.io import read_json, write_text
from kd_keras.prog import command
from kd_keras.reporting.figures import (
    deployment_figure,
    mistakes_figure,
    pr_figure,
    reliability_figure,
    roc_figure,
    training_curves,
)
from kd_keras.reporting.html import esc, figure_html, img_html, markdown_html, note_html, page_html
from kd_keras.run.files import MODEL_STAGES
from kd_keras.run.folder import RunFolder
from kd_keras.text import fmt, md_table

# ---------------------------------------------------------------- run report sections


def _config_section(run: RunFolder) -> str:
    return f"<pre>{esc(run.config_path.read_text(encoding='utf-8'))}</pre>"


def _evaluated(report: dict) -> bool:
    """True when report.json holds test metrics (a run folder may hold a bare one)."""
    return any("test" in entry for entry in report.get("models", {}).values())


def _summary_section(report: dict) -> str:
    if not _evaluated(report):
        return note_html(f"no report.json with metrics yet — run `{command('evaluate')}`")
    return markdown_html(report_markdown(report))


def _training_section(run: RunFolder) -> str:
    log, monitor = run.train_log(), run.cfg.train.monitor
    parts = []
    for stage, model in ((s, m) for m, s in MODEL_STAGES.items()):
        path = run.history_path(stage)
        if not path.is_file():
            continue
        history = pd.read_csv(path)
        if history.empty:
            continue
        entry = log.get(stage, {})
        best = entry.get("best_epoch")
        title = f"stage {stage} ({LABELS[model]})"
        if best is not None:
            title += f": epoch {best} of {len(history)} kept (best {monitor})"
        parts.append(f"<h3>{esc(title)}</h3>")
        parts.append(figure_html(
            lambda h=history, b=best: training_curves(h, b, monitor),
            f"training curves of stage {stage}",
            "solid: training (per batch, averaged over the epoch); dashed: validation (the "
            "classifier alone, after the epoch); dotted red line: the selected epoch",
        ))  # fmt: skip
    if not parts:
        return note_html("no `history_<stage>.csv` in this run (the models were not trained "
                         f"by `{command('distill')}`)")  # fmt: skip
    return "\n".join(parts)


def _predictions(run: RunFolder, report: dict) -> dict[str, Predictions]:
    names = [n for n in MODEL_STAGES if "test" in report.get("models", {}).get(n, {})]
    return {n: load_predictions(run.predictions_path(n)) for n in names
            if run.predictions_path(n).is_file()}  # fmt: skip


def _evaluation_section(run: RunFolder, report: dict, preds: dict[str, Predictions]) -> str:
    split = report.get("split", "test")
    parts = []
    confusions = [
        img_html(run.confusion_path(n, ".png").read_bytes(), f"confusion matrix of {n}",
                 f"{LABELS[n]} (rows: true, columns: predicted)")
        for n in MODEL_STAGES if run.confusion_path(n, ".png").is_file()
    ]  # fmt: skip
    if confusions:
        parts += ["<h3>Confusion matrices</h3>", '<div class="row">', *confusions, "</div>"]
    if not preds:
        parts.append(
            note_html(
                "no `predictions_<model>.npz` in this run (evaluated before "
                f"they were saved): run `{command(f'evaluate --run {run.path}')}` for ROC, "
                "precision-recall and calibration"
            )
        )
        return "\n".join(parts)  # fmt: skip
    names = report["class_names"]
    labelled = {LABELS[n]: p for n, p in preds.items()}
    parts += [
        f"<h3>ROC curves ({esc(split)} split)</h3>",
        figure_html(lambda: roc_figure(labelled, names), "ROC curves",
                "dot: the model's actual decisions (threshold chosen on validation, or argmax)"),
        f"<h3>Precision–recall curves ({esc(split)} split)</h3>",
        figure_html(lambda: pr_figure(labelled, names), "precision-recall curves",
                "dotted: each class's prevalence (the precision of guessing); dot: decisions"),
        f"<h3>Calibration ({esc(split)} split)</h3>",
        figure_html(lambda: reliability_figure(labelled), "reliability diagrams",
                "bars: accuracy of the images whose top-class probability falls in the bin "
                "(count above); on the diagonal the probabilities mean what they say"),
    ]  # fmt: skip
    return "\n".join(parts)


def _mistake_images(run: RunFolder, split: str, index: np.ndarray) -> np.ndarray:
    """The images at `index` of the run's evaluated split, as the models saw them."""
    splits = run.load_splits()
    part = (splits.test if split == "test" else splits.val).subset(index)
    ds = make_dataset(part, run.cfg.data.image_size, 64, labels=False, cache=False)
    return np.concatenate(list(ds.as_numpy_iterator()))


def _mistakes_section(run: RunFolder, report: dict, preds: dict[str, Predictions]) -> str:
    if not preds:
        return note_html("needs `predictions_<model>.npz` (see above)")
    names, split = report["class_names"], report.get("split", "test")
    parts = []
    for name, p in preds.items():
        wrong = np.flatnonzero(p.predicted != p.labels)
        if not len(wrong):
            parts.append(f"<h3>{esc(LABELS[name])}</h3>" + note_html("no mistakes"))
            continue
        said = p.probs[wrong, p.predicted[wrong]]
        shown = wrong[np.argsort(-said, kind="stable")][:MAX_MISTAKES]
        try:
            images = _mistake_images(run, split, shown)
        except (KDError, OSError) as err:
            return note_html(f"the run's test images could not be read: {err}")
        title = f"{LABELS[name]}: {len(wrong)} of {len(p.labels)} {split} images wrong" + (
            f"; the {len(shown)} most confident shown" if len(shown) < len(wrong) else ""
        )
        parts.append(f"<h3>{esc(title)}</h3>")
        parts.append(figure_html(
            lambda i=images, s=shown, p=p: mistakes_figure(
                i, [names[k] for k in p.labels[s]], [names[k] for k in p.predicted[s]],
                p.probs[s, p.predicted[s]]),
            f"test images {name} got wrong",
            "caption: true class; the class the model said and the probability it gave it",
        ))  # fmt: skip
    return "\n".join(parts)


def _read_optional(path: Path) -> dict | None:
    try:
        return read_json(path) if path.is_file() else None
    except KDError:
        return None


def export_table_markdown(export: dict) -> str:
    """Per exported file: its check against Keras and its test metrics (markdown)."""
    lines = ["| file | format | size (MB) | check vs Keras | accuracy | balanced acc. | ROC AUC |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for entry in export.get("artefacts", {}).values():
        m = entry.get("metrics", {})
        if "parity" in entry:
            check = f"{entry['parity']['status']} (max Δ {entry['parity']['max_abs_diff']:.1e})"
        else:
            check = f"agrees {entry.get('vs_keras', {}).get('argmax_agreement', 0):.1%}"
        kind = entry.get("quantization", {}).get("method", "fp32")
        kind = "fp32" if "parity" in entry else f"int8 {kind}"
        lines.append(f"| {entry['file']} | {kind} | {fmt(entry.get('size_mb'), 1)} | {check} | "
                     f"{fmt(m.get('accuracy'))} | {fmt(m.get('balanced_accuracy'))} | "
                     f"{fmt(m.get('roc_auc'))} |")  # fmt: skip
    return "\n".join(lines)


def benchmark_table_markdown(bench: dict) -> str:
    """Per (model, format): size, latency, throughput and test balanced accuracy (markdown)."""
    header = ["model", "format", "size (MB)", "p50 ms", "p90 ms", "img/s", "balanced acc.", "note"]
    rows = [[r["model"], r["format"], fmt(r.get("size_mb"), 1), fmt(r.get("p50_ms"), 2),
             fmt(r.get("p90_ms"), 2), fmt(r.get("throughput_ips"), 1),
             fmt(r.get("balanced_accuracy")), r.get("note") or ""]
            for r in bench.get("rows", [])]  # fmt: skip
    lines = md_table(header, rows)
    return "\n".join(lines)


def _deployment_section(run: RunFolder, export_dir: str | os.PathLike | None) -> str:
    folder = run.export_dir(export_dir)
    export = _read_optional(run.export_file(export_dir))
    bench = _read_optional(run.benchmark_file(export_dir))
    parts = []
    if export is None:
        parts.append(note_html(f"not exported yet (no {run.export_file(export_dir)}): "
                               f"`{command(f'export --onnx --int8 --run {run.path}')}`, then "
                               f"`{command(f'report --run {run.path}')}`"))  # fmt: skip
    else:
        parts += [f"<h3>Exported files ({esc(folder)}, {export.get('n_images', '?')} test "
                  "images)</h3>", markdown_html(export_table_markdown(export))]  # fmt: skip
    if bench is None:
        parts.append(note_html(f"not benchmarked yet (no {run.benchmark_file(export_dir)}): "
                               f"`{command(f'benchmark --run {run.path}')}`, then "
                               f"`{command(f'report --run {run.path}')}`"))  # fmt: skip
        return "\n".join(parts)
    parts += [f"<h3>{esc(bench.get('title', 'Benchmark'))}</h3>",
              note_html(bench.get("machine", "")),
              markdown_html(benchmark_table_markdown(bench))]  # fmt: skip
    rows = [r for r in bench.get("rows", []) if r.get("balanced_accuracy") is not None]
    if rows:
        parts.append(
            figure_html(
                lambda: deployment_figure(rows),
                "accuracy vs latency and size",
                "each point a model in one format; up and left is better",
            )
        )
    return "\n".join(parts)


# ---------------------------------------------------------------- run report


def run_report_html(run: RunFolder, export_dir: str | os.PathLike | None = None) -> str:
    """The HTML of a run's report (see the module docstring for what it reads)."""
    report = run.report
    preds = _predictions(run, report)
    subtitle = (
        f"Run folder `{run.path}`; {report.get('test_size', '?')} {report.get('split', 'test')} "
        f"images at {report.get('image_size', run.cfg.data.image_size)} px; decision rule: "
        f"{report.get('decision_rule', '?')}. Written {time.strftime('%Y-%m-%d %H:%M')}."
    )
    hosts = {}  # a resumed run may have trained its stages on different machines
    for stage, entry in run.train_log().items():
        if isinstance(entry, dict) and isinstance(entry.get("host"), dict):
            hosts.setdefault(host_line(entry["host"]), []).append(stage)
    for line, stages in hosts.items():
        subtitle += f" Stage {', '.join(stages)} trained on {line}."
    sections = [
        ("summary", "Results", _summary_section(report)),
        ("training", "Training curves", _training_section(run)),
        ("evaluation", "Teacher, distilled and scratch side by side",
         _evaluation_section(run, report, preds) if _evaluated(report) else
         note_html("not evaluated yet")),
        ("mistakes", "Test images each model got wrong",
         _mistakes_section(run, report, preds) if _evaluated(report) else
         note_html("not evaluated yet")),
        ("deployment", "Exported formats: accuracy, latency and size",
         _deployment_section(run, export_dir)),
        ("config", "Config", _config_section(run)),
    ]  # fmt: skip
    return page_html(f"kd_keras run {run.name}", subtitle, sections)


def write_run_report(
    run: RunFolder | str | os.PathLike, export_dir: str | os.PathLike | None = None
) -> Path:
    """Write `report.html` into the run folder (atomically) and return its path.

    Args:
        run: a run folder.
        export_dir: parent of the run's export folder (default `export.dir`, else `export`),
            for the deployment section.
    """
    run = run if isinstance(run, RunFolder) else RunFolder.find(run)
    return write_text(run.report_html_path, run_report_html(run, export_dir))


# ---------------------------------------------------------------- sweep report


MAX_MISTAKES = 24  # per model, the most confident ones first


LABELS = {"teacher": "teacher", "student": "distilled student",
          "student_scratch": "student from scratch"}  # fmt: skip
