"""Torch backend against the float64 reference: out, probs, dq, dk, dv."""
import pytest
import torch
import torch.utils._python_dispatch
from cases import RANDOM_CASES as CASES
from cases import (
    Case,
    attention_fn,
    check_rel,
    check_rule,
    fresh_generator,
    make_inputs,
    reference,
    run,
)

import abft_fast
from abft_fast.ops.reference import attention_reference


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)],
                         ids=["fp64", "fp32"])
def test_torch_backend_matches_reference(case, dtype, tol):
    inp = make_inputs(case, fresh_generator())
    ref = reference(case, inp)
    got = run(attention_fn("torch"), case, inp, dtype)
    check_rel(got, ref, tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_torch_backend_half(dtype):
    case = Case(2, 4, 2, 31, 31, 32, padding="left", window=9)
    inp = make_inputs(case, fresh_generator())
    ref = reference(case, inp)
    got = run(attention_fn("torch"), case, inp, dtype)
    # against the same precision: the naive L x L attention in this dtype (docs/design.md
    # section 7's rule), not a flat tolerance
    naive = run(attention_reference, case, inp, dtype)
    check_rule(got, naive, ref, floor=1e-4)


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


class _BoolSizes(torch.utils._python_dispatch.TorchDispatchMode):
    """The largest bool tensor any op creates (masks)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.dtype == torch.bool:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("kw", [dict(padding="left"), dict(padding="right", window=64),
                                dict(padding="random", causal=False)], ids=str)
def test_torch_backend_never_builds_l_by_l(kw):
    """Padding (and windows) without an L x L mask: B 2, L 1024 built a [2, 1024, 1024] mask
    (2,097,152 elements) before; now every mask is a block of query rows x its key band. The
    result still matches the float64 reference (checked in float64, so any error is a bug)."""
    case = Case(2, 4, 2, 1024, 1024, 16, r=2, c=3, **kw)
    inp = make_inputs(case, fresh_generator())
    mode = _BoolSizes()
    with mode:
        got = run(attention_fn("torch"), case, inp, torch.float64)
    assert mode.largest <= 2 * 128 * 1024 < 1024 * 1024
    check_rel(got, reference(case, inp), 1e-10)


@pytest.mark.parametrize("kw", [dict(padding="right"), dict()], ids=["padded", "plain"])
def test_torch_backend_lq_longer_than_lk(kw):
    """Lq > Lk + a whole query block: the first blocks see no key (0, never NaN); Lq != Lk causal
    without padding takes the same block path (no lower-right bias)."""
    case = Case(2, 4, 2, 300, 3, 16, r=2, c=2, unused=False, **kw)
    inp = make_inputs(case, fresh_generator())
    got = run(attention_fn("torch"), case, inp, torch.float64)
    check_rel(got, reference(case, inp), 1e-10)
