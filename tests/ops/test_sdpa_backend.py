"""Backend "sdpa" (PyTorch SDPA for the output, kernels/probes.py for the probes) against the
float64 reference, forward and backward; the probe kernels alone; the cases it refuses."""
import pytest
import torch
from cases import (
    Case,
    attention_fn,
    check_rel,
    check_rule,
    fresh_generator,
    make_inputs,
    on_device,
    poison_empty,
    reference,
    rel_err,
    run,
)

import abft_fast
from abft_fast.kernels import probes
from abft_fast.ops import sdpa_backend
from abft_fast.ops.reference import attention_reference

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
DEV = "cuda" if torch.cuda.is_available() else "cpu"

# Unmasked attention only (the engine's domain): GQA, MQA, Lq < Lk, non-causal, full rows,
# duplicate / unused slots, empty probe sets.
CASES = [
    Case(1, 1, 1, 1, 1, 16, r=1, c=1, unused=False),
    Case(2, 4, 4, 37, 37, 32),
    Case(2, 6, 2, 29, 29, 16, r=5, c=7),
    Case(2, 4, 1, 33, 33, 64, r=3, c=None),
    Case(2, 4, 2, 9, 31, 32, r=4, c=6),
    Case(3, 2, 2, 23, 23, 16, causal=False),
    Case(2, 2, 1, 17, 17, 80, r=4, c=None),
    Case(2, 8, 1, 20, 20, 16, r=3, c=5),       # G x R = 24 rows: two probe tiles of 16
    Case(1, 3, 3, 50, 50, 16, r=None),
    Case(2, 2, 2, 19, 19, 16, r=0, c=2),
    Case(2, 2, 1, 21, 21, 16, scale=0.9, r=2, c=0),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_sdpa_fp32_matches_reference(case, monkeypatch):
    inp = make_inputs(case, fresh_generator())
    ref = reference(case, inp)
    tor = run(attention_fn("torch"), case, inp, torch.float32)
    poison_empty(monkeypatch)
    got = run(attention_fn("sdpa"), case, on_device(inp, DEV), torch.float32)
    monkeypatch.undo()
    got = {n: t.cpu() for n, t in got.items()}
    check_rel(got, ref, 2e-4)
    check_rule(got, tor, ref, floor=1e-6)


@pytest.mark.parametrize("case", [Case(2, 4, 2, 37, 37, 64, r=3, c=5),
                                  Case(2, 6, 2, 33, 33, 32, c=None),
                                  Case(2, 2, 1, 12, 20, 16, causal=False)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_sdpa_half_rule(case, dtype):
    inp = make_inputs(case, fresh_generator())
    ref = reference(case, inp)
    tor = run(attention_fn("torch"), case, inp, dtype)
    got = {n: t.cpu() for n, t in run(attention_fn("sdpa"), case, on_device(inp, DEV),
                                      dtype).items()}
    check_rule(got, tor, ref, floor=1e-3)


def test_sdpa_float64_uses_the_torch_probe_path():
    case = Case(2, 4, 2, 15, 15, 16, r=3, c=4)
    inp = make_inputs(case, fresh_generator())
    check_rel(run(attention_fn("sdpa"), case, inp, torch.float64), reference(case, inp), 1e-10)


@pytest.mark.parametrize("case", [Case(2, 4, 2, 29, 29, 16, window=5, padding="left", c=None),
                                  Case(2, 6, 3, 9, 40, 32, padding="random", r=4, c=6),
                                  Case(1, 2, 1, 33, 33, 16, causal=False, padding="right")],
                         ids=str)
def test_probe_kernels_with_masks_match_reference(case):
    """kernels/probes.py takes padding and windows too (the sdpa engine does not pass them, the
    kernels are general): P, lse, and the gradient of sum(P * G) into q and k."""
    inp = make_inputs(case, fresh_generator())
    q, k = inp["q"].float(), inp["k"].float()
    rows, cols, kpm = inp["rows"], inp["cols"], inp["kpm"]
    p, lse = probes.probe_rows_fwd(q.to(DEV), k.to(DEV), rows.to(DEV),
                                   None if cols is None else cols.to(DEV),
                                   None if kpm is None else kpm.to(DEV), causal=case.causal,
                                   window=case.window)
    _, lse_ref, p_ref = attention_reference(inp["q"], inp["k"], inp["v"], causal=case.causal,
                                            key_padding_mask=kpm, window=case.window,
                                            probe_rows=rows, probe_cols=cols)
    assert rel_err(p.cpu().double(), p_ref) <= 2e-6
    lse_rows = torch.gather(lse_ref, 2, rows.clamp(min=0)[:, None, :].expand(-1, case.hq, -1))
    lse_rows = torch.where((rows >= 0)[:, None, :], lse_rows, float("-inf"))
    lse = lse.cpu().double()
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_rows))
    fin = torch.isfinite(lse_rows)
    assert rel_err(lse[fin], lse_rows[fin]) <= 2e-6
    # backward through the op against autograd of the reference
    qg, kg = (t.clone().to(DEV).requires_grad_() for t in (q, k))
    pr, _ = sdpa_backend.probe_rows_op(qg, kg, None if kpm is None else kpm.to(DEV), rows.to(DEV),
                                       None if cols is None else cols.to(DEV), case.causal,
                                       case.d ** -0.5, case.window or 0)
    dq, dk = torch.autograd.grad((pr.double() * inp["dp"].to(DEV)).sum(), (qg, kg))
    qr, kr = (t.clone().requires_grad_() for t in (inp["q"], inp["k"]))
    _, _, pref = attention_reference(qr, kr, inp["v"], causal=case.causal, key_padding_mask=kpm,
                                     window=case.window, probe_rows=rows, probe_cols=cols)
    dq_ref, dk_ref = torch.autograd.grad((pref * inp["dp"]).sum(), (qr, kr))
    assert rel_err(dq.cpu().double(), dq_ref) <= 2e-5
    assert rel_err(dk.cpu().double(), dk_ref) <= 2e-5


def test_probe_kernels_fully_masked_rows_give_zero():
    q = torch.randn(2, 4, 12, 16, device=DEV)
    k = torch.randn(2, 2, 12, 16, device=DEV)
    kpm = torch.ones(2, 12, dtype=torch.bool, device=DEV)
    kpm[0, :6] = False  # causal: rows 0..5 of batch 0 see no key
    rows = torch.tensor([[2, 11, -1], [0, 5, 11]], device=DEV)
    p, lse = probes.probe_rows_fwd(q, k, rows, None, kpm, causal=True)
    assert torch.isfinite(p).all()
    assert torch.all(p[0, :, 0] == 0) and torch.all(p[0, :, 2] == 0)
    assert torch.isinf(lse[0, :, 0]).all() and torch.isinf(lse[0, :, 2]).all()
    torch.testing.assert_close(p[0, :, 1].sum(-1), torch.ones(4, device=DEV))
    e = torch.randn(2, 4, 3, 12, device=DEV) * (p > 0)
    dq, dk = probes.probe_rows_bwd(q, k, rows, lse, e.sum(-1), e, kpm, causal=True)
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all()
    assert torch.all(dq[0, :, 0] == 0) and torch.all(dq[0, :, 2] == 0)


def test_sdpa_refuses_masks():
    q = torch.randn(1, 2, 8, 16)
    kpm = torch.ones(1, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="backend='sdpa' runs unmasked attention only"):
        abft_fast.attention(q, q, q, key_padding_mask=kpm, backend="sdpa")
    with pytest.raises(ValueError, match="backend='sdpa' runs unmasked attention only"):
        abft_fast.attention(q, q, q, window=3, backend="sdpa")


def test_sdpa_probe_only_loss_gives_no_dv():
    """The probes depend on q and k only: a loss on the probes alone leaves v without gradient."""
    q, k, v = (torch.randn(1, 2, 10, 16, device=DEV, requires_grad=True) for _ in range(3))
    _, probs = abft_fast.attention(q, k, v, probe_rows=torch.tensor([[9, 4]], device=DEV),
                                   backend="sdpa")
    probs.sum().backward()
    assert v.grad is None and torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


@pytest.mark.parametrize("case", [Case(2, 4, 2, 21, 21, 32, r=3, c=5),
                                  Case(2, 6, 3, 9, 17, 16, r=2, c=None)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_one_function_path_equals_composite_path(case, dtype, monkeypatch):
    """Eager training calls run output and probes in one autograd node (probe dk added in place
    into SDPA's dk, dq rows scattered into SDPA's dq); the composite path (SDPA + the probe op,
    what torch.compile traces) must give the same numbers."""
    inp = on_device(make_inputs(case, fresh_generator()), DEV)
    calls = []
    real = sdpa_backend.SdpaWithProbes.apply
    monkeypatch.setattr(sdpa_backend.SdpaWithProbes, "apply",
                        lambda *a: calls.append(1) or real(*a))
    one = run(attention_fn("sdpa"), case, inp, dtype)
    assert calls == [1]
    monkeypatch.setattr(sdpa_backend, "_fused_backward", lambda *a: False)
    composite = run(attention_fn("sdpa"), case, inp, dtype)
    assert calls == [1]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name in one:
        assert rel_err(one[name], composite[name]) <= tol, name


def test_gradient_checkpointing_recomputes_once():
    """Under non-reentrant checkpointing the composite path runs (the one-node path's nested
    backward would recompute the layer a second time): the function runs twice in all, forward
    and one recomputation, and the gradients equal the run without checkpointing."""
    from torch.utils.checkpoint import checkpoint
    q, k, v = (torch.randn(2, 4 // h, 12, 16, device=DEV, requires_grad=True) for h in (1, 2, 2))
    rows = torch.tensor([[11, 3], [5, -1]], device=DEV)
    calls = []

    def layer(q, k, v):
        calls.append(1)
        out, probs = abft_fast.attention(q, k, v, probe_rows=rows, backend="sdpa")
        return out.square().sum() + (probs * probs.new_tensor(range(12))).sum()

    checkpoint(layer, q, k, v, use_reentrant=False).backward()
    assert len(calls) == 2
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    layer(q, k, v).backward()
    for a, b in zip(got, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(a, b)


def test_second_backward_is_a_clear_error():
    q, k, v = (torch.randn(1, 2, 8, 16, device=DEV, requires_grad=True) for _ in range(3))
    out, probs = abft_fast.attention(q, k, v, probe_rows=torch.tensor([[7]], device=DEV),
                                     backend="sdpa")
    loss = out.sum() + probs[..., 0].sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already differentiated"):
        loss.backward()
