"""abft_fast.column_scores (torch and triton backends) against a float64 reference built from
attention_reference's full probability rows, summed over the chosen rows.

Rule (DESIGN.md section 5): the triton error <= 2x the torch backend's same-dtype error + a floor;
float32 also within 2e-5 relative outright. Fresh random inputs each run; the kernel's outputs are
poisoned (every torch.empty starts as NaN) so that an element never written shows up.
"""
import importlib

import pytest
import torch
from cases import Case, fresh_generator, make_inputs, rel_err

import abft_fast
from abft_fast.ops.attention import triton_available
from abft_fast.ops.reference import attention_reference

cs_mod = importlib.import_module("abft_fast.ops.column_scores")  # the module, not the function
DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_available(torch.device(DEV))[0],
                                  reason=triton_available(torch.device(DEV))[1] or "triton")


def _fresh():
    return fresh_generator()


def _poisoned_empty(monkeypatch):
    real = torch.empty

    def empty(*a, **kw):
        t = real(*a, **kw)
        return t.fill_(float("nan") if t.dtype.is_floating_point else -1)
    monkeypatch.setattr(torch, "empty", empty)


def _inputs(case: Case, rows_kind: str, gen):
    """Float64 q, k, padding mask and rows: None (all rows) or [B, R] with the last row, a
    duplicate of it, random rows and an unused (-1) slot."""
    inp = make_inputs(case, gen)
    rows = None
    if rows_kind == "subset":
        rows = torch.randint(0, case.lq, (case.b, 6), generator=gen)
        rows[:, 0] = case.lq - 1
        rows[:, 1] = case.lq - 1  # counted twice
        rows[:, -1] = -1
    return inp["q"], inp["k"], inp["kpm"], rows


def reference(q, k, rows, case: Case, kpm):
    """[B, Hq, Lk] float64: full probability rows of the reference, gathered at rows, summed."""
    b, lq = q.shape[0], q.shape[2]
    r = torch.arange(lq).expand(b, -1) if rows is None else rows
    _, _, p = attention_reference(q, k, k, causal=case.causal, scale=case.scale,
                                  key_padding_mask=kpm, window=case.window, probe_rows=r)
    return p.sum(2)


def call(q, k, rows, case: Case, kpm, backend, dtype):
    dev = DEV if backend == "triton" else "cpu"
    out = abft_fast.column_scores(
        q.to(dev, dtype), k.to(dev, dtype), rows=None if rows is None else rows.to(dev),
        causal=case.causal, scale=case.scale, key_padding_mask=None if kpm is None else kpm.to(dev),
        window=case.window, backend=backend)
    assert out.shape == (q.shape[0], q.shape[1], k.shape[2])
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    return out.cpu().double()


# GQA, padding left / right / random, windows, Lq < Lk (causal bottom-right), non-causal, Lk not
# a multiple of the tile; L <= 64 and D 16 / 32 for the interpreter.
CASES = [
    Case(2, 4, 2, 37, 37, 16, padding="left"),
    Case(2, 6, 2, 33, 33, 32, window=5, padding="right"),
    Case(2, 4, 1, 20, 20, 16, causal=False, padding="random"),
    Case(2, 4, 2, 13, 45, 16, padding="left"),  # Lq < Lk: queries are the last 13 positions
    Case(1, 2, 2, 9, 40, 32, window=7, padding="random"),  # window with Lq < Lk
    Case(1, 3, 1, 64, 64, 16, scale=0.3),
]
ROWS = ["all", "subset"]


@pytest.mark.parametrize("rows_kind", ROWS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_torch_matches_reference(case, rows_kind):
    q, k, kpm, rows = _inputs(case, rows_kind, _fresh())
    ref = reference(q, k, rows, case, kpm)
    assert float(ref.abs().sum()) > 0
    got64 = call(q, k, rows, case, kpm, "torch", torch.float64)
    assert rel_err(got64, ref) <= 1e-12
    got32 = call(q, k, rows, case, kpm, "torch", torch.float32)
    assert rel_err(got32, ref) <= 2e-5


@needs_triton
@pytest.mark.parametrize("rows_kind", ROWS)
@pytest.mark.parametrize("case", CASES[:5], ids=str)
def test_triton_fp32_matches_reference(case, rows_kind, monkeypatch):
    q, k, kpm, rows = _inputs(case, rows_kind, _fresh())
    ref = reference(q, k, rows, case, kpm)
    tor = call(q, k, rows, case, kpm, "torch", torch.float32)
    _poisoned_empty(monkeypatch)
    got = call(q, k, rows, case, kpm, "triton", torch.float32)
    monkeypatch.undo()
    e_t, e_f = rel_err(tor, ref), rel_err(got, ref)
    assert e_f <= 2e-5, e_f
    assert e_f <= 2 * e_t + 1e-6, (e_f, e_t)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case,rows_kind", [(CASES[0], "all"), (CASES[1], "subset"),
                                            (CASES[3], "all")], ids=str)
def test_triton_half_rule(case, rows_kind, dtype):
    q, k, kpm, rows = _inputs(case, rows_kind, _fresh())
    ref = reference(q, k, rows, case, kpm)
    tor = call(q, k, rows, case, kpm, "torch", dtype)
    got = call(q, k, rows, case, kpm, "triton", dtype)
    e_t, e_f = rel_err(tor, ref), rel_err(got, ref)
    assert e_f <= 2 * e_t + 1e-3, (e_f, e_t)


def _masked_case():
    """Sample 0 sees nothing at all; sample 1's rows < 6 see only padding (no visible key)."""
    g = _fresh()
    b, hq, hkv, l, d = 2, 4, 2, 24, 16
    q = torch.randn(b, hq, l, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, l, d, generator=g, dtype=torch.float64)
    kpm = torch.zeros(b, l, dtype=torch.bool)
    kpm[1, 6:] = True
    rows = torch.tensor([[0, 23, -1], [2, 23, 4]])
    return q, k, kpm, rows


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_fully_masked_rows_give_zero_not_nan(backend):
    q, k, kpm, rows = _masked_case()
    case = Case(2, 4, 2, 24, 24, 16)
    for r in (None, rows):
        got = call(q, k, r, case, kpm, backend, torch.float32)
        assert torch.isfinite(got).all()
        assert torch.all(got[0] == 0)
        assert torch.all(got[1, :, :6] == 0)  # padded keys get nothing
        ref = reference(q, k, r, case, kpm)
        assert rel_err(got, ref) <= 2e-5
    # every non-empty row's probabilities sum to 1: the total is the number of such rows
    total = call(q, k, None, case, kpm, backend, torch.float32).sum(-1)
    torch.testing.assert_close(total[1], torch.full((4,), 18.0, dtype=torch.float64), rtol=1e-5,
                               atol=1e-5)
    sub = call(q, k, rows, case, kpm, backend, torch.float32).sum(-1)
    # rows 2 and 4 are empty, row 23 is not
    torch.testing.assert_close(sub[1], torch.full((4,), 1.0, dtype=torch.float64), rtol=1e-5,
                               atol=1e-5)


@needs_triton
def test_triton_many_rows_and_tiles(monkeypatch):
    """R larger than one row tile, duplicates across tiles, Lk not a multiple of the key tile."""
    g = _fresh()
    case = Case(1, 2, 1, 30, 50, 16, padding="left")
    q, k, kpm, _ = _inputs(case, "all", g)
    rows = torch.randint(-1, 30, (1, 37), generator=g)
    rows[0, :3] = 29
    ref = reference(q, k, rows, case, kpm)
    _poisoned_empty(monkeypatch)
    got = call(q, k, rows, case, kpm, "triton", torch.float32)
    monkeypatch.undo()
    assert rel_err(got, ref) <= 2e-5


def test_torch_all_rows_is_blocked_over_queries(monkeypatch):
    """With a tiny block budget the all-rows torch path runs 16-row blocks (never [Lq, Lk])."""
    calls = []
    real = cs_mod._probs

    def spy(s, vis):
        calls.append(tuple(s.shape))
        return real(s, vis)
    monkeypatch.setattr(cs_mod, "BLOCK_BUDGET", 1)
    monkeypatch.setattr(cs_mod, "_probs", spy)
    case = Case(2, 4, 2, 40, 40, 16, window=6, padding="right")
    q, k, kpm, _ = _inputs(case, "all", _fresh())
    got = call(q, k, None, case, kpm, "torch", torch.float32)
    assert len(calls) == 3 and all(c[2] <= 16 and c[3] < 40 for c in calls), calls
    assert rel_err(got, reference(q, k, None, case, kpm)) <= 2e-5


def test_auto_is_torch_on_cpu_and_empty_rows():
    q = torch.randn(1, 2, 8, 16)
    k = torch.randn(1, 1, 8, 16)
    if DEV == "cpu":
        assert torch.equal(abft_fast.column_scores(q, k), abft_fast.column_scores(
            q, k, backend="torch"))
    z = abft_fast.column_scores(q, k, rows=torch.zeros(1, 0, dtype=torch.long), backend="torch")
    assert z.shape == (1, 2, 8) and torch.all(z == 0)


def test_argument_errors():
    q = torch.randn(2, 4, 8, 16)
    k = torch.randn(2, 2, 8, 16)
    cs = abft_fast.column_scores
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        cs(q.numpy(), k)
    with pytest.raises(ValueError, match="k must be 4-D"):
        cs(q, k[0])
    with pytest.raises(TypeError, match="q and k must share one dtype"):
        cs(q, k.double())
    with pytest.raises(ValueError, match="multiple of k heads"):
        cs(q, torch.randn(2, 3, 8, 16))
    with pytest.raises(ValueError, match="k head dim"):
        cs(q, torch.randn(2, 2, 8, 8))
    with pytest.raises(TypeError, match="rows must be int64"):
        cs(q, k, rows=torch.zeros(2, 1))
    with pytest.raises(ValueError, match="rows must have shape"):
        cs(q, k, rows=torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"rows values must lie in \[-1, 8\)"):
        cs(q, k, rows=torch.full((2, 1), 8))
    with pytest.raises(ValueError, match=r"rows values must lie in \[-1, 8\)"):
        cs(q, k, rows=torch.full((2, 1), -2))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        cs(q, k, key_padding_mask=torch.ones(2, 7, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask must be bool"):
        cs(q, k, key_padding_mask=torch.ones(2, 8))
    with pytest.raises(ValueError, match="window .* requires causal"):
        cs(q, k, causal=False, window=3)
    with pytest.raises(ValueError, match="window must be a positive int"):
        cs(q, k, window=0)
    with pytest.raises(TypeError, match="causal must be a bool"):
        cs(q, k, causal=1)
    with pytest.raises(TypeError, match="scale must be a finite"):
        cs(q, k, scale=float("nan"))
    with pytest.raises(ValueError, match="backend must be one of"):
        cs(q, k, backend="sdpa")
    if DEV == "cpu" and not triton_available(torch.device("cpu"))[0]:
        with pytest.raises(RuntimeError, match="backend='triton' is not available"):
            cs(q, k, backend="triton")
    if triton_available(torch.device(DEV))[0]:
        with pytest.raises(TypeError, match="float64"):
            cs(q.double().to(DEV), k.double().to(DEV), backend="triton")


def test_gradient_error():
    q = torch.randn(1, 2, 8, 16, requires_grad=True)
    k = torch.randn(1, 2, 8, 16)
    with pytest.raises(RuntimeError, match="does not support gradients; call it under "
                                           r"torch.no_grad\(\) or detach q and k"):
        abft_fast.column_scores(q, k)
    with pytest.raises(RuntimeError, match="does not support gradients"):
        abft_fast.column_scores(q.detach(), k.requires_grad_())
    with torch.no_grad():
        out = abft_fast.column_scores(q, k)
    assert not out.requires_grad
    assert not abft_fast.column_scores(q.detach(), k.detach()).requires_grad


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("rows_kind", ["rows", "all"])
def test_zero_padded_queries_count_nothing(backend, rows_kind):
    """A Padding(zero_padded_queries=True): padded query rows see no key, so they add 0 (the
    float64 reference with the same rule, summed over the rows)."""
    g = fresh_generator()
    b, hq, hkv, lq, lk, d = 2, 4, 2, 9, 23, 16
    q = torch.randn(b, hq, lq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, lk, d, generator=g, dtype=torch.float64)
    kpm = torch.ones(b, lk, dtype=torch.bool)
    kpm[0, 18:] = False  # right padding: query rows 4.. of batch 0 are padded
    rows = torch.tensor([[8, 2, 7, -1], [0, 3, 8, 8]]) if rows_kind == "rows" else None
    pad = abft_fast.Padding.of(kpm, zero_padded_queries=True)
    _, _, p = attention_reference(q, k, k, key_padding_mask=kpm, zero_padded_queries=True,
                                  probe_rows=rows if rows is not None
                                  else torch.arange(lq).expand(b, -1))
    want = p.sum(2)
    dt = torch.float64 if backend == "torch" else torch.float32
    got = abft_fast.column_scores(q.to(dt), k.to(dt), rows=rows, key_padding_mask=pad,
                                  backend=backend)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert float(want[0].sum()) < float(want[1].sum())  # batch 0 lost its padded rows
