"""torch.compile(fullgraph=True) traces abft_fast.attention with probes, forward and backward, and
matches eager; the torch.library ops pass torch.library.opcheck."""
import pytest
import torch
from cases import fresh_generator

import abft_fast
from abft_fast.ops import fused, probes

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _inputs(gen, b=2, hq=4, hkv=2, lq=16, lk=16, d=16):
    q = torch.randn(b, hq, lq, d, generator=gen)
    k = torch.randn(b, hkv, lk, d, generator=gen)
    v = torch.randn(b, hkv, lk, d, generator=gen)
    rows = torch.tensor([[lq - 1, 3], [7, -1]])
    cols = torch.tensor([[0, 2, 5], [1, -1, lk - 1]])
    return q, k, v, rows, cols


def _grads(fn, q, k, v, w):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out, probs = fn(q, k, v)
    loss = (out * w[0]).sum() + (probs * w[1]).sum()
    return (out.detach(), probs.detach(), *torch.autograd.grad(loss, (q, k, v)))


@pytest.mark.parametrize("backend,masked,full_rows", [
    ("sdpa", False, False), ("sdpa", False, True), ("triton", True, False),
    ("triton", False, True), ("torch", True, False)])
def test_fullgraph_compile_matches_eager(backend, masked, full_rows):
    torch._dynamo.reset()
    gen = fresh_generator()
    q, k, v, rows, cols = _inputs(gen)
    cols = None if full_rows else cols
    kpm = None
    if masked:
        kpm = torch.ones(2, 16, dtype=torch.bool)
        kpm[0, :5] = False

    def fn(q, k, v):
        return abft_fast.attention(q, k, v, key_padding_mask=kpm, window=None, probe_rows=rows,
                                   probe_cols=cols, backend=backend)

    c = 16 if cols is None else cols.shape[1]
    w = (torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 4, 2, c, generator=gen))
    eager = _grads(fn, q, k, v, w)
    compiled = _grads(torch.compile(fn, fullgraph=True), q, k, v, w)
    for name, a, b in zip(("out", "probs", "dq", "dk", "dv"), compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_opcheck_fused_attention():
    gen = fresh_generator()
    q, k, v, rows, cols = _inputs(gen, lq=9, lk=12)
    kpm = torch.ones(2, 12, dtype=torch.bool)
    kpm[1, -3:] = False
    for t in (q, k, v):
        t.requires_grad_()
    torch.library.opcheck(fused.fused_attention_op,
                          (q, k, v, kpm, rows, cols, True, 0.25, 0, "triton"))
    torch.library.opcheck(fused.fused_attention_op,
                          (q, k, v, None, None, None, False, 0.25, 0, "triton"))


def test_opcheck_probe_rows():
    gen = fresh_generator()
    q, k, _, rows, cols = _inputs(gen)
    q.requires_grad_()
    k.requires_grad_()
    torch.library.opcheck(probes.probe_rows_op, (q, k, None, rows, cols, True, 0.25, 0))
    torch.library.opcheck(probes.probe_rows_op, (q, k, None, rows, None, False, 0.3, 0))
