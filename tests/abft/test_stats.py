"""Paired before/after statistics (abft_fast/abft/stats.py) against hand-computed values."""
import math

import pytest

from abft_fast.abft import stats


def test_binomial_tail_exact():
    # P[X <= k], X ~ Bin(n, 1/2): sums of binomial coefficients over 2^n, by hand.
    assert stats.binom_cdf_half(0, 5) == 1 / 32
    assert stats.binom_cdf_half(2, 10) == (1 + 10 + 45) / 1024
    assert stats.binom_cdf_half(5, 10) == 638 / 1024
    assert stats.binom_cdf_half(10, 10) == 1.0 and stats.binom_cdf_half(-1, 3) == 0.0
    # large n stays exact (no float underflow in the terms): P[X <= 0] = 2^-2000
    assert stats.binom_cdf_half(0, 2000) == 2.0 ** -2000 or stats.binom_cdf_half(0, 2000) == 0.0
    assert stats.binom_cdf_half(1000, 2001) == 0.5  # symmetric: exactly half below the middle


def _pairs(b, c, same_right=0, same_wrong=0):
    """Correctness lists with b wrong->right, c right->wrong, and concordant prompts."""
    before = [0] * b + [1] * c + [1] * same_right + [0] * same_wrong
    after = [1] * b + [0] * c + [1] * same_right + [0] * same_wrong
    return before, after


@pytest.mark.parametrize("b,c,p", [
    (2, 8, 0.109375),          # 2 * 56/1024: the textbook exact McNemar value (statsmodels agrees)
    (8, 2, 0.109375),          # symmetric
    (0, 5, 0.0625),            # 2 / 32
    (1, 9, 22 / 1024),         # 2 * (1 + 10) / 1024 = 0.021484375
    (5, 5, 1.0),               # 2 * 638/1024 > 1 -> 1
    (0, 0, 1.0),               # nothing changed
    (10, 0, 2 / 1024),
])
def test_mcnemar_exact_by_hand(b, c, p):
    before, after = _pairs(b, c, same_right=7, same_wrong=3)  # concordant pairs do not count
    m = stats.mcnemar_exact(before, after)
    assert (m["b"], m["c"]) == (b, c)
    assert m["p"] == pytest.approx(p, rel=1e-12)


def test_mcnemar_rejects_unpaired():
    with pytest.raises(ValueError, match="not paired"):
        stats.mcnemar_exact([1, 0], [1])
    with pytest.raises(ValueError, match="no prompts"):
        stats.paired([], [])


def test_bootstrap_degenerate_and_deterministic():
    assert stats.bootstrap_diff_ci([0] * 50, n_boot=200) == (0.0, 0.0)
    assert stats.bootstrap_diff_ci([1] * 50, n_boot=200) == (1.0, 1.0)
    d = [1] * 10 + [-1] * 4 + [0] * 36
    assert stats.bootstrap_diff_ci(d, seed=3) == stats.bootstrap_diff_ci(d, seed=3)
    lo, hi = stats.bootstrap_diff_ci(d, seed=3)
    assert lo < 6 / 50 < hi and -1 <= lo and hi <= 1
    # strata resampled within themselves: the mean of (1, 1, 1) and (0, 0, 0) is always 1/2
    assert stats.bootstrap_diff_ci([[1, 1, 1], [0, 0, 0]], n_boot=100) == (0.5, 0.5)


def test_percentile_interpolates_like_numpy_linear():
    assert stats._percentile([0.0, 1.0, 2.0, 3.0], 0.5) == 1.5
    assert stats._percentile([0.0, 1.0, 2.0, 3.0], 0.25) == 0.75
    assert stats._percentile([5.0], 0.975) == 5.0


def test_bootstrap_matches_normal_approximation():
    """1,000 prompts, 100 better, 50 worse: mean 0.05, se = sqrt((0.15 - 0.05^2) / 1000);
    the percentile interval is close to mean +- 1.96 se for this n."""
    d = [1] * 100 + [-1] * 50 + [0] * 850
    lo, hi = stats.bootstrap_diff_ci(d, n_boot=4000, seed=0)
    se = math.sqrt((0.15 - 0.05 ** 2) / 1000)
    assert lo == pytest.approx(0.05 - 1.96 * se, abs=0.003)
    assert hi == pytest.approx(0.05 + 1.96 * se, abs=0.003)


def test_paired_summary_and_line():
    before, after = _pairs(12, 7, same_right=100, same_wrong=81)  # 200 prompts
    s = stats.paired(before, after, n_boot=500, seed=1)
    assert s["n"] == 200
    assert s["accuracy_before"] == pytest.approx(107 / 200)
    assert s["accuracy_after"] == pytest.approx(112 / 200)
    assert s["diff"] == pytest.approx(5 / 200)
    assert s["ci_low"] < s["diff"] < s["ci_high"] and s["ci_low"] < 0  # +2.5 points: not shown
    p = 2 * sum(math.comb(19, i) for i in range(8)) / 2 ** 19
    assert s["mcnemar_p"] == pytest.approx(p) and s["mcnemar_p"] > 0.3
    assert s == stats.paired(before, after, n_boot=500, seed=1)
    line = stats.paired_line(s)
    assert line.startswith("+2.5 [95% CI ") and "12 better, 7 worse, 200 prompts" in line
