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
    spec_of,
)

import abft_fast
from abft_fast.kernels import probes
from abft_fast.ops import probe_ops, sdpa_backend, torch_backend
from abft_fast.ops.probes import probe_rows_op
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
    pr, _ = probe_rows_op(qg, kg, None if kpm is None else kpm.to(DEV), rows.to(DEV),
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


# ----------------------------------------------------------------------------------------------
# dk in place into any strided dk; key range of the forward and dq-rows kernels (window, Lq < Lk)


def _strided_dk(kind, b, hkv, lk, d, dtype):
    """A [B, Hkv, Lk, D] tensor laid out as SDPA's dk often is: contiguous, a transposed view
    (HF's k = proj(x).view(B, L, H, D).transpose(1, 2)), or a slice of a wider buffer."""
    g = fresh_generator()
    if kind == "contiguous":
        return torch.randn(b, hkv, lk, d, generator=g).to(dtype)
    if kind == "transposed":
        return torch.randn(b, lk, hkv, d, generator=g).to(dtype).transpose(1, 2)
    return torch.randn(b, hkv, lk, 2 * d + 3, generator=g).to(dtype)[..., 3:d + 3]


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("case", [Case(2, 4, 2, 21, 21, 32, r=3, c=5),
                                  Case(1, 6, 3, 9, 26, 16, window=6, r=2, c=None)], ids=str)
def test_probe_dk_adds_in_place_into_strided_dk(case, layout):
    """probe_rows_bwd(dk_out=...) adds the probe part of dk into the given tensor, whatever its
    strides: same storage and address, every element = old value + probe dk (float64 check)."""
    inp = make_inputs(case, fresh_generator())
    q, k, rows, cols = inp["q"].float(), inp["k"].float(), inp["rows"], inp["cols"]
    dk_out = _strided_dk(layout, case.b, case.hkv, case.lk, case.d, torch.float32).to(DEV)
    assert probes.accepts_dk_out(dk_out) and (layout == "contiguous") == dk_out.is_contiguous()
    before, ptr = dk_out.double().cpu(), dk_out.data_ptr()
    p, lse = probes.probe_rows_fwd(q.to(DEV), k.to(DEV), rows.to(DEV),
                                   None if cols is None else cols.to(DEV), causal=case.causal,
                                   window=case.window)
    u, e = probe_ops.grad_inputs(p, inp["dp"].float().to(DEV),
                                 None if cols is None else cols.to(DEV), case.lk)
    _, dk = probes.probe_rows_bwd(q.to(DEV), k.to(DEV), rows.to(DEV), lse, u, e,
                                  causal=case.causal, window=case.window, dk_out=dk_out)
    assert dk is dk_out and dk_out.data_ptr() == ptr
    qr, kr = (t.clone().requires_grad_() for t in (inp["q"], inp["k"]))
    _, _, pref = attention_reference(qr, kr, inp["v"], causal=case.causal, window=case.window,
                                     probe_rows=rows, probe_cols=cols)
    dk_ref, = torch.autograd.grad((pref * inp["dp"]).sum(), (kr,))
    assert rel_err(dk_out.cpu().double() - before, dk_ref) <= 2e-5


def test_probe_dk_refuses_overlapping_dk():
    q, k = torch.randn(1, 2, 8, 16, device=DEV), torch.randn(1, 1, 8, 16, device=DEV)
    rows = torch.tensor([[7]], device=DEV)
    p, lse = probes.probe_rows_fwd(q, k, rows)
    bad = torch.zeros(1, 1, 1, 16, device=DEV).expand(1, 1, 8, 16)
    with pytest.raises(ValueError, match="no overlapping elements"):
        probes.probe_rows_bwd(q, k, rows, lse, p[..., 0], p, dk_out=bad)


class _DenseAllocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts op results with at least ``numel`` elements in storage that no input of the op
    owns (new allocations, not views or in-place results)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.seen = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves(
            (args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if (isinstance(t, torch.Tensor) and t.numel() >= self.numel
                    and t.untyped_storage().data_ptr() not in ins):
                self.seen.append(f"{func}{tuple(t.shape)}")
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", [Case(2, 4, 2, 24, 24, 32, r=3, c=5),
                                  Case(1, 3, 3, 20, 20, 32, r=2, c=None)], ids=str)
def test_one_node_path_adds_probe_dk_in_place_into_transposed_dk(case, dtype, monkeypatch):
    """HF models pass k as a transposed view, so SDPA's dk is not contiguous: the one-node path
    still adds the probe part of dk in place (the dk kernel gets the tensor SDPA returned, and
    returns it), and the probes' backward allocates nothing of dk's size (counted against the
    backward of the same call without the probe loss). Gradients against float64 (2x rule)."""
    inp = make_inputs(case, fresh_generator())
    b, hkv, lk, d = case.b, case.hkv, case.lk, case.d
    seen = []
    real = probes.probe_rows_bwd

    def spy(*a, dk_out=None, **kw):
        seen.append(dk_out)
        got = real(*a, dk_out=dk_out, **kw)
        assert dk_out is not None and got[1] is dk_out
        return got
    monkeypatch.setattr(probes, "probe_rows_bwd", spy)

    def call(with_probe_loss):
        q = inp["q"].to(dtype).to(DEV).requires_grad_()
        # HF layout: k, v = proj(x).view(B, L, Hkv, D).transpose(1, 2)
        kl, vl = (inp[n].transpose(1, 2).contiguous().to(dtype).to(DEV).requires_grad_()
                  for n in ("k", "v"))
        k, v = kl.transpose(1, 2), vl.transpose(1, 2)
        out, probs = abft_fast.attention(q, k, v, probe_rows=inp["rows"].to(DEV),
                                         probe_cols=None if inp["cols"] is None
                                         else inp["cols"].to(DEV), backend="sdpa")
        loss = (out.double() * inp["do"].to(DEV)).sum()
        if with_probe_loss:
            loss = loss + (probs.double() * inp["dp"].to(DEV)).sum()
        with _DenseAllocations(b * hkv * lk * d) as mode:
            loss.backward()
        return mode.seen, dict(out=out, probs=probs, dq=q.grad, dk=kl.grad.transpose(1, 2),
                               dv=vl.grad.transpose(1, 2))

    base, _ = call(False)
    assert seen == []
    allocs, got = call(True)
    assert len(seen) == 1 and not seen[0].is_contiguous()
    assert allocs == base, f"probe backward allocated {set(allocs) - set(base) or allocs}"
    got = {n: t.detach().cpu().double() for n, t in got.items()}
    ref = reference(case, inp)
    tor = run(attention_fn("torch"), case, inp, dtype)
    check_rule(got, tor, ref, floor=1e-6 if dtype == torch.float32 else 1e-3)


# Window and Lq < Lk (queries are the last Lq positions): the forward and dq-rows kernels scan
# keys from the tile's first window key (block-aligned) to its causal limit.
RANGE_CASES = [
    Case(2, 4, 2, 40, 40, 16, window=7, r=3, c=5),
    Case(2, 6, 2, 9, 48, 32, window=12, r=4, c=None),           # Lq < Lk, window, full rows
    Case(1, 4, 1, 20, 64, 16, window=5, padding="left", r=3, c=6),
    Case(2, 8, 1, 30, 45, 16, window=9, r=3, c=5),              # G x R = 24: two probe tiles
    Case(2, 2, 2, 17, 50, 16, r=3, c=4),                        # Lq < Lk, no window
    Case(2, 2, 1, 33, 33, 16, window=2, r=4, c=None),
]


def _probe_run(q, k, inp, case, dtype, path):
    """probs and d(sum(probs * dp)) / d(q, k) by ``path``: "reference" (float64,
    ops/reference.py), "torch" (torch_backend.probe_probs) or "kernels" (the probe-row op, i.e.
    the Triton probe kernels)."""
    q, k = (t.to(dtype).requires_grad_() for t in (q, k))
    kpm, rows, cols = inp["kpm"], inp["rows"], inp["cols"]
    if path == "reference":
        _, _, probs = attention_reference(q, k, k.detach(), causal=case.causal,
                                          key_padding_mask=kpm, window=case.window,
                                          probe_rows=rows, probe_cols=cols)
    elif path == "torch":
        spec = spec_of(q, k, k.detach(), causal=case.causal, key_padding_mask=kpm,
                       window=case.window, probe_rows=rows, probe_cols=cols)
        probs = torch_backend.probe_probs(q, k, spec)
    else:
        dev = q.device
        probs, _ = probe_rows_op(
            q, k, None if kpm is None else kpm.to(dev), rows.to(dev),
            None if cols is None else cols.to(dev), case.causal, case.d ** -0.5,
            case.window or 0)
    dq, dk = torch.autograd.grad((probs.double() * inp["dp"].to(probs.device)).sum(), (q, k))
    return {n: t.detach().cpu().double() for n, t in dict(probs=probs, dq=dq, dk=dk).items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", RANGE_CASES, ids=str)
def test_probe_kernels_window_and_short_queries_rule(case, dtype, monkeypatch):
    """Probe kernels with a window and / or Lq < Lk: probs, dq, dk against float64, error at most
    2x the torch backend's in the same dtype; every output of the kernels poisoned first."""
    gen = fresh_generator()
    inp = make_inputs(case, gen)
    if case.window and inp["cols"] is not None:  # columns in and just before the last row's window
        cols = torch.randint(max(0, case.lk - case.window - 2), case.lk, inp["cols"].shape,
                             generator=gen)
        cols[0, 0] = -1
        inp["cols"] = cols
    ref = _probe_run(inp["q"], inp["k"], inp, case, torch.float64, "reference")
    assert ref["probs"].norm() > 0 and ref["dk"].norm() > 0
    tor = _probe_run(inp["q"], inp["k"], inp, case, dtype, "torch")
    poison_empty(monkeypatch)
    got = _probe_run(inp["q"].to(DEV), inp["k"].to(DEV), inp, case, dtype, "kernels")
    monkeypatch.undo()
    check_rule(got, tor, ref, floor=1e-6 if dtype == torch.float32 else 1e-3)


def test_dq_rows_kernel_skips_keys_outside_the_window():
    """Keys before the tile's first window block and after its causal limit's block are never
    read by the dq-rows kernel: NaN there leaves dq finite and equal to the clean run (a kernel
    that loaded them would multiply 0 * NaN into dq). Lq < Lk: query i is at i + Lk - Lq."""
    b, hq, hkv, lq, lk, d, window = 1, 2, 1, 36, 112, 16, 10
    q = torch.randn(b, hq, lq, d, device=DEV)
    k = torch.randn(b, hkv, lk, d, device=DEV)
    rows = torch.tensor([[2, 5]], device=DEV)  # absolute positions 78 and 81
    bn = probes._tiles("dq", hq * 2, q.device, q.dtype, d)[1]
    lo = (78 - window + 1) // bn * bn
    hi = -(-(81 + 1) // bn) * bn
    assert lo > 0 and hi < lk
    p, lse = probes.probe_rows_fwd(q, k, rows, None, causal=True, window=window)
    e = torch.randn(p.shape, device=DEV) * (p > 0)
    dq, dk = probes.probe_rows_bwd(q, k, rows, lse, e.sum(-1), e, causal=True, window=window)
    k_nan = k.clone()
    k_nan[:, :, :lo] = float("nan")
    k_nan[:, :, hi:] = float("nan")
    p2, lse2 = probes.probe_rows_fwd(q, k_nan, rows, None, causal=True, window=window)
    dq2, _ = probes.probe_rows_bwd(q, k_nan, rows, lse2, e.sum(-1), e, causal=True,
                                   window=window)
    assert torch.equal(p, p2) and torch.equal(lse, lse2)
    assert torch.isfinite(dq2).all() and torch.equal(dq, dq2)


class _Launches:
    """Counts launches of a Triton kernel (``kernel[grid](...)``)."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        self.log.append(self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else "kernel")
        return self.kernel[grid]


@pytest.mark.parametrize("case", [Case(2, 8, 2, 24, 24, 32, r=5, c=7),  # G x R = 20: 2 row tiles
                                  Case(1, 4, 1, 9, 30, 16, r=2, c=None)], ids=str)
def test_probes_take_three_kernel_launches(case, monkeypatch):
    """The sdpa engine's probes cost one Triton launch in the forward (lse and P of every probe
    row, all row tiles in one grid) and two in the backward (dk in place, the probe rows' dq),
    whatever the number of probe rows: issue 16's "three launches or fewer"."""
    log = []
    for name in ("_probe_fwd_kernel", "_probe_dk_kernel", "_probe_dq_kernel"):
        monkeypatch.setattr(probes, name, _Launches(getattr(probes, name), log))
    inp = on_device(make_inputs(case, fresh_generator()), DEV)
    run(attention_fn("sdpa"), case, inp, torch.float32)
    assert sorted(log) == sorted(["_probe_fwd_kernel", "_probe_dk_kernel", "_probe_dq_kernel"]), log


@pytest.mark.parametrize("window", [None, 40], ids=["causal", "win40"])
def test_probe_kernels_skip_key_blocks_of_padding_only(window):
    """Key blocks holding only padding (left and right) are not read: NaN keys there leave the
    probes and their gradients finite and equal to those of zeroed padded keys (a kernel that
    scanned them would put NaN into dq through k^T @ dS). Rows of padding longer than the
    largest key block any tile uses (64)."""
    g = fresh_generator()
    lk, pad_l, pad_r = 200, 130, 65
    q = torch.randn(2, 4, lk, 64, generator=g, device="cpu").to(DEV)
    k = torch.randn(2, 2, lk, 64, generator=g, device="cpu").to(DEV)
    kpm = torch.ones(2, lk, dtype=torch.bool, device=DEV)
    kpm[0, :pad_l] = False
    kpm[1, lk - pad_r:] = False
    rows = torch.tensor([[lk - 1, 150, -1], [lk - pad_r - 1, 70, 3]], device=DEV)
    cols = torch.tensor([[135, 180, 199, 0], [10, 120, 134, 199]], device=DEV)
    dead = torch.zeros_like(kpm)
    dead[0, :128] = True  # key blocks of padding only, for blocks of 16, 32 and 64 keys
    dead[1, 192:] = True
    results = []
    for poison in (False, True):
        kk = k.clone()
        kk.masked_fill_(~kpm[:, None, :, None], 0.0)
        if poison:
            kk.masked_fill_(dead[:, None, :, None], float("nan"))
        qg, kg = q.clone().requires_grad_(), kk.requires_grad_()
        p, _ = probe_rows_op(qg, kg, kpm, rows, cols, True, 0.125, window or 0)
        dq, dk = torch.autograd.grad((p * torch.arange(4.0, device=DEV)).sum(), (qg, kg))
        results.append((p, dq, dk.masked_fill(~kpm[:, None, :, None], 0.0)))
    for clean, poisoned in zip(*results):
        assert torch.isfinite(poisoned).all()
        torch.testing.assert_close(poisoned, clean, rtol=0, atol=0)
    assert results[0][0].abs().sum() > 0
