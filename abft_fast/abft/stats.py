"""Paired uncertainty of a before/after accuracy change on the same prompts.

Two numbers go with every before/after accuracy:

- McNemar's exact test: of the prompts whose correctness changed, ``b`` went wrong -> right and
  ``c`` right -> wrong; under "no change" each discordant prompt is a fair coin, so the two-sided
  p-value is ``min(1, 2 * P[Binomial(b + c, 1/2) <= min(b, c)])``, computed exactly with
  ``math.comb`` (p = 1 when no prompt changed).
- A paired bootstrap 95 % interval of the accuracy difference: resample the prompts with
  replacement (the same draw for before and after), take the percentile interval of
  ``mean(after) - mean(before)``. Seeded, so the same inputs always give the same interval.

Several strata (e.g. the eight data sets of an average) are resampled each within itself, and the
statistic is the mean over strata of their mean differences.
"""
from __future__ import annotations

import math
import random
from fractions import Fraction

__all__ = ["binom_cdf_half", "bootstrap_diff_ci", "mcnemar_exact", "paired", "paired_line"]


def binom_cdf_half(k: int, n: int) -> float:
    """P[X <= k] for X ~ Binomial(n, 1/2), exact (rational arithmetic, then one rounding)."""
    if n < 0:
        raise ValueError(f"n must be >= 0; got {n}")
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return float(Fraction(sum(math.comb(n, i) for i in range(k + 1)), 2 ** n))


def mcnemar_exact(before, after) -> dict:
    """McNemar's exact two-sided test on paired correctness (sequences of bool / 0-1).

    Returns ``{"b": wrong->right, "c": right->wrong, "p": p-value}``."""
    before, after = _pairs(before, after)
    b = sum(1 for x, y in zip(before, after) if not x and y)
    c = sum(1 for x, y in zip(before, after) if x and not y)
    n = b + c
    p = 1.0 if n == 0 else min(1.0, 2.0 * binom_cdf_half(min(b, c), n))
    return {"b": b, "c": c, "p": p}


def _pairs(before, after):
    before = [bool(x) for x in before]
    after = [bool(x) for x in after]
    if len(before) != len(after):
        raise ValueError(f"before has {len(before)} prompts, after {len(after)}: not paired")
    if not before:
        raise ValueError("no prompts")
    return before, after


def _percentile(sorted_xs, q):
    """Linear interpolation between order statistics (numpy's default 'linear' method)."""
    pos = (len(sorted_xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def bootstrap_diff_ci(diffs, n_boot: int = 2000, seed: int = 0, level: float = 0.95):
    """Percentile interval of the mean paired difference, resampling prompts with replacement.

    ``diffs``: per-prompt differences (after - before; for correctness -1, 0 or 1), or a list of
    such lists (strata, e.g. data sets): each stratum is resampled within itself and the statistic
    is the mean over strata of the stratum means. Returns ``(low, high)``; deterministic for a
    given ``seed``."""
    strata = [list(map(float, d)) for d in diffs] if diffs and isinstance(
        diffs[0], (list, tuple)) else [list(map(float, diffs))]
    if not strata or any(not s for s in strata):
        raise ValueError("every stratum needs at least one prompt")
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < level < 1; got {n_boot}, {level}")
    rng = random.Random(seed)
    stats = []
    for _ in range(n_boot):
        tot = 0.0
        for s in strata:
            tot += sum(rng.choices(s, k=len(s))) / len(s)
        stats.append(tot / len(strata))
    stats.sort()
    a = (1 - level) / 2
    return _percentile(stats, a), _percentile(stats, 1 - a)


def paired(before, after, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Everything a report needs for one before/after pair of per-prompt correctness lists:
    accuracies, their difference, the bootstrap interval of the difference and McNemar's test."""
    before, after = _pairs(before, after)
    n = len(before)
    diffs = [int(y) - int(x) for x, y in zip(before, after)]
    lo, hi = bootstrap_diff_ci(diffs, n_boot, seed, level)
    m = mcnemar_exact(before, after)
    return {"n": n, "accuracy_before": sum(before) / n, "accuracy_after": sum(after) / n,
            "diff": sum(diffs) / n, "ci_low": lo, "ci_high": hi, "ci_level": level,
            "bootstrap": {"resamples": n_boot, "seed": seed}, "mcnemar_b": m["b"],
            "mcnemar_c": m["c"], "mcnemar_p": m["p"]}


def paired_line(s: dict, scale: float = 100.0) -> str:
    """One line for a ``paired`` result, in points: ``+2.5 [95% CI -1.2, +6.3], McNemar p = 0.21
    (12 better, 7 worse)``."""
    pct = round(s["ci_level"] * 100)
    return (f"{s['diff'] * scale:+.1f} [{pct}% CI {s['ci_low'] * scale:+.1f}, "
            f"{s['ci_high'] * scale:+.1f}], McNemar p = {s['mcnemar_p']:.3g} "
            f"({s['mcnemar_b']} better, {s['mcnemar_c']} worse, {s['n']} prompts)")
