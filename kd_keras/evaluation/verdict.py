"""Does a variant beat its baseline? Paired differences over seeds, a 95% interval, a verdict.

    >>> d = paired_difference([0.91, 0.90, 0.93], [0.89, 0.90, 0.90])
    >>> d.verdict, round(d.mean, 4), d.method
    ('cannot tell', 0.0167, 'paired t')

The method: pair each seed's variant value with the baseline's of the same seed (same data
order and initial weights), take the differences d_1..d_n, their mean and sample standard
deviation s (ddof = 1), and the two-sided interval mean ± t_{1-(1-c)/2, n-1} · s / sqrt(n)
(Student's t over seeds; c = 0.95 by default). Optionally a percentile bootstrap of the mean
difference instead (resampling seeds; with 3-5 seeds it is narrower than the t interval and
too optimistic, so the t interval is the default).

The verdict: "pays" when the whole interval is above 0, "hurts" when it is below 0, else
"cannot tell" at this number of seeds, with the number of seeds that would tell if the mean
and spread stayed as observed: the smallest n with t_{1-(1-c)/2, n-1} · s / sqrt(n) < |mean|.
That is a planning figure, not a promise: at that n about half of the repeat experiments
would still not tell (the observed mean is itself noisy).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

MAX_SEEDS = 100  # beyond this, "more than 100 seeds" (a difference too small to chase)
VERDICTS = ("pays", "hurts", "cannot tell")


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """The paired comparison of a variant with its baseline over n seeds.

    Attributes:
        n: number of pairs (seeds).
        mean: mean of variant - baseline (NaN without pairs).
        std: sample standard deviation of the differences (ddof = 1; NaN under 2 pairs).
        low, high: the confidence interval of the mean difference (NaN under 2 pairs).
        confidence: the interval's level (0.95).
        method: "paired t" or "bootstrap".
        verdict: "pays", "hurts" or "cannot tell".
        seeds_needed: for "cannot tell", the seeds that would tell at the observed mean and
            spread; None when not estimable (under 2 pairs, a zero mean) or above `MAX_SEEDS`.
        differences: the per-seed differences, in pair order.
    """

    n: int
    mean: float
    std: float
    low: float
    high: float
    confidence: float
    method: str
    verdict: str
    seeds_needed: int | None
    differences: tuple[float, ...]

    def verdict_line(self) -> str:
        """One line: the verdict, and for "cannot tell" what it would take."""
        if self.verdict != "cannot tell":
            side = "above" if self.verdict == "pays" else "below"
            return f"{self.verdict} ({self.confidence:.0%} CI {side} 0 at {_seeds(self.n)})"
        text = f"cannot tell at {_seeds(self.n)}"
        if self.n < 2:
            return text + ": one seed has no spread; run 2 or more"
        if self.mean == 0 and self.std == 0:
            return text + ": the variant and the baseline agree on every seed"
        if self.seeds_needed is None:
            return text + f"; more than {MAX_SEEDS} seeds would be needed at this spread"
        return text + f"; about {self.seeds_needed} seeds would tell at this spread"

    def to_dict(self) -> dict:
        """JSON-ready fields (NaN as None), plus the one-line verdict."""
        out = dataclasses.asdict(self)
        out["differences"] = list(self.differences)
        for key in ("mean", "std", "low", "high"):
            out[key] = None if math.isnan(out[key]) else out[key]
        out["verdict_line"] = self.verdict_line()
        return out


def _seeds(n: int) -> str:
    return f"{n} seed" + ("" if n == 1 else "s")


def t_quantile(confidence: float, df: int) -> float:
    """The two-sided Student's t critical value t_{1-(1-confidence)/2, df}."""
    from scipy import stats

    return float(stats.t.ppf(0.5 + confidence / 2, df))


def seeds_needed(mean: float, std: float, confidence: float = 0.95,
                 max_seeds: int = MAX_SEEDS) -> int | None:  # fmt: skip
    """The smallest n >= 2 with t_{1-(1-c)/2, n-1} * std / sqrt(n) < |mean|: how many seeds
    would put a paired t interval clear of 0 if the mean and spread stayed as observed.
    None when the mean is 0 (or not finite) or more than `max_seeds` would be needed."""
    if not (math.isfinite(mean) and math.isfinite(std)) or abs(mean) < 1e-12:
        return None
    for n in range(2, max_seeds + 1):
        if t_quantile(confidence, n - 1) * std / math.sqrt(n) < abs(mean):
            return n
    return None


def _bootstrap_interval(diffs: np.ndarray, confidence: float, resamples: int, seed: int):
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(diffs), (resamples, len(diffs)))
    means = diffs[picks].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def paired_difference(
    variant: Sequence[float], baseline: Sequence[float], confidence: float = 0.95,
    bootstrap: int = 0, seed: int = 0,
) -> PairedDifference:  # fmt: skip
    """Compare `variant[i]` with `baseline[i]` (pair i = one seed).

    Args:
        variant, baseline: per-seed values of one metric, in the same seed order.
        confidence: the interval's level, in (0, 1).
        bootstrap: 0 for the paired t interval; else the number of bootstrap resamples of
            the seeds (percentile interval of the mean difference, `seed` for the resampling).

    Returns:
        A `PairedDifference`; under 2 pairs there is no interval and the verdict is
        "cannot tell".
    """
    if len(variant) != len(baseline):
        raise ValueError(f"paired values differ in length: {len(variant)} vs {len(baseline)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    diffs = np.asarray(variant, "float64") - np.asarray(baseline, "float64")
    if not np.isfinite(diffs).all():
        raise ValueError("paired values must be finite numbers (drop the missing seeds)")
    n = len(diffs)
    method = "bootstrap" if bootstrap else "paired t"
    mean = float(diffs.mean()) if n else math.nan
    std = float(diffs.std(ddof=1)) if n > 1 else math.nan
    low = high = math.nan
    if n > 1:
        if bootstrap:
            low, high = _bootstrap_interval(diffs, confidence, bootstrap, seed)
        else:
            half = t_quantile(confidence, n - 1) * std / math.sqrt(n)
            low, high = mean - half, mean + half
    if n > 1 and low > 0:
        verdict = "pays"
    elif n > 1 and high < 0:
        verdict = "hurts"
    else:
        verdict = "cannot tell"
    needed = seeds_needed(mean, std, confidence) if verdict == "cannot tell" and n > 1 else None
    return PairedDifference(n=n, mean=mean, std=std, low=low, high=high, confidence=confidence,
                            method=method, verdict=verdict, seeds_needed=needed,
                            differences=tuple(float(d) for d in diffs))  # fmt: skip


def points(value: float | None, signed: bool = True, scale: float = 100.0,
           digits: int = 2) -> str:  # fmt: skip
    """A metric difference (a fraction) in percentage points (`scale` 100, 2 decimals; `scale`
    1 and 3 decimals keep it a fraction); "n/a" for None or NaN."""
    if value is None or math.isnan(value):
        return "n/a"
    return f"{scale * value:{'+' if signed else ''}.{digits}f}"


def difference_text(d: PairedDifference, **unit) -> str:
    """`+1.20 ± 0.50` (points, mean ± sample std), or the mean alone under 2 pairs; `unit`:
    `points`' `scale` and `digits`."""
    if d.n == 0:
        return "n/a"
    if d.n < 2:
        return points(d.mean, **unit)
    return f"{points(d.mean, **unit)} ± {points(d.std, signed=False, **unit)}"


def interval_text(d: PairedDifference, **unit) -> str:
    """`[+0.40, +2.00]` (points; `unit` as in `difference_text`), or "—" without an interval."""
    return "—" if math.isnan(d.low) else f"[{points(d.low, **unit)}, {points(d.high, **unit)}]"


# what a verdict table compares: (label, validation metric, test metric)
VERDICT_METRICS = (
    ("balanced accuracy", "val_bal_acc", "test_bal_acc"),
    ("AUC", "val_auc", "test_auc"),
)
VERDICT_HEAD = (
    "| variant | metric | seeds | validation Δ | test Δ (mean ± std) | test 95% CI | verdict |",
    "|---|---|---|---|---|---|---|",
)


def verdict_rows(label: str, paired: dict[str, PairedDifference]) -> list[str]:
    """Markdown table rows of one variant: per metric of `VERDICT_METRICS`, the validation
    and test paired differences (points) and the test verdict. `paired` maps a metric key
    (`val_bal_acc`, `test_auc`, ...) to its `PairedDifference`; missing metrics are skipped."""
    rows = []
    for name, val_key, test_key in VERDICT_METRICS:
        test = paired.get(test_key)
        if test is None or test.n == 0:
            continue
        val = paired.get(val_key)
        val_text = difference_text(val) if val is not None else "n/a"
        rows.append(f"| {label} | {name} | {test.n} | {val_text} | {difference_text(test)} | "
                    f"{interval_text(test)} | {test.verdict_line()} |")  # fmt: skip
    return rows


def method_line(confidence: float = 0.95, bootstrap: int = 0,
                unit: str = "percentage points") -> str:  # fmt: skip
    """The sentence under a verdict table saying how it was computed (`unit`: of its Δ)."""
    how = (f"percentile bootstrap of the mean over seeds ({bootstrap} resamples)" if bootstrap
           else "paired t over seeds (Student's t, n - 1 degrees of freedom)")  # fmt: skip
    return (f"Δ: variant minus baseline of the same seed, in {unit} (mean ± sample std). "
            f"{confidence:.0%} CI: {how}. Verdict on the test split: pays = CI above 0, "
            "hurts = CI below 0; seeds needed: smallest n with t·s/√n < |mean| at the "
            "observed mean and spread.")  # fmt: skip
