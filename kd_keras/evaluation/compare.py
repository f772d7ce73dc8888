"""Compare finished run folders: one model against a baseline, paired by run (= by seed).

Two ways to pair (`python cli.py compare`):

    # the distilled student against the scratch student of the same run, one run per seed
    python cli.py compare runs/xray_seed42 runs/xray_seed43 runs/xray_seed44 --out verdict

    # one group of runs against another, paired by run.seed (e.g. a sweep cell vs scratch)
    python cli.py compare runs/s_sweep/cells/T=4/seed* \\
        --baseline-run runs/s_sweep/scratch/seed42 --baseline-run runs/s_sweep/scratch/seed43

Only each run's `report.json` (and, to pair by seed, `config.toml`) is read; no model is run.
The statistics are `kd_keras.evaluation.verdict.paired_difference` (paired t over seeds, 95%).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from kd_keras.errors import KDError
from kd_keras.evaluation.verdict import (
    VERDICT_HEAD,
    VERDICT_METRICS,
    PairedDifference,
    method_line,
    paired_difference,
    verdict_rows,
)
from kd_keras.io import write_json, write_text
from kd_keras.prog import command
from kd_keras.run.files import MODEL_STAGES
from kd_keras.run.folder import RunFolder

ALIASES = {"scratch": "student_scratch", "distilled": "student"}
# verdict metric key -> (report split, report metric)
REPORT_METRICS = {
    key: (key.split("_", 1)[0], "balanced_accuracy" if key.endswith("bal_acc") else "roc_auc")
    for _, val, test in VERDICT_METRICS
    for key in (val, test)
}


def _model_name(name: str, option: str) -> str:
    name = ALIASES.get(name, name)
    if name not in MODEL_STAGES:
        valid = ", ".join([*MODEL_STAGES, *ALIASES])
        raise KDError(f"{option} {name!r} is not a model of a run; valid: {valid}")
    return name


def _finished(path: str | os.PathLike) -> RunFolder:
    run = RunFolder(path)
    if not run.path.is_dir():
        raise KDError(f"run folder not found: {run.path}")
    if not run.finished:
        raise KDError(f"run folder {run.path} has no report.json: it is not finished "
                      f"(evaluate it with `{command(f'evaluate --run {run.path}')}`)")  # fmt: skip
    return run


def _values(run: RunFolder, model: str) -> dict[str, float | None]:
    report = run.report
    entry = report.get("models", {}).get(model)
    if entry is None:
        held = ", ".join(report.get("models", {})) or "none"
        raise KDError(f"run {run.path} has no evaluated model {model!r} in report.json "
                      f"(it has: {held}); choose another with --model / --against")  # fmt: skip
    out = {}
    for key, (split, metric) in REPORT_METRICS.items():
        value = (entry.get(split) or {}).get(metric)
        out[key] = None if value is None else float(value)
    return out


def _seed(run: RunFolder) -> int:
    return int(run.cfg.run.seed)


def compare_runs(
    runs: Sequence[str | os.PathLike], model: str = "student", against: str = "student_scratch",
    baseline_runs: Sequence[str | os.PathLike] | None = None, confidence: float = 0.95,
    bootstrap: int = 0,
) -> dict:  # fmt: skip
    """Paired comparison of model `model` of each run in `runs` against model `against`.

    Without `baseline_runs`, `against` is taken from the same run folder (a pair = a run).
    With `baseline_runs`, `against` is taken from the baseline run of the same `run.seed`
    (every run needs exactly one baseline of its seed). Returns a JSON-ready dict: the
    pairs, and per metric (validation / test balanced accuracy and AUC) the per-pair values
    and the `PairedDifference` fields with the one-line verdict.
    """
    model, against = _model_name(model, "--model"), _model_name(against, "--against")
    if not runs:
        raise KDError("compare needs at least one run folder")
    variants = [_finished(r) for r in runs]
    if len({r.path.resolve() for r in variants}) != len(variants):
        raise KDError("a run folder is listed twice: each run is one pair")
    if baseline_runs:
        by_seed: dict[int, RunFolder] = {}
        for base in (_finished(r) for r in baseline_runs):
            if _seed(base) in by_seed:
                raise KDError(f"baseline runs {by_seed[_seed(base)].path} and {base.path} share "
                              f"run.seed = {_seed(base)}: give one baseline per seed")  # fmt: skip
            by_seed[_seed(base)] = base
        seeds = [_seed(r) for r in variants]
        if len(set(seeds)) != len(seeds):
            raise KDError(f"the compared runs repeat a run.seed ({sorted(seeds)}): pairing by "
                          "seed needs one run per seed")  # fmt: skip
        missing = [s for s in seeds if s not in by_seed]
        if missing:
            raise KDError(f"no baseline run with run.seed = {missing[0]} (baseline seeds: "
                          f"{sorted(by_seed)}); add it with --baseline-run")  # fmt: skip
        pairs = [(r, by_seed[s], s) for r, s in zip(variants, seeds)]
        pairing = "by run.seed across two groups of runs"
    else:
        if model == against:
            raise KDError(f"--model and --against are both {model!r}: compare two models of "
                          "each run, or give --baseline-run folders")  # fmt: skip
        pairs = [(r, r, _seed(r)) for r in variants]
        pairing = "by run (both models of each run folder)"

    values = [(_values(v, model), _values(b, against)) for v, b, _ in pairs]
    metrics = {}
    for key in REPORT_METRICS:
        kept = [(a[key], b[key]) for a, b in values if a[key] is not None and b[key] is not None]
        diff = paired_difference([a for a, _ in kept], [b for _, b in kept], confidence,
                                 bootstrap=bootstrap)  # fmt: skip
        metrics[key] = {**diff.to_dict(), "variant": [a[key] for a, _ in values],
                        "baseline": [b[key] for _, b in values]}  # fmt: skip
    return {
        "model": model,
        "against": against,
        "pairing": pairing,
        "confidence": confidence,
        "method": "bootstrap" if bootstrap else "paired t",
        "bootstrap_resamples": bootstrap,
        "pairs": [
            {"seed": s, "run": str(v.path), "baseline_run": str(b.path)} for v, b, s in pairs
        ],  # fmt: skip
        "metrics": metrics,
    }


def _as_difference(entry: dict):
    fields = {k: entry[k] for k in PairedDifference.__dataclass_fields__}
    for key in ("mean", "std", "low", "high"):
        fields[key] = float("nan") if fields[key] is None else fields[key]
    fields["differences"] = tuple(fields["differences"])
    return PairedDifference(**fields)


def comparison_markdown(result: dict) -> str:
    """The verdict table of a `compare_runs` result, with its pairs and method."""
    label = f"{result['model']} − {result['against']}"
    paired = {key: _as_difference(entry) for key, entry in result["metrics"].items()}
    lines = [f"# Verdict: {result['model']} against {result['against']}, paired "
             f"{result['pairing']}", "", *VERDICT_HEAD, *verdict_rows(label, paired), "",
             method_line(result["confidence"], result["bootstrap_resamples"]), "",
             "Pairs (seed: run / baseline run):"]  # fmt: skip
    lines += [f"- {p['seed']}: `{p['run']}` / `{p['baseline_run']}`" for p in result["pairs"]]
    return "\n".join(lines) + "\n"


def write_comparison(result: dict, out: str | os.PathLike) -> tuple[Path, Path]:
    """Write `<out>.md` and `<out>.json` (a `.md` / `.json` suffix of `out` is replaced)."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix in (".md", ".json") else out
    md, js = stem.with_name(stem.name + ".md"), stem.with_name(stem.name + ".json")
    write_text(md, comparison_markdown(result))
    write_json(js, result)
    return md, js
