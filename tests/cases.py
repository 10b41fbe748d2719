"""Random attention cases and the docs/design.md section 7 error rule, shared by the backend tests."""
from __future__ import annotations

import dataclasses

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import abft_fast
from abft_fast.ops import fused, probes
from abft_fast.ops.reference import attention_reference
from abft_fast.ops.spec import make_spec


@dataclasses.dataclass
class Case:
    b: int
    hq: int
    hkv: int
    lq: int
    lk: int
    d: int
    causal: bool = True
    window: int | None = None
    padding: str | None = None  # None | "left" | "right" | "random"
    r: int | None = 2  # probe rows (None = no probes)
    c: int | None = 3  # probe cols (None = full rows)
    unused: bool = True  # put -1 slots into the probes
    scale: float | None = None

    def __str__(self):
        s = f"B{self.b}-H{self.hq}x{self.hkv}-L{self.lq}x{self.lk}-D{self.d}"
        s += "-causal" if self.causal else "-full"
        if self.window:
            s += f"-win{self.window}"
        if self.padding:
            s += f"-pad{self.padding}"
        s += f"-R{self.r}-C{'all' if self.c is None else self.c}"
        return s


# Random cases every backend runs (ids read as shapes: B-H(q x kv)-L(q x k)-D-mask-R-C).
RANDOM_CASES = [
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


SEEDS: list[int] = []    # the seeds the running test drew; conftest.py resets them per test and
REPLAY: list[int] = []   # prints them in a failure report; ABFT_FAST_TEST_SEEDS=a,b,... replays


def fresh_generator() -> torch.Generator:
    """A generator with a fresh seed. A failing test's report lists the seeds it drew and the
    command that replays them (``ABFT_FAST_TEST_SEEDS=...``, consumed in draw order)."""
    seed = REPLAY.pop(0) if REPLAY else torch.seed() % 2**31
    SEEDS.append(seed)
    return torch.Generator().manual_seed(seed)


def poison_empty(monkeypatch):
    """Every torch.empty made while the patch is active starts as NaN (or -1 for integers): an
    element a kernel forgets to write shows up. Undo with monkeypatch.undo()."""
    real = torch.empty

    def empty(*a, **kw):
        t = real(*a, **kw)
        return t.fill_(float("nan") if t.dtype.is_floating_point else -1)
    monkeypatch.setattr(torch, "empty", empty)


def on_device(inp, dev):
    return {n: (t.to(dev) if isinstance(t, torch.Tensor) else t) for n, t in inp.items()}


def make_inputs(case: Case, gen: torch.Generator):
    """Float64 inputs (fresh random values, never zeros) plus random upstream gradients."""
    f = dict(dtype=torch.float64, generator=gen)
    q = torch.randn(case.b, case.hq, case.lq, case.d, **f)
    k = torch.randn(case.b, case.hkv, case.lk, case.d, **f)
    v = torch.randn(case.b, case.hkv, case.lk, case.d, **f)
    kpm = None
    if case.padding:
        kpm = torch.ones(case.b, case.lk, dtype=torch.bool)
        for i in range(case.b):
            n = int(torch.randint(0, max(1, case.lk // 2) + 1, (1,), generator=gen))
            if case.padding == "left":
                kpm[i, :n] = False
            elif case.padding == "right":
                kpm[i, case.lk - n:] = False
            else:
                kpm[i] = torch.rand(case.lk, generator=gen) > 0.3
    rows = cols = None
    seen = False
    if case.r is not None:
        rows = torch.randint(0, case.lq, (case.b, case.r), generator=gen)
        if case.lq > 1 and case.r > 0:
            rows[:, 0] = case.lq - 1  # ABFT probes the last row
        if case.unused and case.r > 1:
            rows[:, -1] = -1
        if case.c is not None:
            cols = torch.randint(0, case.lk, (case.b, case.c), generator=gen)
            if case.c > 0:
                seen = _cols_seen(case, rows, cols, kpm, gen)
            if case.unused and case.c > 1:
                cols[0, 0] = -1
    do = torch.randn(case.b, case.hq, case.lq, case.d, **f)
    nc = case.lk if case.c is None else case.c
    dp = torch.randn(case.b, case.hq, case.r or 0, nc, **f) if rows is not None else None
    return dict(q=q, k=k, v=v, kpm=kpm, rows=rows, cols=cols, do=do, dp=dp, probes_see_keys=seen)


def expected_probes(attentions, rows, cols):
    """Gather [layers, B, H, R, C] from eager attentions [layers][B, H, L, L] (HF's
    output_attentions); -1 slots give 0, cols None gives full rows."""
    a = torch.stack(attentions)
    out = []
    for b in range(rows.shape[0]):
        p = a[:, b][:, :, rows[b].clamp(min=0)]  # [layers, H, R, L]
        p = p * (rows[b] >= 0)[None, None, :, None]
        if cols is not None:
            p = p[..., cols[b].clamp(min=0)] * (cols[b] >= 0)
        out.append(p)
    return torch.stack(out, 1)


def _cols_seen(case: Case, rows, cols, kpm, gen):
    """Uniform columns can all land on keys no probe row sees (padding, the causal limit, a
    window: the window-7 case in 38 % of seeds), leaving every probe 0 and its gradient unchecked.
    Per batch row, the last half of the column slots take keys that the first probe row able to
    see any key sees. Returns whether any batch row got such columns (False: no probe row sees a
    key, a valid hard case)."""
    offset, seen = case.lk - case.lq, False
    for b in range(case.b):
        for r in rows[b].tolist():
            if r < 0:  # an unused slot
                continue
            i = r + offset
            lo = max(0, i - case.window + 1) if case.causal and case.window is not None else 0
            hi = min(case.lk, i + 1) if case.causal else case.lk
            keys = [j for j in range(lo, hi) if kpm is None or bool(kpm[b, j])]
            if keys:
                n = max(1, case.c // 2)
                pick = torch.randint(0, len(keys), (n,), generator=gen)
                cols[b, case.c - n:] = torch.tensor(keys)[pick]
                seen = True
                break
    return seen


def run(fn, case: Case, inp, dtype, **kw):
    """Run ``fn`` (abft_fast.attention or the reference) in ``dtype``; return outputs and grads."""
    q, k, v = (inp[n].to(dtype).requires_grad_() for n in ("q", "k", "v"))
    res = fn(q, k, v, causal=case.causal, scale=case.scale, key_padding_mask=inp["kpm"],
             window=case.window, probe_rows=inp["rows"], probe_cols=inp["cols"], **kw)
    out, probs = res[0], res[-1]
    loss = (out.double() * inp["do"]).sum()
    if probs is not None:
        loss = loss + (probs.double() * inp["dp"]).sum()
    # an input no output depends on (every query row a zeroed padded row) gets a zero gradient
    dq, dk, dv = torch.autograd.grad(loss, (q, k, v), allow_unused=True, materialize_grads=True)
    r = dict(out=out, dq=dq, dk=dk, dv=dv)
    if probs is not None:
        r["probs"] = probs
    return {n: t.detach().double() for n, t in r.items()}


def reference(case, inp):
    ref = run(attention_reference, case, inp, torch.float64)
    if inp.get("probes_see_keys"):
        assert ref["probs"].abs().sum() > 0, (
            f"{case}: every probe is 0 although a probe row sees the keys chosen for it: the probe "
            "gradient would go unchecked")
    return ref


def rel_err(x, ref):
    """Norm-wise relative error; for an exactly zero reference (e.g. dq with a single visible key,
    where P = 1 is constant) the RMS of x, i.e. the error in units of the unit-variance inputs
    (a fused kernel's cancellation leaves rounding there that autograd's exact 0 does not)."""
    assert torch.isfinite(x).all(), "non-finite values"
    den = ref.norm()
    if den > 0:
        return float((x - ref).norm() / den)
    return float(x.norm() / max(1, x.numel()) ** 0.5)


def check_rel(got, ref, tol, names=None):
    """Every tensor within ``tol`` relative (norm-wise) error of the float64 reference."""
    for n in names or ref:
        assert got[n].shape == ref[n].shape, (n, got[n].shape, ref[n].shape)
        e = rel_err(got[n], ref[n])
        assert e <= tol, f"{n}: relative error {e:.3g} > {tol:.3g}"


def check_rule(got, torch_same, ref, floor):
    """docs/design.md section 7: fused error <= 2x PyTorch same-dtype error + floor."""
    for n in ref:
        e_f = rel_err(got[n], ref[n])
        e_t = rel_err(torch_same[n], ref[n])
        assert e_f <= 2 * e_t + floor, f"{n}: fused error {e_f:.3g} > 2 x torch {e_t:.3g} + {floor}"


def attention_fn(backend):
    def fn(*a, **kw):
        return abft_fast.attention(*a, backend=backend, **kw)
    return fn


def spec_of(q, k, v, causal=True, scale=None, key_padding_mask=None, window=None, probe_rows=None,
            probe_cols=None):
    """The checked AttentionSpec of a call, for tests that call a backend module directly."""
    return make_spec(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                     window=window, probe_rows=probe_rows, probe_cols=probe_cols)


# Ops that read a tensor value back to the host (.item(), bool(t), int(t), torch.equal).
HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default,
              torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default}


_IMPLS = {op._qualname: op._init_fn for op in (
    fused.fused_attention_op, fused.fused_attention_backward_op, probes.probe_rows_op,
    probes.probe_rows_op.backward_op)}


class NoHostReads(TorchDispatchMode):
    """Records every value read-back; the op's own torch.library ops are entered with the mode
    still active so that what runs inside them is seen too."""

    def __init__(self):
        super().__init__()
        self.reads, self.asserts = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.reads.append(str(func))
        if func is torch.ops.aten._assert_async.msg:
            self.asserts += 1
        impl = _IMPLS.get(func.name())
        if impl is not None:  # run the op's body under the mode (calling func would recurse)
            with self:
                return impl(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))
