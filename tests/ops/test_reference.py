"""The reference against a plain, loop-free softmax formula written independently."""
import math

import pytest
import torch

from abft_fast.ops.reference import attention_reference


def plain(q, k, v, causal, scale, kpm, window):
    b, hq, l, d = q.shape
    g = hq // k.shape[1]
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:3], -math.inf, dtype=q.dtype)
    for bi in range(b):
        for h in range(hq):
            for i in range(l):
                sc = [float(scale * (q[bi, h, i] @ k[bi, h // g, j])) for j in range(l)]
                ok = [(not causal or j <= i) and (window is None or j > i - window)
                      and (kpm is None or bool(kpm[bi, j])) for j in range(l)]
                if not any(ok):
                    continue
                m = max(s for s, o in zip(sc, ok) if o)
                z = sum(math.exp(s - m) for s, o in zip(sc, ok) if o)
                lse[bi, h, i] = m + math.log(z)
                for j in range(l):
                    if ok[j]:
                        out[bi, h, i] += math.exp(sc[j] - m) / z * v[bi, h // g, j]
    return out, lse


@pytest.mark.parametrize("causal,window,pad", [(True, None, False), (False, None, True),
                                               (True, 3, True), (True, None, True)])
def test_reference_matches_plain_formula(causal, window, pad):
    g = torch.Generator().manual_seed(1234 + int(causal) + 7 * (window or 0) + 3 * pad)
    b, hq, hkv, l, d = 2, 4, 2, 7, 5
    q, k, v = (torch.randn(b, h, l, d, dtype=torch.float64, generator=g) for h in (hq, hkv, hkv))
    kpm = None
    if pad:
        kpm = torch.rand(b, l, generator=g) > 0.4
        kpm[0, :] = False
        kpm[0, 3] = True  # rows 0..2 of batch 0 see nothing when causal
    out, lse, probs = attention_reference(q, k, v, causal=causal, scale=0.3, key_padding_mask=kpm,
                                          window=window, probe_rows=torch.tensor([[6, 0], [2, -1]]))
    out_p, lse_p = plain(q, k, v, causal, 0.3, kpm, window)
    torch.testing.assert_close(out, out_p, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, lse_p, rtol=1e-12, atol=1e-12)
    # probs are rows of softmax: each row sums to 1 or is empty (0) and is 0 for the -1 slot
    sums = probs.sum(-1)
    assert torch.all(((sums - 1).abs() < 1e-12) | (sums == 0))
    assert torch.all(probs[1, :, 1] == 0)
