"""The visibility rule (abft_fast/ops/masks.py) against a direct loop over (row, key)."""
import pytest
import torch

from abft_fast.ops.masks import visible


@pytest.mark.parametrize("lq,lk,causal,window", [(6, 6, True, None), (3, 8, True, None),
                                                  (5, 9, True, 3), (4, 4, False, None),
                                                  (7, 7, True, 1)])
def test_visible_matches_the_rule(lq, lk, causal, window):
    g = torch.Generator().manual_seed(0)
    kpm = torch.rand(2, lk, generator=g) > 0.3
    rows = torch.arange(lq).expand(2, -1)
    got = visible(rows, torch.arange(lk), lq=lq, lk=lk, causal=causal, window=window,
                  key_padding_mask=kpm)
    assert got.shape == (2, lq, lk)
    for b in range(2):
        for i in range(lq):
            for j in range(lk):
                qpos = i + lk - lq
                want = bool(kpm[b, j]) and (not causal or j <= qpos) and (
                    window is None or j > qpos - window)
                assert bool(got[b, i, j]) == want, (b, i, j)


def test_visible_per_batch_columns():
    rows = torch.tensor([[4], [2]])
    cols = torch.tensor([[0, 4, 5], [3, 2, 1]])
    got = visible(rows, cols, lq=6, lk=6, causal=True, window=None, key_padding_mask=None)
    assert got.tolist() == [[[True, True, False]], [[False, True, True]]]
