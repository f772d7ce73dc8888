"""Experiment runner: a grid of distillation settings over several seeds, resumable.

    python cli.py sweep --config configs/xray.toml --grid distill.temperature=1,2,4,8 \\
        --grid distill.alpha=0.1,0.5,0.9 --grid distill.beta=0,1 --seeds 3

Layout under `<output_dir>/<name>_sweep/`:

    teacher/                 the teacher, trained once (seed = run.seed) and shared by all cells
    scratch/seed<k>/         the student without distillation, one per seed
    cells/<cell>/seed<k>/    one distilled student per grid cell and seed
    runs.csv                 one flat row per trained run (cell, seed, metrics)
    results.csv, results.md  mean +- sample std (ddof = 1) over seeds per cell, and per cell the
                             paired difference to scratch with its 95% CI and verdict
                             (kd_keras.evaluation.verdict: paired t over seeds)
    results.html             the same with the heatmaps, the ablation and every seed's value
    heatmap.png              balanced accuracy over temperature x alpha (validation | test)
    ablation.md              seed 002's comparison, every row selected on validation

A finished run folder (`RunFolder.finished`) is skipped on the next call. Nothing is
selected on the test split: every choice uses the validation balanced accuracy.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from pathlib import Path

from kd_keras.config import Config, build_config, parse_override, toml_value
from kd_keras.errors import KDError
from kd_keras.reporting.sweep_report import run_row, summarize, write_results
from kd_keras.run.folder import RunFolder
from kd_keras.workflows.distill import run_distill

logger = logging.getLogger(__name__)


def parse_grid(items: list[str]) -> dict[str, list]:
    """`section.key=v1,v2,...` items into {dotted key: [values]} (values read as TOML)."""
    grid: dict[str, list] = {}
    for item in items:
        if "=" not in item:
            raise KDError(f"grid {item!r} must look like section.key=v1,v2,...")
        dotted, raw = item.split("=", 1)
        values = [parse_override(f"{dotted}={v.strip()}")[2] for v in raw.split(",") if v.strip()]
        if not values:
            raise KDError(f"grid {item!r} lists no values")
        grid[dotted.strip()] = values
    return grid


def cell_name(setting: dict) -> str:
    """A folder-safe name of one grid cell, e.g. `temperature=4_alpha=0.5`."""
    return "_".join(f"{k.split('.')[-1]}={v}" for k, v in setting.items())


def _overrides(setting: dict) -> list[str]:
    return [f"{k}={toml_value(v)}" for k, v in setting.items()]


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class SweepProgress:
    """Which run of how many is starting, time elapsed, and an estimate of what is left (the
    mean time of the runs trained so far, times the runs left; skipped runs cost nothing)."""

    def __init__(self, total: int, clock: Callable[[], float] = time.perf_counter):
        self.total, self.clock = total, clock
        self.started = clock()
        self.index = 0
        self.trained = 0

    def start(self, label: str) -> str:
        """The line announcing the next run (also printed)."""
        self.index += 1
        now = self.clock()
        elapsed = _duration(now - self.started)
        line = f"[sweep {self.index}/{self.total}] {label} — elapsed {elapsed}"
        if self.trained:
            per_run = (now - self.started) / self.trained
            line += f", about {_duration(per_run * (self.total - self.index + 1))} left"
        logger.info(line)
        return line

    def done(self, trained: bool) -> None:
        """Record that the current run finished (`trained` False: it was skipped)."""
        self.trained += int(trained)


def _run(base: Config, raw: dict, base_dir: Path, folder: Path, overrides: list[str], stages,
         progress: SweepProgress | None = None, label: str = ""):  # fmt: skip
    """Train and evaluate one run folder unless it is already finished."""
    run = RunFolder(folder)
    if progress is not None:
        progress.start(label or folder.name)
    if run.finished:
        logger.info(f"skip (finished): {folder}")
        if progress is not None:
            progress.done(trained=False)
        return run.report
    cfg = build_config(raw, base_dir, overrides, default_name=base.run.name)
    cfg.run.output_dir, cfg.run.name = str(folder.parent), folder.name
    mode = "resume" if run.results() else "new"  # a cell killed mid-way continues
    # the teacher is the sweep's own, trained and evaluated once: no teacher check per cell
    report = run_distill(cfg, stages, copy_teacher=False, force=True, mode=mode)
    if progress is not None:
        progress.done(trained=True)
    return report


def run_sweep(
    raw: dict, base_dir: Path, base: Config, grid: dict[str, list], seeds: int,
    overrides: list[str] | None = None,
) -> dict:  # fmt: skip
    """Run every grid cell for `seeds` seeds (plus teacher and scratch baselines); write the
    results table, heatmap and ablation; return the rows."""
    if seeds < 1:
        raise KDError(f"--seeds must be at least 1, got {seeds}")
    for key in grid:  # validate every grid value before training anything
        for value in grid[key]:
            build_config(raw, base_dir, (overrides or []) + [f"{key}={toml_value(value)}"])
    root = base.run_dir.parent / f"{base.run.name}_sweep"
    overrides = list(overrides or [])

    keys = list(grid)
    cells = list(itertools.product(*(grid[k] for k in keys)))
    given = base.teacher.from_user  # the user's teacher(s): none to train
    progress = SweepProgress((0 if given else 1) + seeds * (1 + len(cells)))
    teacher_dir = root / "teacher"
    with_teacher = overrides
    if not given:
        _run(base, raw, base_dir, teacher_dir, overrides, ["teacher"], progress, "teacher")
        teacher_file = str(teacher_dir / "teacher.keras")
        with_teacher = overrides + [f"teacher.path={toml_value(teacher_file)}"]

    runs: list[dict] = []  # one flat row per trained run
    seed_list = [base.run.seed + k for k in range(seeds)]
    if RunFolder(teacher_dir).finished:  # absent when the user gave the teacher(s)
        runs.append(run_row("teacher", {}, base.run.seed, RunFolder(teacher_dir).report,
                            "teacher"))  # fmt: skip
    for seed in seed_list:
        folder = root / "scratch" / f"seed{seed}"
        report = _run(base, raw, base_dir, folder, overrides + [f"run.seed={seed}"], ["scratch"],
                      progress, f"scratch, seed {seed}")  # fmt: skip
        runs.append(run_row("student_scratch", {}, seed, report, "student_scratch"))

    for values in cells:
        setting = dict(zip(keys, values))
        for seed in seed_list:
            folder = root / "cells" / cell_name(setting) / f"seed{seed}"
            report = _run(base, raw, base_dir, folder,
                          with_teacher + _overrides(setting) + [f"run.seed={seed}"],
                          ["distill"], progress, f"{cell_name(setting)}, seed {seed}")  # fmt: skip
            runs.append(run_row(cell_name(setting), setting, seed, report, "student"))

    rows = summarize(runs)
    write_results(root, runs, rows, keys, base)
    return {"root": str(root), "rows": rows}
