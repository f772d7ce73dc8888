import math

import pytest

from kd_keras.config import build_config, toml_value
from kd_keras.errors import KDError
from kd_keras.reporting.sweep_report import (
    ablation_markdown,
    summarize,
    validation_test_rank_correlation,
)
from kd_keras.workflows.sweep import cell_name, parse_grid, run_sweep


def test_parse_grid_types_values():
    grid = parse_grid(["distill.temperature=1,2.5", "distill.mode=soft,hard"])
    assert grid == {"distill.temperature": [1, 2.5], "distill.mode": ["soft", "hard"]}
    assert cell_name({"distill.temperature": 2, "distill.beta": 0}) == "temperature=2_beta=0"
    with pytest.raises(KDError, match="section.key=v1,v2"):
        parse_grid(["temperature"])


def test_override_values_survive_quotes_and_backslashes(tmp_path):
    """The sweep passes the teacher's path as an override: any path must round-trip."""
    odd = str(tmp_path / 'my "best" teacher\\v2.keras')
    cfg = build_config({}, tmp_path, [f"teacher.path={toml_value(odd)}"])
    assert cfg.teacher.path == odd


def test_summary_is_mean_and_sample_std_over_seeds():
    runs = [
        {"name": "cell", "setting": {"distill.beta": 1}, "seed": s, "val_bal_acc": v,
         "test_bal_acc": v, "test_acc": v, "test_auc": v, "subset_bal_acc": v,
         "subset_minority_recall": v}
        for s, v in ((42, 0.80), (43, 0.90), (44, 0.85))
    ]  # fmt: skip
    (row,) = summarize(runs)
    mean, std = row["test_bal_acc"]
    assert row["seeds"] == 3 and mean == pytest.approx(0.85)
    assert std == pytest.approx(0.05), "sample std (ddof = 1), not the population std 0.0408"
    (single,) = summarize(runs[:1])
    assert math.isnan(single["test_bal_acc"][1]), "one seed has no spread"


def test_gain_over_scratch_is_paired_by_seed_and_rank_correlation_is_spearman():
    """Cell minus scratch of the same seed, then mean and sample std of those differences."""
    metrics = ("val_bal_acc", "test_acc", "test_auc", "subset_bal_acc", "subset_minority_recall")

    def run(name, setting, seed, val, test):
        return {
            "name": name,
            "setting": setting,
            "seed": seed,
            **dict.fromkeys(metrics, 0.5),
            "val_bal_acc": val,
            "test_bal_acc": test,
        }

    runs = [run("student_scratch", {}, s, 0.9, t) for s, t in ((1, 0.80), (2, 0.90), (3, 0.70))]
    # cell a: +0.02, +0.01, +0.03 per seed; its unpaired std (0.1) would hide the gain
    runs += [
        run("a", {"distill.beta": 1}, s, 0.95, t) for s, t in ((1, 0.82), (2, 0.91), (3, 0.73))
    ]
    runs += [run("b", {"distill.beta": 0}, s, 0.93, 0.60) for s in (1, 2, 3)]
    runs += [run("c", {"distill.beta": 2}, s, 0.91, 0.65) for s in (1, 2, 3)]
    rows = {r["name"]: r for r in summarize(runs)}
    assert rows["a"]["gain"][0] == pytest.approx(0.02)
    assert rows["a"]["gain"][1] == pytest.approx(0.01)
    assert math.isnan(rows["student_scratch"]["gain"][0])
    rho, cells = validation_test_rank_correlation(list(rows.values()))
    assert cells == 3 and rho == pytest.approx(0.5)  # val ranks a > b > c, test a > c > b


def _cell(setting: dict, val: float, test: float) -> dict:
    stats = {lab: (test, 0.01) for lab in ("test_bal_acc", "test_acc", "test_auc", "gain")}
    return {"name": cell_name(setting), "setting": setting, "val_bal_acc": (val, 0.01), **stats}


def _ablation(rows: list[dict], base) -> dict[str, str]:
    """variant label -> selected cell name, from the ablation table."""
    table = [line for line in ablation_markdown(rows, base).splitlines() if line.startswith("|")]
    lines = [line.split(" | ") for line in table[2:]]
    return {cells[0].lstrip("| "): cells[1] for cells in lines}


def test_ablation_selects_each_variant_on_validation_with_base_config_defaults(tmp_path):
    """Keys that are not grid axes take the base config's value; every row is the variant's
    best cell on validation, never on test."""
    rows = [
        _cell({"distill.mode": "hard", "distill.feature_loss": "fitnet"}, 0.95, 0.70),
        _cell({"distill.mode": "hard", "distill.feature_loss": "attention"}, 0.90, 0.99),
        _cell({"distill.mode": "dkd", "distill.feature_loss": "fitnet"}, 0.91, 0.99),
        _cell({"distill.mode": "dkd", "distill.feature_loss": "attention"}, 0.96, 0.60),
    ]
    chosen = _ablation(rows, build_config({}, tmp_path))  # base: beta 1, soft
    assert chosen["KD, hard"] == "mode=hard_feature_loss=fitnet"
    assert chosen["Decoupled KD"] == "mode=dkd_feature_loss=attention"
    assert chosen["features: FitNet (adapter + L2)"] == "mode=hard_feature_loss=fitnet"
    assert chosen["features: attention transfer"] == "mode=dkd_feature_loss=attention"
    assert chosen["KD, logits + features (beta > 0)"] == "mode=dkd_feature_loss=attention"
    assert "KD, soft" not in chosen and "KD, logits only (beta = 0)" not in chosen

    logits_only = build_config({"distill": {"beta": 0.0}}, tmp_path)
    chosen = _ablation(rows, logits_only)
    assert chosen["KD, logits only (beta = 0)"] == "mode=dkd_feature_loss=attention"
    assert not any(label.startswith("features:") for label in chosen)


@pytest.mark.slow
def test_sweep_runs_grid_and_skips_finished_cells(tiny_npz, tmp_path, capsys):
    raw = {
        "run": {"name": "s", "output_dir": str(tmp_path)},
        "data": {"path": str(tiny_npz), "image_size": 32, "batch_size": 16},
        "teacher": {"variant": "tiny"},
        "student": {"variant": "tiny"},
        "train": {"epochs": 1, "verbose": 0},
        "eval": {"imbalanced_subset": False},
    }
    base = build_config(raw, tmp_path)
    grid = parse_grid(["distill.temperature=2", "distill.alpha=0.5", "distill.beta=0,1"])
    result = run_sweep(raw, tmp_path, base, grid, seeds=1)
    root = tmp_path / "s_sweep"
    names = [r["name"] for r in result["rows"]]
    assert names[:2] == ["teacher", "student_scratch"] and len(names) == 4
    for f in ("runs.csv", "results.csv", "results.md", "ablation.md", "heatmap.png"):
        assert (root / f).is_file(), f
    ablation = (root / "ablation.md").read_text()
    assert "logits only" in ablation and "logits + features" in ablation
    reports = sorted(root.rglob("report.json"))
    stamps = [p.stat().st_mtime_ns for p in reports]
    capsys.readouterr()

    run_sweep(raw, tmp_path, base, grid, seeds=1)
    assert [p.stat().st_mtime_ns for p in reports] == stamps
    assert capsys.readouterr().out.count("skip (finished)") == len(reports)
    with pytest.raises(KDError, match="distill.alpha"):
        run_sweep(raw, tmp_path, base, parse_grid(["distill.alpha=2"]), seeds=1)
