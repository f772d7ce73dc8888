"""HTML reports a person can look at: `report.html` of a run, `results.html` of a sweep.

Each is one self-contained file: figures are inlined as base64 PNG, there are no scripts, no
fonts and no links outside the page, so it opens offline and can be mailed around.

The run report only reads what is already saved (through `RunFolder`): `config.toml`,
`report.json`, `history_<stage>.csv`, `train_log.json`, `confusion_<model>.png`,
`predictions_<model>.npz`, and from the export folder `export.json` and `benchmark.json`. No
model is run. The grid of mistakes shows the run's own test images, read from its data source.
Anything optional that is missing (no export yet, an old run without predictions) leaves its
section out with a note saying how to get it.
"""

from __future__ import annotations

import base64
import html
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from kd_keras.errors import KDError, read_json, write_text
from kd_keras.evaluate import Predictions, evaluate_run, load_predictions, report_markdown
from kd_keras.host import host_line
from kd_keras.run import MODEL_STAGES, RunFolder

MAX_MISTAKES = 24  # per model, the most confident ones first
LABELS = {"teacher": "teacher", "student": "distilled student",
          "student_scratch": "student from scratch"}  # fmt: skip

CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 0 auto;
       max-width: 1400px; padding: 0 24px 48px; color: #1d1d1f; }
header { border-bottom: 2px solid #ddd; margin-bottom: 8px; }
nav a { margin-right: 14px; }
section { border-bottom: 1px solid #eee; padding-bottom: 12px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f4f4f6; }
pre { background: #f7f7f9; padding: 10px; overflow-x: auto; font-size: 13px; }
img { max-width: 100%; height: auto; }
figure { margin: 8px 0; }
figcaption, .note { color: #555; font-size: 13px; }
.row { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
.row figure { flex: 0 1 auto; }
.row img { max-width: 340px; }
"""


# ---------------------------------------------------------------- HTML pieces


def esc(text: object) -> str:
    """HTML-escaped text."""
    return html.escape(str(text), quote=True)


def _inline(text: str) -> str:
    text = esc(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


def _table_html(lines: list[str]) -> str:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    rows = [r for r in rows if not all(re.fullmatch(r":?-{3,}:?", c) for c in r)]
    head, body = rows[0], rows[1:]
    out = ["<table>", "<tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body]
    return "\n".join(out + ["</table>"])


def markdown_html(md: str, heading_offset: int = 2) -> str:
    """The markdown our reports write (headings, pipe tables, bullets, paragraphs, `code`,
    **bold**) as HTML; `#` becomes `<h{1 + heading_offset}>`."""
    out: list[str] = []
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append(lines[i])
                i += 1
            out.append(_table_html(block))
            continue
        if line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        match = re.match(r"(#+) (.*)", line)
        if match:
            level = min(6, len(match.group(1)) + heading_offset)
            out.append(f"<h{level}>{_inline(match.group(2))}</h{level}>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    return "\n".join(out)


def img_html(png: bytes, alt: str, caption: str | None = None) -> str:
    """A PNG inlined as a base64 data URI, in a `<figure>` with an optional caption."""
    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{esc(alt)}" src="data:image/png;base64,{data}">{cap}</figure>'


def note_html(text: str) -> str:
    """A grey note (why a part is missing, how to get it)."""
    return f'<p class="note">{_inline(text)}</p>'


def page_html(title: str, subtitle: str, sections: list[tuple[str, str, str]]) -> str:
    """A whole page: `sections` are `(id, title, body html)`, listed in the navigation."""
    nav = " ".join(f'<a href="#{sid}">{esc(stitle)}</a>' for sid, stitle, _ in sections)
    body = "\n".join(
        f'<section id="{sid}"><h2>{esc(stitle)}</h2>\n{content}\n</section>'
        for sid, stitle, content in sections
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>\n"
        f'<header><h1>{esc(title)}</h1><p class="note">{_inline(subtitle)}</p>'
        f"<nav>{nav}</nav></header>\n{body}\n</body></html>\n"
    )


def _figure(build: Callable[[], object], alt: str, caption: str | None = None) -> str:
    from kd_keras.figures import png_bytes

    return img_html(png_bytes(build()), alt, caption)


# ---------------------------------------------------------------- run report sections


def _config_section(run: RunFolder) -> str:
    return f"<pre>{esc(run.config_path.read_text(encoding='utf-8'))}</pre>"


def _evaluated(report: dict) -> bool:
    """True when report.json holds test metrics (a run folder may hold a bare one)."""
    return any("test" in entry for entry in report.get("models", {}).values())


def _summary_section(report: dict) -> str:
    if not _evaluated(report):
        return note_html("no report.json with metrics yet — run `python cli.py evaluate`")
    return markdown_html(report_markdown(report))


def _training_section(run: RunFolder) -> str:
    from kd_keras.figures import training_curves

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
        parts.append(_figure(
            lambda h=history, b=best: training_curves(h, b, monitor),
            f"training curves of stage {stage}",
            "solid: training (per batch, averaged over the epoch); dashed: validation (the "
            "classifier alone, after the epoch); dotted red line: the selected epoch",
        ))  # fmt: skip
    if not parts:
        return note_html("no `history_<stage>.csv` in this run (the models were not trained "
                         "by `cli.py distill`)")  # fmt: skip
    return "\n".join(parts)


def _predictions(run: RunFolder, report: dict) -> dict[str, Predictions]:
    names = [n for n in MODEL_STAGES if "test" in report.get("models", {}).get(n, {})]
    return {n: load_predictions(run.predictions_path(n)) for n in names
            if run.predictions_path(n).is_file()}  # fmt: skip


def _evaluation_section(run: RunFolder, report: dict, preds: dict[str, Predictions]) -> str:
    from kd_keras.figures import pr_figure, reliability_figure, roc_figure

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
                "they were saved): run `python cli.py evaluate --run "
                f"{run.path}` for ROC, precision-recall and calibration"
            )
        )
        return "\n".join(parts)  # fmt: skip
    names = report["class_names"]
    labelled = {LABELS[n]: p for n, p in preds.items()}
    parts += [
        f"<h3>ROC curves ({esc(split)} split)</h3>",
        _figure(lambda: roc_figure(labelled, names), "ROC curves",
                "dot: the model's actual decisions (threshold chosen on validation, or argmax)"),
        f"<h3>Precision–recall curves ({esc(split)} split)</h3>",
        _figure(lambda: pr_figure(labelled, names), "precision-recall curves",
                "dotted: each class's prevalence (the precision of guessing); dot: decisions"),
        f"<h3>Calibration ({esc(split)} split)</h3>",
        _figure(lambda: reliability_figure(labelled), "reliability diagrams",
                "bars: accuracy of the images whose top-class probability falls in the bin "
                "(count above); on the diagonal the probabilities mean what they say"),
    ]  # fmt: skip
    return "\n".join(parts)


def _mistake_images(run: RunFolder, split: str, index: np.ndarray) -> np.ndarray:
    """The images at `index` of the run's evaluated split, as the models saw them."""
    from kd_keras.data import make_dataset

    splits = run.load_splits()
    part = (splits.test if split == "test" else splits.val).subset(index)
    ds = make_dataset(part, run.cfg.data.image_size, 64, labels=False, cache=False)
    return np.concatenate(list(ds.as_numpy_iterator()))


def _mistakes_section(run: RunFolder, report: dict, preds: dict[str, Predictions]) -> str:
    from kd_keras.figures import mistakes_figure

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
        parts.append(_figure(
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


def _fmt(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


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
        fmt = entry.get("quantization", {}).get("method", "fp32")
        fmt = "fp32" if "parity" in entry else f"int8 {fmt}"
        lines.append(f"| {entry['file']} | {fmt} | {_fmt(entry.get('size_mb'), 1)} | {check} | "
                     f"{_fmt(m.get('accuracy'))} | {_fmt(m.get('balanced_accuracy'))} | "
                     f"{_fmt(m.get('roc_auc'))} |")  # fmt: skip
    return "\n".join(lines)


def benchmark_table_markdown(bench: dict) -> str:
    """Per (model, format): size, latency, throughput and test balanced accuracy (markdown)."""
    lines = ["| model | format | size (MB) | p50 ms | p90 ms | img/s | balanced acc. | note |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in bench.get("rows", []):
        lines.append(f"| {r['model']} | {r['format']} | {_fmt(r.get('size_mb'), 1)} | "
                     f"{_fmt(r.get('p50_ms'), 2)} | {_fmt(r.get('p90_ms'), 2)} | "
                     f"{_fmt(r.get('throughput_ips'), 1)} | {_fmt(r.get('balanced_accuracy'))} "
                     f"| {r.get('note') or ''} |")  # fmt: skip
    return "\n".join(lines)


def _deployment_section(run: RunFolder, export_dir: str | os.PathLike | None) -> str:
    from kd_keras.figures import deployment_figure

    folder = run.export_dir(export_dir)
    export = _read_optional(run.export_file(export_dir))
    bench = _read_optional(run.benchmark_file(export_dir))
    parts = []
    if export is None:
        parts.append(note_html(f"not exported yet (no {run.export_file(export_dir)}): "
                               f"`python cli.py export --onnx --int8 --run {run.path}`, then "
                               f"`python cli.py report --run {run.path}`"))  # fmt: skip
    else:
        parts += [f"<h3>Exported files ({esc(folder)}, {export.get('n_images', '?')} test "
                  "images)</h3>", markdown_html(export_table_markdown(export))]  # fmt: skip
    if bench is None:
        parts.append(note_html(f"not benchmarked yet (no {run.benchmark_file(export_dir)}): "
                               f"`python cli.py benchmark --run {run.path}`, then "
                               f"`python cli.py report --run {run.path}`"))  # fmt: skip
        return "\n".join(parts)
    parts += [f"<h3>{esc(bench.get('title', 'Benchmark'))}</h3>",
              note_html(bench.get("machine", "")),
              markdown_html(benchmark_table_markdown(bench))]  # fmt: skip
    rows = [r for r in bench.get("rows", []) if r.get("balanced_accuracy") is not None]
    if rows:
        parts.append(
            _figure(
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


SPREAD_METRICS = (("val_bal_acc", "validation balanced accuracy"),
                  ("test_bal_acc", "test balanced accuracy"),
                  ("subset_bal_acc", "imbalanced subset balanced accuracy"))  # fmt: skip


def sweep_report_html(
    title: str, results_md: str, ablation_md: str, heatmap: Path | None, runs: pd.DataFrame
) -> str:
    """The HTML of a sweep: the per-cell table (mean ± std over seeds), the ablation, the
    temperature x alpha heatmaps and every seed's value per cell."""
    from kd_keras.figures import seed_spread_figure

    heat = (img_html(heatmap.read_bytes(), "temperature x alpha heatmaps",
                     "each square: the best cell on validation among the other grid keys")
            if heatmap is not None and heatmap.is_file()
            else note_html("no heatmap: the grid does not vary both distill.temperature and "
                           "distill.alpha"))  # fmt: skip
    metrics = [(c, t) for c, t in SPREAD_METRICS if c in runs and runs[c].notna().any()]
    spread = (_figure(lambda: seed_spread_figure(runs, metrics), "per-cell spread over seeds",
                      "dots: one seed each; bars: the mean")
              if metrics and not runs.empty else note_html("no finished runs"))  # fmt: skip
    sections = [
        ("results", "Results per cell", markdown_html(results_md)),
        ("ablation", "Ablation", markdown_html(ablation_md)),
        ("heatmap", "Temperature × alpha (validation and test)", heat),
        ("seeds", "Spread over seeds", spread),
    ]
    subtitle = (f"{runs['seed'].nunique() if 'seed' in runs else 0} seeds; every selection "
                f"on validation. Written {time.strftime('%Y-%m-%d %H:%M')}.")  # fmt: skip
    return page_html(title, subtitle, sections)


def write_report_after_evaluation(run: RunFolder) -> Path | None:
    """`report.html` of a just-evaluated run. The metrics are already saved: a failure here
    is printed as a warning and never fails the evaluation (`cli.py report` retries it)."""
    try:
        return write_run_report(run)
    except Exception as err:  # noqa: BLE001 - the report is a view; the results are saved
        print(f"warning: {run.report_html_path} not written ({type(err).__name__}: {err}); "
              f"retry with `python cli.py report --run {run.path}`")  # fmt: skip
        return None


def evaluate_and_report(run_dir, splits=None) -> dict:
    """`evaluate.evaluate_run`, then the run's `report.html`; returns the report dict."""
    run = run_dir if isinstance(run_dir, RunFolder) else RunFolder.find(run_dir)
    report = evaluate_run(run, splits=splits)
    write_report_after_evaluation(run)
    return report
