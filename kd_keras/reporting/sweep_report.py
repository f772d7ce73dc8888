"""Sweep results: per-cell summaries over seeds, paired verdicts against scratch, the
markdown tables, the heatmap and the `results.html` page."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from kd_keras.config import Config
from kd_keras.evaluation.verdict import (
    VERDICT_HEAD,
    VERDICT_METRICS,
    difference_text,
    interval_text,
    method_line,
    paired_difference,
    verdict_rows,
)
from kd_keras.io import atomic_write, write_text
from kd_keras.reporting.figures import seed_spread_figure
from kd_keras.reporting.html import figure_html, img_html, markdown_html, note_html, page_html
from kd_keras.text import fmt

SPREAD_METRICS = (("val_bal_acc", "validation balanced accuracy"),
                  ("test_bal_acc", "test balanced accuracy"),
                  ("subset_bal_acc", "imbalanced subset balanced accuracy"))  # fmt: skip


def sweep_report_html(
    title: str, results_md: str, ablation_md: str, heatmap: Path | None, runs: pd.DataFrame
) -> str:
    """The HTML of a sweep: the per-cell table (mean ± std over seeds), the ablation, the
    temperature x alpha heatmaps and every seed's value per cell."""
    heat = (img_html(heatmap.read_bytes(), "temperature x alpha heatmaps",
                     "each square: the best cell on validation among the other grid keys")
            if heatmap is not None and heatmap.is_file()
            else note_html("no heatmap: the grid does not vary both distill.temperature and "
                           "distill.alpha"))  # fmt: skip
    metrics = [(c, t) for c, t in SPREAD_METRICS if c in runs and runs[c].notna().any()]
    spread = (figure_html(lambda: seed_spread_figure(runs, metrics), "per-cell spread over seeds",
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


def run_row(name: str, setting: dict, seed: int, report: dict, model: str) -> dict:
    """One trained run as a flat row: cell name, grid values, seed and its metrics."""
    row = {"name": name, **setting, "seed": seed}
    for label, split, metric in METRICS:
        row[label] = _value(report, model, split, metric)
    row["val_auc"] = _value(report, model, "val", "roc_auc")
    minority = report.get("subset", {}).get("minority_class")
    row["subset_minority_recall"] = None
    if minority is not None and model in report["models"]:
        cname = report["class_names"][minority]
        row["subset_minority_recall"] = report["models"][model]["test_subset"]["per_class"][cname][
            "recall"
        ]
    row["setting"] = setting
    return row


def summarize(runs: list[dict]) -> list[dict]:
    """Per cell: the number of seeds, (mean, sample std) of every metric (pandas, ddof=1;
    the std of a single seed is undefined: NaN) and the paired gain over scratch."""
    frame = pd.DataFrame([{k: r[k] for k in ("name", "seed", *LABELS)} for r in runs])
    frame[LABELS] = frame[LABELS].astype("float64")
    grouped = frame.groupby("name", sort=False)
    means, stds, counts = grouped[LABELS].mean(), grouped[LABELS].std(ddof=1), grouped.size()
    settings = {r["name"]: r["setting"] for r in runs}
    rows = []
    for name in means.index:
        row = {"name": name, "setting": settings[name], "seeds": int(counts[name])}
        row.update({lab: (float(means.at[name, lab]), float(stds.at[name, lab]))
                    for lab in LABELS})  # fmt: skip
        rows.append(row)
    return add_verdicts(add_paired_gain(rows, runs), runs)


def add_paired_gain(rows: list[dict], runs: list[dict], metric: str = "test_bal_acc") -> list[dict]:
    """Give each grid cell `gain`: (mean, sample std) over seeds of its `metric` minus the
    scratch student's of the same seed. Same seed = same data order and initial student, so
    the paired difference is the comparison the noise between seeds does not blur."""
    scratch = {r["seed"]: r[metric] for r in runs if r["name"] == "student_scratch"}
    for row in rows:
        diffs = [r[metric] - scratch[r["seed"]] for r in runs
                 if r["name"] == row["name"] and row["setting"] and r["seed"] in scratch
                 and r[metric] is not None and scratch[r["seed"]] is not None]  # fmt: skip
        row["gain"] = (
            (float(np.mean(diffs)), float(np.std(diffs, ddof=1)) if len(diffs) > 1 else np.nan)
            if diffs else (np.nan, np.nan)
        )  # fmt: skip
    return rows


def add_verdicts(rows: list[dict], runs: list[dict], confidence: float = 0.95) -> list[dict]:
    """Give each grid cell `paired`: {metric: `PairedDifference` of the cell against the
    scratch student, paired by seed} for the validation and test balanced accuracy and AUC
    (seeds where either value is missing are left out). Baselines get an empty dict."""
    scratch = {key: {r["seed"]: r.get(key) for r in runs if r["name"] == "student_scratch"}
               for key in PAIRED}  # fmt: skip
    for row in rows:
        row["paired"] = {}
        if not row["setting"]:
            continue
        for key in PAIRED:
            pairs = [(r[key], scratch[key][r["seed"]]) for r in runs
                     if r["name"] == row["name"] and r.get(key) is not None
                     and scratch[key].get(r["seed"]) is not None]  # fmt: skip
            row["paired"][key] = paired_difference([a for a, _ in pairs], [b for _, b in pairs],
                                                   confidence)  # fmt: skip
    return rows


def verdict_markdown(rows: list[dict], heading: str = "##") -> str:
    """The verdict section: per grid cell against scratch (paired by seed), the validation
    and test differences of balanced accuracy and AUC, the test 95% CI and a verdict."""
    lines = [f"{heading} Verdict: each cell against the scratch student, paired by seed", "",
             *VERDICT_HEAD]  # fmt: skip
    cells = [row for row in rows if row.get("paired")]
    for row in cells:
        lines += verdict_rows(row["name"], row["paired"])
    chance = (f"{len(cells)} cells, each tested at 95%: about {len(cells) / 20:.1f} verdict(s) "
              "other than 'cannot tell' per metric are expected by chance alone when no cell "
              "differs from scratch; read the cells the ablation selects on "
              "validation.")  # fmt: skip
    return "\n".join(lines + ["", method_line(), "", chance]) + "\n"


def _verdict_columns(row: dict) -> dict:
    """results.csv columns of a cell's paired comparisons with scratch (empty for baselines)."""
    out = {}
    for key in PAIRED:
        d = row.get("paired", {}).get(key)
        for stat in ("n", "mean", "std", "low", "high"):
            out[f"{key}_diff_{stat}"] = getattr(d, stat) if d is not None else np.nan
        if key.startswith("test_"):
            out[f"{key}_verdict"] = d.verdict if d is not None else ""
            out[f"{key}_seeds_needed"] = d.seeds_needed if d is not None else None
    return out


def validation_test_rank_correlation(rows: list[dict]) -> tuple[float, int]:
    """Spearman rank correlation, across grid cells, of mean validation and mean test
    balanced accuracy, and the number of cells: does validation rank the cells as test does?
    NaN under three cells or when either side is constant."""
    pairs = [(r["val_bal_acc"][0], r["test_bal_acc"][0]) for r in rows if r["setting"]]
    pairs = [(v, t) for v, t in pairs if not (np.isnan(v) or np.isnan(t))]
    frame = pd.DataFrame(pairs, columns=["val", "test"])
    if len(pairs) < 3 or frame.nunique().min() < 2:
        return float("nan"), len(pairs)
    return float(frame["val"].corr(frame["test"], method="spearman")), len(pairs)


def mean_std(stat, signed: bool = False) -> str:
    mean, std = stat
    if np.isnan(mean):
        return "n/a"
    text = fmt(mean, signed=signed)
    return text if np.isnan(std) else f"{text} ± {fmt(std)}"


def write_results(
    root: Path, runs: list[dict], rows: list[dict], keys: list[str], base: Config
) -> None:
    """runs.csv (per run), results.csv / results.md (per cell), ablation.md, heatmap.png,
    results.html."""
    per_run = pd.DataFrame([{k: v for k, v in r.items() if k != "setting"} for r in runs])
    write_text(root / "runs.csv", per_run.to_csv(index=False, float_format="%.4f"))
    table = pd.DataFrame(
        [{"name": r["name"], **{k: r["setting"].get(k, "") for k in keys}, "seeds": r["seeds"],
          **{f"{lab}_{stat}": r[lab][i] for lab in (*LABELS, "gain")
             for i, stat in enumerate(("mean", "std"))}, **_verdict_columns(r)} for r in rows]
    )  # fmt: skip
    write_text(root / "results.csv", table.to_csv(index=False, float_format="%.4f"))

    head = "| run | seeds | " + " | ".join(LABELS) + " | test_bal_acc − scratch (paired) |"
    lines = [f"# Sweep `{base.run.name}` (mean ± sample std over seeds)", "", head,
             "|---|---|" + "---|" * (len(LABELS) + 1)]  # fmt: skip
    lines += [f"| {r['name']} | {r['seeds']} | " + " | ".join(mean_std(r[lab]) for lab in LABELS)
              + f" | {mean_std(r['gain'], signed=True) if r['setting'] else '—'} |"
              for r in rows]  # fmt: skip
    lines += ["", rank_correlation_line(rows), "", verdict_markdown(rows).rstrip("\n")]
    write_text(root / "results.md", "\n".join(lines) + "\n")
    ablation = ablation_markdown(rows, base)
    write_text(root / "ablation.md", ablation)
    heat = None
    if {"distill.temperature", "distill.alpha"} <= set(keys):
        heat = root / "heatmap.png"
        heatmap(heat, rows)

    page = sweep_report_html(f"kd_keras sweep {base.run.name}", "\n".join(lines),
                             ablation, heat, per_run)  # fmt: skip
    write_text(root / "results.html", page)


def _best(rows: list[dict], keep) -> dict | None:
    """The row with the best mean validation balanced accuracy among those `keep` accepts."""
    pool = [r for r in rows if r["setting"] and keep(r["setting"])]
    return max(pool, key=lambda r: r["val_bal_acc"][0]) if pool else None


def ablation_markdown(rows: list[dict], base: Config) -> str:
    """The teacher, the scratch student and, per variant (logits only or with features, KD
    mode, feature loss), the cell validation selects; a variant no cell has is left out. A key
    that is not a grid axis has the base config's value in every cell."""

    def value(setting: dict, key: str):
        return setting.get(key, getattr(base.distill, key.removeprefix("distill.")))

    def features(setting: dict) -> bool:
        return value(setting, "distill.beta") > 0

    by_name = {r["name"]: r for r in rows}
    entries = [("teacher", by_name.get("teacher")),
               ("student from scratch", by_name.get("student_scratch"))]  # fmt: skip
    entries += [
        ("KD, logits only (beta = 0)", _best(rows, lambda s: not features(s))),
        ("KD, logits + features (beta > 0)", _best(rows, features)),
        ("KD, soft", _best(rows, lambda s: value(s, "distill.mode") == "soft")),
        ("KD, hard", _best(rows, lambda s: value(s, "distill.mode") == "hard")),
        ("Decoupled KD", _best(rows, lambda s: value(s, "distill.mode") == "dkd")),
        ("features: FitNet (adapter + L2)",
         _best(rows, lambda s: features(s) and value(s, "distill.feature_loss") == "fitnet")),
        ("features: attention transfer",
         _best(rows, lambda s: features(s) and value(s, "distill.feature_loss") == "attention")),
    ]  # fmt: skip
    lines = ["# Ablation (each KD row: the cell with the best validation balanced accuracy)", "",
             "| variant | selected cell | val bal. acc. | test bal. acc. | test acc. | test AUC "
             "| test bal. acc. − scratch, paired by seed | its 95% CI | verdict "
             "| test AUC − scratch, paired | its 95% CI | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for label, row in entries:
        if row is None:
            continue
        gain = mean_std(row["gain"], signed=True) if row["setting"] else "—"
        paired = row.get("paired", {})
        bal, auc = paired.get("test_bal_acc"), paired.get("test_auc")
        lines.append(f"| {label} | {row['name']} | {mean_std(row['val_bal_acc'])} | "
                     f"{mean_std(row['test_bal_acc'])} | {mean_std(row['test_acc'])} | "
                     f"{mean_std(row['test_auc'])} | {gain} | {_verdict_cells(bal)} | "
                     f"{_verdict_cells(auc, with_difference=True)} |")  # fmt: skip
    note = method_line(unit="fractions, as the rest of this table")
    return "\n".join(lines + ["", rank_correlation_line(rows), "", note]) + "\n"


def _verdict_cells(d, with_difference: bool = False) -> str:
    """Ablation cells of one paired comparison, as fractions like the rest of its table: (the
    difference,) its 95% CI and the verdict; dashes for the baselines, which have none."""
    unit = dict(scale=1.0, digits=3)
    none = d is None or d.n == 0
    cells = ["—", "—"] if none else [interval_text(d, **unit), d.verdict_line()]
    if with_difference:
        cells.insert(0, "—" if none else difference_text(d, **unit))
    return " | ".join(cells)


def rank_correlation_line(rows: list[dict]) -> str:
    """One sentence: how well the cells' validation ranking predicts their test ranking."""
    rho, cells = validation_test_rank_correlation(rows)
    if np.isnan(rho):
        return (f"Validation vs test rank correlation: not defined ({cells} cell(s); it needs "
                "three or more with differing values).")  # fmt: skip
    return (f"Validation vs test rank correlation over the {cells} cells (Spearman, mean "
            f"balanced accuracy): {rho:.2f}.")  # fmt: skip


def heatmap(path: Path, rows: list[dict]) -> None:
    """Temperature x alpha; each square shows the cell best on validation among other keys."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, no figure registry

    cells = [r for r in rows if "distill.temperature" in r["setting"]]
    temps = sorted({r["setting"]["distill.temperature"] for r in cells})
    alphas = sorted({r["setting"]["distill.alpha"] for r in cells})
    fig = Figure(figsize=(4 + 1.2 * len(temps) * 2, 1.0 * len(alphas) + 2.5))
    axes = fig.subplots(1, 2)
    for ax, (label, title) in zip(axes, (("val_bal_acc", "validation"), ("test_bal_acc", "test"))):
        grid = np.full((len(alphas), len(temps)), np.nan)
        for i, a in enumerate(alphas):
            for j, t in enumerate(temps):
                best = _best(cells, lambda s, a=a, t=t: s["distill.alpha"] == a
                             and s["distill.temperature"] == t)  # fmt: skip
                if best is not None:
                    grid[i, j] = best[label][0]
        im = ax.imshow(grid, cmap="viridis", origin="lower")
        ax.set_xticks(range(len(temps)), [str(t) for t in temps])
        ax.set_yticks(range(len(alphas)), [str(a) for a in alphas])
        ax.set_xlabel("temperature")
        ax.set_ylabel("alpha")
        ax.set_title(f"balanced accuracy ({title})")
        for i in range(len(alphas)):
            for j in range(len(temps)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", color="w")
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100))


METRICS = (
    ("val_bal_acc", "val", "balanced_accuracy"),
    ("test_bal_acc", "test", "balanced_accuracy"),
    ("test_acc", "test", "accuracy"),
    ("test_auc", "test", "roc_auc"),
    ("subset_bal_acc", "test_subset", "balanced_accuracy"),
)


LABELS = [m[0] for m in METRICS] + ["subset_minority_recall"]


# compared per cell against scratch by `add_verdicts` (not summarised per cell)
PAIRED = tuple(key for _, val, test in VERDICT_METRICS for key in (val, test))


def _value(report: dict, model: str, split: str, metric: str):
    entry = report["models"].get(model, {}).get(split)
    return None if entry is None else entry[metric]
