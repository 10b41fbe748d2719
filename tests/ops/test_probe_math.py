"""The probe maths on its own (abft_fast/ops/probe_math.py), in float64 against autograd of the
dense reference: probabilities from a stored lse, the delta term and the direct term."""
import pytest
import torch
from cases import Case, fresh_generator, make_inputs, spec_of

from abft_fast.ops import probe_math
from abft_fast.ops.reference import attention_reference


def test_gather_slots_zeroes_unused_slots():
    x = torch.arange(24.0).reshape(1, 2, 3, 4)
    idx = torch.tensor([[3, -1, 0]])
    got = probe_math.gather_slots(x, idx, 3)
    assert got.shape == (1, 2, 3, 3)
    torch.testing.assert_close(got[..., 0], x[..., 3])
    assert torch.all(got[..., 1] == 0)
    torch.testing.assert_close(got[..., 2], x[..., 0])
    rows = probe_math.gather_slots(x, torch.tensor([[-1, 2]]), 2)
    assert torch.all(rows[:, :, 0] == 0) and torch.equal(rows[:, :, 1], x[:, :, 2])


@pytest.mark.parametrize("case", [Case(2, 4, 2, 13, 13, 16, padding="left", window=5),
                                  Case(2, 6, 3, 7, 15, 16, padding="random", c=None),
                                  Case(1, 2, 2, 11, 11, 8, causal=False, r=3, c=4)], ids=str)
def test_probs_from_lse_and_backward_match_autograd(case):
    inp = make_inputs(case, fresh_generator())
    q, k, v = (inp[n].clone().requires_grad_() for n in "qkv")
    kw = dict(causal=case.causal, key_padding_mask=inp["kpm"], window=case.window)
    out, lse, p_ref = attention_reference(q, k, v, probe_rows=inp["rows"],
                                          probe_cols=inp["cols"], **kw)
    spec = spec_of(q, k, v, case.causal, None, inp["kpm"], case.window, inp["rows"], inp["cols"])
    p = probe_math.probe_probs_from_lse(q.detach(), k.detach(), lse.detach(), spec)
    torch.testing.assert_close(p, p_ref.detach(), rtol=1e-12, atol=1e-14)
    # d/dq, d/dk of sum(P * G) through the reference = the flash backward with delta' and the
    # direct term: here, with dO = 0, dS = P (0 - delta') on every row, plus the direct term.
    g = inp["dp"]
    dq_ref, dk_ref = torch.autograd.grad((p_ref * g).sum(), (q, k))
    ds, extra = probe_math.probe_delta_extra(p, g, inp["rows"], case.lq)
    _, _, p_full = attention_reference(q.detach(), k.detach(), v.detach(),
                                       probe_rows=torch.arange(case.lq).expand(case.b, -1), **kw)
    grp = case.hq // case.hkv
    kk = k.detach().repeat_interleave(grp, 1)
    ds_lse = -p_full * extra.unsqueeze(-1)  # [B,Hq,Lq,Lk]: the lse part, all rows
    scale = case.d ** -0.5
    dq = scale * ds_lse @ kk
    dk = (scale * ds_lse.transpose(-1, -2) @ q.detach()).reshape(
        case.b, case.hkv, grp, case.lk, case.d).sum(2)
    probe_math.add_probe_direct(dq, dk, q.detach(), k.detach(), ds, spec)
    torch.testing.assert_close(dq, dq_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dk, dk_ref, rtol=1e-10, atol=1e-12)
