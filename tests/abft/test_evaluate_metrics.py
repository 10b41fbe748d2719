"""The evaluator's metrics (abft_fast/abft/evaluate.py) on hand-computed cases."""
import pytest

from abft_fast.abft.evaluate import consistency, macro_f1


def test_macro_f1_by_hand():
    gold = [0, 0, 1, 1, 2, 2]
    pred = [0, 1, 1, 1, 0, 2]
    # class 0: tp 1, fp 1, fn 1 -> f1 0.5; class 1: tp 2, fp 1, fn 0 -> 0.8; class 2: tp 1, fn 1 -> 2/3
    assert macro_f1(gold, pred, 3) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert macro_f1(gold, gold, 3) == 1.0
    assert macro_f1([0, 0], [1, 1], 2) == 0.0  # a class never predicted nor present counts 0


def test_consistency_by_hand():
    assert consistency([1, 1, 1, 0, 2, 0], 3) == pytest.approx((1.0 + 2 / 3) / 2)
    assert consistency([0, 1], 1) == 1.0
    with pytest.raises(ValueError, match="do not split into groups of 4"):
        consistency([0, 1, 2], 4)
