"""The verdict statistics (against scipy on fixed numbers), their use in the sweep's tables and
`cli.py compare` over hand-written run folders."""

import json
import math

import numpy as np
import pytest
from conftest import make_run, run_cli
from scipy import stats

from kd_keras.evaluation.verdict import paired_difference, seeds_needed, t_quantile

# five seeds of a variant and its baseline (test balanced accuracy)
VARIANT = [0.912, 0.897, 0.921, 0.905, 0.930]
BASELINE = [0.901, 0.893, 0.904, 0.899, 0.911]


def test_paired_t_interval_matches_scipy():
    d = paired_difference(VARIANT, BASELINE)
    diffs = np.subtract(VARIANT, BASELINE)
    assert d.n == 5 and d.method == "paired t" and d.confidence == 0.95
    assert d.mean == pytest.approx(diffs.mean())
    assert d.std == pytest.approx(diffs.std(ddof=1)), "sample std, ddof = 1"
    low, high = stats.t.interval(0.95, 4, loc=diffs.mean(), scale=stats.sem(diffs))
    assert (d.low, d.high) == (pytest.approx(low), pytest.approx(high))
    # scipy's own paired test (>= 1.11 returns the interval too) says the same
    test = stats.ttest_rel(VARIANT, BASELINE)
    ci = test.confidence_interval(0.95)
    assert (d.low, d.high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert test.pvalue < 0.05 and d.low > 0 and d.verdict == "pays"
    assert d.verdict_line() == "pays (95% CI above 0 at 5 seeds)"
    assert t_quantile(0.95, 4) == pytest.approx(2.7764451051977987)


def test_hurts_is_the_mirror_image_and_other_levels_widen():
    d = paired_difference(BASELINE, VARIANT)
    assert d.verdict == "hurts" and d.high < 0 and d.seeds_needed is None
    assert "below 0" in d.verdict_line()
    at95, wide = (paired_difference(VARIANT, BASELINE, confidence=c) for c in (0.95, 0.99))
    assert wide.low < at95.low and wide.high > at95.high
    assert at95.verdict == "pays" and wide.verdict == "cannot tell", "99% reaches below 0"
    low, high = stats.t.interval(0.99, 4, loc=wide.mean, scale=wide.std / math.sqrt(5))
    assert (wide.low, wide.high) == (pytest.approx(low), pytest.approx(high))


def test_cannot_tell_and_the_seeds_that_would_tell():
    variant, baseline = [0.91, 0.90, 0.93], [0.89, 0.90, 0.90]  # +2, 0, +3 points
    d = paired_difference(variant, baseline)
    assert d.verdict == "cannot tell" and d.low < 0 < d.high
    mean, std = d.mean, d.std
    n = d.seeds_needed
    assert n == seeds_needed(mean, std)
    # n is the first count whose t half-width is below |mean|; n - 1 is not
    assert stats.t.ppf(0.975, n - 1) * std / math.sqrt(n) < abs(mean)
    assert stats.t.ppf(0.975, n - 2) * std / math.sqrt(n - 1) >= abs(mean)
    assert d.verdict_line() == f"cannot tell at 3 seeds; about {n} seeds would tell at this spread"


def test_a_mean_near_zero_needs_more_than_100_seeds():
    d = paired_difference([0.90, 0.91, 0.90, 0.92], [0.91, 0.90, 0.92, 0.90])
    assert d.verdict == "cannot tell" and d.seeds_needed is None
    assert "more than 100 seeds" in d.verdict_line()
    assert seeds_needed(0.0, 0.01) is None and seeds_needed(float("nan"), 0.01) is None


def test_one_seed_has_no_interval_and_cannot_tell():
    d = paired_difference([0.95], [0.80])
    assert d.n == 1 and d.mean == pytest.approx(0.15)
    assert math.isnan(d.std) and math.isnan(d.low) and math.isnan(d.high)
    assert d.verdict == "cannot tell" and d.seeds_needed is None
    assert d.verdict_line() == "cannot tell at 1 seed: one seed has no spread; run 2 or more"
    assert d.to_dict()["std"] is None and d.to_dict()["low"] is None
    empty = paired_difference([], [])
    assert empty.n == 0 and empty.verdict == "cannot tell" and math.isnan(empty.mean)


def test_zero_variance():
    same = paired_difference([0.9, 0.8, 0.7], [0.9, 0.8, 0.7])
    assert same.std == 0 and same.verdict == "cannot tell"
    assert same.verdict_line().endswith("agree on every seed")
    shifted = paired_difference([0.5, 0.5], [0.25, 0.25])  # exact in binary: std is 0
    assert shifted.std == 0 and (shifted.low, shifted.high) == (0.25, 0.25)
    assert shifted.verdict == "pays"


def test_bootstrap_interval_is_seeded_and_inside_the_observed_range():
    d = paired_difference(VARIANT, BASELINE, bootstrap=2000, seed=1)
    again = paired_difference(VARIANT, BASELINE, bootstrap=2000, seed=1)
    diffs = np.subtract(VARIANT, BASELINE)
    assert d.method == "bootstrap" and (d.low, d.high) == (again.low, again.high)
    assert diffs.min() <= d.low < d.mean < d.high <= diffs.max()
    ref = stats.bootstrap((diffs,), np.mean, n_resamples=2000, method="percentile", random_state=1)
    assert d.low == pytest.approx(ref.confidence_interval.low, abs=0.003)
    assert d.high == pytest.approx(ref.confidence_interval.high, abs=0.003)


def test_public_api_names():
    import kd_keras
    from kd_keras.evaluation.compare import compare_runs

    assert kd_keras.paired_difference is paired_difference
    assert kd_keras.compare_runs is compare_runs


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="length"):
        paired_difference([0.9, 0.8], [0.9])
    with pytest.raises(ValueError, match="finite"):
        paired_difference([0.9, float("nan")], [0.9, 0.8])
    with pytest.raises(ValueError, match="confidence"):
        paired_difference([0.9, 0.8], [0.9, 0.8], confidence=95)


# ---------------------------------------------------------------- the sweep's tables


def _runs():
    def run(name, setting, seed, bal, auc):
        return {"name": name, "setting": setting, "seed": seed, "val_bal_acc": bal - 0.01,
                "test_bal_acc": bal, "test_acc": bal, "test_auc": auc, "val_auc": auc - 0.01,
                "subset_bal_acc": bal, "subset_minority_recall": bal}  # fmt: skip

    seeds = (42, 43, 44, 45, 46)
    runs = [run("student_scratch", {}, s, b, 0.95) for s, b in zip(seeds, BASELINE)]
    runs += [run("good", {"distill.beta": 1}, s, v, 0.96) for s, v in zip(seeds, VARIANT)]
    runs += [run("bad", {"distill.beta": 0}, s, b - 0.01, 0.95) for s, b in zip(seeds, BASELINE)]
    return runs


def test_sweep_rows_carry_paired_verdicts_and_tables_show_them(tmp_path):
    from kd_keras.config import build_config
    from kd_keras.reporting.sweep_report import (
        ablation_markdown,
        summarize,
        verdict_markdown,
        write_results,
    )

    rows = {r["name"]: r for r in summarize(_runs())}
    good = rows["good"]["paired"]
    ref = stats.ttest_rel(VARIANT, BASELINE).confidence_interval(0.95)
    assert good["test_bal_acc"].verdict == "pays"
    assert good["test_bal_acc"].low == pytest.approx(ref.low)
    assert rows["good"]["gain"][0] == pytest.approx(good["test_bal_acc"].mean)
    assert good["val_bal_acc"].mean == pytest.approx(good["test_bal_acc"].mean)
    assert good["test_auc"].verdict == "pays"  # +1 point on every seed: std 0
    assert rows["bad"]["paired"]["test_bal_acc"].verdict == "hurts"
    assert rows["student_scratch"]["paired"] == {}

    md = verdict_markdown(list(rows.values()))
    assert "| good | balanced accuracy | 5 |" in md and "pays (95% CI above 0 at 5 seeds)" in md
    assert "| bad | AUC | 5 |" in md and "paired t over seeds" in md
    assert "student_scratch |" not in md
    base = build_config({}, tmp_path)
    ablation = ablation_markdown(list(rows.values()), base)
    (logits,) = [line for line in ablation.splitlines() if line.startswith("| KD, logits only")]
    assert "| bad |" in logits and "hurts (95% CI below 0 at 5 seeds)" in logits
    assert len(logits.split(" | ")) == len(ablation.splitlines()[2].split(" | "))

    write_results(tmp_path, _runs(), list(rows.values()), ["distill.beta"], base)
    assert "## Verdict" in (tmp_path / "results.md").read_text()
    assert "Verdict: each cell" in (tmp_path / "results.html").read_text()
    import pandas as pd

    table = pd.read_csv(tmp_path / "results.csv").set_index("name")
    assert table.at["good", "test_bal_acc_verdict"] == "pays"
    assert table.at["good", "test_bal_acc_diff_low"] == pytest.approx(ref.low, abs=1e-4)
    assert table.at["bad", "test_auc_verdict"] == "cannot tell"


# ---------------------------------------------------------------- compare over run folders


def _fake_run(folder, seed, student, scratch):
    """A finished run folder: config.toml (run.seed) and a hand-written report.json."""
    make_run(folder, folder.parent / "unused.npz", {})
    config = folder / "config.toml"
    config.write_text(config.read_text().replace("seed = 0", f"seed = {seed}"))

    def entry(bal, auc):
        return {"val": {"balanced_accuracy": bal - 0.02, "roc_auc": auc - 0.01},
                "test": {"balanced_accuracy": bal, "roc_auc": auc}}  # fmt: skip

    models = {}
    if student is not None:
        models["student"] = entry(*student)
    if scratch is not None:
        models["student_scratch"] = entry(*scratch)
    (folder / "report.json").write_text(json.dumps({"class_names": ["a", "b"], "models": models}))
    return folder


def test_cli_compare_within_runs_prints_and_writes_the_verdict(tmp_path):
    folders = [
        str(_fake_run(tmp_path / f"r{s}", s, (v, 0.97), (b, 0.96)))
        for s, v, b in zip(range(42, 47), VARIANT, BASELINE)
    ]
    code, out, err = run_cli("compare", *folders, "--out", str(tmp_path / "out" / "verdict"))
    assert code == 0, err
    assert "| student − student_scratch | balanced accuracy | 5 |" in out
    assert "pays (95% CI above 0 at 5 seeds)" in out
    result = json.loads((tmp_path / "out" / "verdict.json").read_text())
    bal = result["metrics"]["test_bal_acc"]
    ref = stats.ttest_rel(VARIANT, BASELINE).confidence_interval(0.95)
    assert (bal["low"], bal["high"]) == (pytest.approx(ref.low), pytest.approx(ref.high))
    assert bal["verdict"] == "pays" and bal["variant"] == VARIANT and bal["baseline"] == BASELINE
    assert result["metrics"]["val_auc"]["mean"] == pytest.approx(0.01)
    assert [p["seed"] for p in result["pairs"]] == [42, 43, 44, 45, 46]
    assert (tmp_path / "out" / "verdict.md").read_text().startswith("# Verdict: student against")


def test_cli_compare_two_groups_pairs_by_seed(tmp_path):
    # listed in a different seed order: pairing is by run.seed, not by position
    variants = [str(_fake_run(tmp_path / f"kd{s}", s, (v, 0.97), None))
                for s, v in zip((42, 43, 44), VARIANT)]  # fmt: skip
    bases = [str(_fake_run(tmp_path / f"sc{s}", s, None, (b, 0.96)))
             for s, b in reversed(list(zip((42, 43, 44), BASELINE)))]  # fmt: skip
    args = [a for b in bases for a in ("--baseline-run", b)]
    code, out, err = run_cli("compare", *variants, *args, "--out", str(tmp_path / "v.md"))
    assert code == 0, err
    result = json.loads((tmp_path / "v.json").read_text())
    assert result["metrics"]["test_bal_acc"]["baseline"] == BASELINE[:3]
    assert result["pairing"].startswith("by run.seed")

    code, _, err = run_cli("compare", *variants, *args[:4])
    assert code == 2 and "no baseline run with run.seed = 42" in err
    code, _, err = run_cli("compare", variants[0], "--baseline-run", bases[0])
    assert code == 2 and "no baseline run with run.seed = 42" in err


def test_cli_compare_errors_are_one_line(tmp_path):
    one = str(_fake_run(tmp_path / "one", 42, (0.9, 0.95), None))
    code, _, err = run_cli("compare", one)
    assert code == 2 and "no evaluated model 'student_scratch'" in err and "--against" in err
    code, _, err = run_cli("compare", one, "--against", "bogus")
    assert code == 2 and "--against 'bogus' is not a model" in err
    code, _, err = run_cli("compare", str(tmp_path / "absent"))
    assert code == 2 and "run folder not found" in err
    (tmp_path / "unfinished").mkdir()
    code, _, err = run_cli("compare", str(tmp_path / "unfinished"))
    assert code == 2 and "not finished" in err
    code, out, err = run_cli("compare", one, "--model", "student", "--against", "student")
    assert code == 2 and "both 'student'" in err
    single = str(_fake_run(tmp_path / "single", 42, (0.9, 0.95), (0.88, 0.95)))
    code, out, err = run_cli("compare", single)
    assert code == 0 and "cannot tell at 1 seed" in out
