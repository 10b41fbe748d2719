"""ABFT loss and induction-head filter on hand-built probes; PID against hand-computed values."""
import math

import pytest
import torch

from abft_fast.abft.loss import abft_loss, threshold
from abft_fast.abft.pid import PID


def probe(values):
    """[layers, B, H, 1, C] from nested lists [layers][B][H][C]."""
    return torch.tensor(values, dtype=torch.float64).unsqueeze(3)


def test_threshold_formula():
    assert threshold(4, 100).item() == pytest.approx(4 / (4 + math.log(100)))
    assert threshold(torch.tensor([4, 2]), torch.tensor([50, 9])).tolist() == pytest.approx(
        [4 / (4 + math.log(50)), 2 / (2 + math.log(9))])


def test_loss_and_filter_hand_computed():
    # 1 layer, 2 samples, 3 heads, k = 4 label columns. n_t = 60 -> T = 4 / (4 + ln 60) ~ 0.494.
    correct = torch.tensor([[True, False, True, False], [False, False, False, True]])
    valid = torch.ones(2, 4, dtype=torch.bool)
    lengths = torch.tensor([60, 60])
    p = probe([[[[0.3, 0.1, 0.2, 0.05],    # S = 0.65 passes: pos 0.5, neg 0.15
                 [0.1, 0.1, 0.1, 0.1],     # S = 0.40 fails
                 [0.0, 0.5, 0.0, 0.4]],    # S = 0.90 passes: pos 0.0, neg 0.9
                [[0.2, 0.2, 0.2, 0.2],     # S = 0.80 passes: pos 0.2, neg 0.6
                 [0.0, 0.0, 0.0, 0.45],    # S = 0.45 fails
                 [0.0, 0.0, 0.0, 0.0]]]])  # fails
    A, B = 0.7, 1.0
    out = abft_loss(p, correct, valid, lengths, A=A, B=B)
    s0 = (A * 0.15 + B * (1 - 0.5)) + (A * 0.9 + B * 1.0)
    s1 = A * 0.6 + B * (1 - 0.2)
    assert out.loss.item() == pytest.approx((s0 + s1) / 2)
    assert out.passing.tolist() == [2, 1]
    assert out.head_mask[0].tolist() == [[True, False, True], [True, False, False]]
    # Without the filter every head counts.
    nf = abft_loss(p, correct, valid, lengths, A=A, B=B, use_filter=False)
    all0 = s0 + (A * 0.2 + B * (1 - 0.2))
    all1 = s1 + (A * 0.0 + B * (1 - 0.45)) + (A * 0 + B * 1)
    assert nf.loss.item() == pytest.approx((all0 + all1) / 2)
    # Ablations: A = 0 keeps only the correct-mass term, B = 0 only the wrong-mass term.
    a0 = abft_loss(p, correct, valid, lengths, A=0.0, B=1.0)
    assert a0.loss.item() == pytest.approx(((1 - 0.5) + 1.0 + (1 - 0.2)) / 2)
    b0 = abft_loss(p, correct, valid, lengths, A=1.0, B=0.0)
    assert b0.loss.item() == pytest.approx((0.15 + 0.9 + 0.6) / 2)


def test_threshold_uses_each_samples_length_and_k():
    # Same S = 0.5 for both; sample 0 has n_t = 20 (T ~ 0.572, fails), sample 1 n_t = 400 (T ~ 0.4,
    # passes). Sample 1 has only 2 valid columns, k = 2: T = 2 / (2 + ln 400) ~ 0.25.
    correct = torch.tensor([[True, False, False, False], [True, False, False, False]])
    valid = torch.tensor([[True] * 4, [True, True, False, False]])
    p = probe([[[[0.25, 0.25, 0.0, 0.0]], [[0.25, 0.25, 0.0, 0.0]]]])
    out = abft_loss(p, correct, valid, torch.tensor([20, 400]))
    assert out.passing.tolist() == [0, 1]
    # Invalid columns carry no mass into the loss even if probs were non-zero there.
    p2 = probe([[[[0.25, 0.25, 0.0, 0.0]], [[0.25, 0.25, 0.3, 0.3]]]])
    out2 = abft_loss(p2, correct, valid, torch.tensor([20, 400]))
    assert out2.loss.item() == pytest.approx(out.loss.item())


def test_gradient_only_through_counted_heads():
    correct = torch.tensor([[True, False]])
    valid = torch.ones(1, 2, dtype=torch.bool)
    p = probe([[[[0.6, 0.3], [0.1, 0.1]]]]).requires_grad_(True)
    out = abft_loss(p, correct, valid, torch.tensor([30]), A=0.5, B=1.0)
    out.loss.backward()
    g = p.grad[0, 0, :, 0]
    assert g[0].tolist() == pytest.approx([-1.0, 0.5])  # d/dp of 0.5*neg + (1 - pos)
    assert g[1].tolist() == [0.0, 0.0]                   # head 1 fails the filter


def test_loss_rejects_bad_shapes():
    p = torch.rand(2, 3, 4, 1, 5)
    with pytest.raises(ValueError, match="probs must be"):
        abft_loss(p[0], torch.zeros(3, 5, dtype=bool), torch.ones(3, 5, dtype=bool), torch.ones(3))
    with pytest.raises(ValueError, match="correct and valid"):
        abft_loss(p, torch.zeros(3, 4, dtype=bool), torch.ones(3, 5, dtype=bool), torch.ones(3))
    with pytest.raises(ValueError, match="lengths must have shape"):
        abft_loss(p, torch.zeros(3, 5, dtype=bool), torch.ones(3, 5, dtype=bool), torch.ones(2))


def test_pid_hand_computed():
    pid = PID(a0=0.5, cp=0.03, ci=0.005, cd=0.005)
    n = [10.0, 12.0, 15.0, 14.0, 20.0]
    got = [pid.update(x) for x in n]
    # t = 1, 2: unchanged.
    a3 = 0.5 + 0.03 * (15 - 12) + 0.005 * ((12 - 10) + (15 - 12)) + 0.005 * (15 - 2 * 12 + 10)
    a4 = a3 + 0.03 * (14 - 15) + 0.005 * (2 + 3 - 1) + 0.005 * (14 - 2 * 15 + 12)
    a5 = a4 + 0.03 * (20 - 14) + 0.005 * (2 + 3 - 1 + 6) + 0.005 * (20 - 2 * 14 + 15)
    assert got == pytest.approx([0.5, 0.5, a3, a4, a5])
    assert a3 == pytest.approx(0.62) and a4 == pytest.approx(0.59) and a5 == pytest.approx(0.855)


def test_pid_disabled_keeps_a():
    pid = PID(a0=0.3, enabled=False)
    assert [pid.update(x) for x in [1, 5, 9, 2]] == [0.3] * 4
    assert pid.history == [1, 5, 9, 2]
