"""Torch backend against the float64 reference: out, probs, dq, dk, dv."""
import pytest
import torch
from cases import Case, attention_fn, check_rel, make_inputs, reference, run

import abft_fast

CASES = [
    Case(1, 1, 1, 1, 1, 16, r=1, c=1, unused=False),             # L = 1
    Case(2, 4, 4, 37, 37, 32),                                   # MHA, odd L
    Case(2, 6, 2, 29, 29, 16, padding="left"),                   # GQA + left padding
    Case(2, 4, 1, 33, 33, 64, padding="right", r=3, c=None),     # MQA + full-row probes
    Case(2, 4, 2, 40, 40, 32, window=7, padding="left"),         # sliding window
    Case(3, 2, 2, 23, 23, 16, causal=False, padding="random"),   # non-causal, random holes
    Case(2, 4, 2, 9, 31, 32, padding="right"),                   # Lq < Lk (decode on a cache)
    Case(2, 2, 1, 17, 17, 80, window=1, r=4, c=5),               # d = 80, window 1
    Case(1, 3, 3, 50, 50, 16, r=None),                           # no probes
    Case(2, 2, 2, 19, 19, 16, r=0, c=2),                         # empty probe set
    Case(2, 2, 1, 21, 21, 16, scale=0.9, r=2, c=0),              # empty columns, custom scale
]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)],
                         ids=["fp64", "fp32"])
def test_torch_backend_matches_reference(case, dtype, tol):
    inp = make_inputs(case, torch.Generator().manual_seed(torch.seed() % 2**31))
    ref = reference(case, inp)
    got = run(attention_fn("torch"), case, inp, dtype)
    check_rel(got, ref, tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_torch_backend_half(dtype):
    case = Case(2, 4, 2, 31, 31, 32, padding="left", window=9)
    inp = make_inputs(case, torch.Generator().manual_seed(torch.seed() % 2**31))
    ref = reference(case, inp)
    got = run(attention_fn("torch"), case, inp, dtype)
    check_rel(got, ref, 3e-2)


def test_fully_masked_rows_are_zero_not_nan():
    b, h, l, d = 2, 2, 8, 16
    q, k, v = (torch.randn(b, h, l, d, requires_grad=True) for _ in range(3))
    kpm = torch.zeros(b, l, dtype=torch.bool)
    kpm[1, 5:] = True  # batch 0: nothing visible anywhere; batch 1: rows < 5 see nothing
    rows = torch.tensor([[0, 7], [3, 7]])
    out, probs = abft_fast.attention(q, k, v, key_padding_mask=kpm, probe_rows=rows,
                                     backend="torch")
    assert torch.all(out[0] == 0) and torch.all(out[1, :, :5] == 0)
    assert torch.all(probs[0] == 0) and torch.all(probs[1, :, 0] == 0)
    torch.testing.assert_close(probs[1, :, 1].sum(-1), torch.ones(h))
    (out.sum() + probs.sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()


def test_large_logits_fp16_are_finite():
    g = torch.Generator().manual_seed(5)
    q = (torch.randn(1, 2, 64, 64, generator=g) * 30).half()
    k = (torch.randn(1, 2, 64, 64, generator=g) * 30).half()
    v = torch.randn(1, 2, 64, 64, generator=g).half()
    out, probs = abft_fast.attention(q, k, v, probe_rows=torch.tensor([[63, 10]]),
                                     backend="torch")
    assert torch.isfinite(out).all() and torch.isfinite(probs).all()
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 2, 2), rtol=0, atol=1e-3)
