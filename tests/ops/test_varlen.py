"""Output provider "varlen" (ops/varlen.py): the unpad / re-pad layout around PyTorch's varlen
flash kernel, against the float64 reference, forward and backward. Without a GPU the vendor
kernel is replaced by ``varlen.naive_kernel`` (the same contract in plain torch); the GPU test
runs the vendor kernel itself. Also: ``Padding``, zeroed padded query rows on every backend, the
cases varlen refuses, the kernel detection, no host read per call, ``auto``'s order."""
import dataclasses
import functools
import importlib

import cases
import pytest
import torch
from cases import (
    RANDOM_CASES,
    Case,
    NoHostReads,
    check_rel,
    check_rule,
    fresh_generator,
    make_inputs,
    poison_empty,
    rel_err,
)

import abft_fast
from abft_fast.ops import spec as spec_module
from abft_fast.ops import varlen
from abft_fast.ops.reference import attention_reference
from abft_fast.ops.spec import make_spec

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
attention_module = importlib.import_module("abft_fast.ops.attention")  # the module, not the op


@pytest.fixture
def naive():
    """The naive kernel in place of the vendor one (what a CPU can run)."""
    k = varlen.use_naive_kernel()
    yield k
    varlen.reset_kernel()


@dataclasses.dataclass
class VCase(Case):
    zero_queries: bool = False  # Padding(zero_padded_queries=...)
    empty_row: bool = False     # batch row 0 without any real token

    def __str__(self):
        s = super().__str__()
        return s + ("-zeroq" if self.zero_queries else "") + ("-emptyrow" if self.empty_row
                                                                else "")


# The varlen domain: contiguous padding (left; right or both with zeroed padded queries), a window
# alone, GQA / MQA, Lq < Lk, non-causal, a row without real tokens, window 1.
CASES = [
    VCase(2, 6, 2, 29, 29, 16, padding="left"),
    VCase(2, 4, 2, 40, 40, 32, window=7, padding="left"),
    VCase(3, 4, 1, 33, 33, 64, padding="right", zero_queries=True, r=3, c=None),
    VCase(2, 4, 2, 37, 37, 32, window=5, padding="right", zero_queries=True),
    VCase(2, 4, 4, 31, 31, 16, window=9),
    VCase(2, 4, 2, 9, 31, 32, padding="left"),
    VCase(2, 4, 2, 9, 31, 32, padding="right", zero_queries=True),
    VCase(3, 2, 2, 23, 23, 16, causal=False, padding="right"),
    VCase(2, 2, 1, 17, 17, 80, window=1, padding="left", r=4, c=5),
    VCase(3, 4, 2, 21, 21, 16, padding="left", empty_row=True),
    VCase(2, 4, 2, 21, 21, 16, padding="right", zero_queries=True, empty_row=True),
    VCase(2, 2, 2, 19, 19, 16, padding="left", r=0, c=2),
]


def inputs(case: VCase):
    inp = make_inputs(case, fresh_generator())
    kpm = inp["kpm"]
    if case.empty_row:
        kpm[0] = False
    if kpm is not None and case.zero_queries:  # probe rows on real queries, as ABFT's are
        inp["probes_see_keys"] = False  # make_inputs judged it without zeroed padded rows
        qm = abft_fast.Padding.of(kpm).query_mask(case.lq)
        for b in range(case.b):
            real = qm[b].nonzero().flatten()
            rows = inp["rows"][b]
            if len(real):
                rows[rows >= 0] = real[torch.arange(int((rows >= 0).sum())) % len(real)]
    cols = inp["cols"]
    if cols is not None and cols.shape[1] > 0 and inp["rows"].shape[1] > 0:
        for b in range(case.b):  # the last column: the first probe row's own key, which it sees
            r0 = int(inp["rows"][b, 0])
            pos = r0 + case.lk - case.lq
            if r0 >= 0 and 0 <= pos and (kpm is None or bool(kpm[b, pos])):
                cols[b, -1] = pos
                inp["probes_see_keys"] = True
    return inp


def run(case: VCase, inp, dtype, backend):
    """``cases.run`` with the mask as a Padding (``case.zero_queries``); backend None: the
    float64 reference with the same rule."""
    if backend is None:
        return cases.run(functools.partial(attention_reference,
                                           zero_padded_queries=case.zero_queries),
                         case, inp, dtype)

    def fn(*a, key_padding_mask, **kw):
        pad = None if key_padding_mask is None else abft_fast.Padding.of(
            key_padding_mask, zero_padded_queries=case.zero_queries)
        return abft_fast.attention(*a, key_padding_mask=pad, backend=backend, **kw)
    return cases.run(fn, case, inp, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_varlen_matches_reference(case, dtype, naive, monkeypatch):
    inp = inputs(case)
    ref = run(case, inp, torch.float64, None)
    if inp["probes_see_keys"]:  # else the probe gradient would go unchecked
        assert ref["probs"].abs().sum() > 0
    same = run(case, inp, dtype, "torch")  # PyTorch in the same precision
    poison_empty(monkeypatch)
    got = run(case, inp, dtype, "varlen")
    monkeypatch.undo()
    check_rule(got, same, ref, floor=1e-3)


@pytest.mark.parametrize("case", CASES[:4], ids=str)
def test_varlen_fp32_naive_is_exact_layout(case, naive):
    """In float32 (the naive kernel takes it) the layout adds no error beyond rounding."""
    inp = inputs(case)
    check_rel(run(case, inp, torch.float32, "varlen"), run(case, inp, torch.float64, None), 2e-5)


@pytest.mark.parametrize("backend", ["torch", "triton", "sdpa"])
def test_zero_padded_queries_on_every_backend(backend):
    """Padding(zero_padded_queries=True): padded query rows give out 0 and probes 0 whatever
    runs (the fused kernel and torch by a masked fill after the call)."""
    case = VCase(2, 4, 2, 24, 24, 16, padding="right", zero_queries=True, r=3, c=None)
    if backend == "sdpa":  # unmasked only: a key padding mask is refused by name
        with pytest.raises(ValueError, match="unmasked attention only"):
            run(case, inputs(case), torch.float32, backend)
        return
    inp = inputs(case)
    inp["kpm"][0, 18:] = False  # whatever the draw, some right padding
    inp["rows"][:, -1] = 23  # a padded query row as a probe row: its probes must be 0
    got = run(case, inp, torch.float32, backend)
    ref = run(case, inp, torch.float64, None)
    check_rel(got, ref, 2e-4)
    pad_rows = ~inp["kpm"]
    assert pad_rows.any()
    assert (got["out"].permute(0, 2, 1, 3)[pad_rows] == 0).all()


def test_padding_reads_the_mask_once():
    m = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [0, 1, 0, 1, 0]])
    p = abft_fast.Padding.of(m)
    assert (p.starts, p.ends, p.counts) == ((2, 0, 0, 1), (5, 3, 0, 4), (3, 3, 0, 2))
    assert not p.contiguous and abft_fast.Padding.of(m[:3]).contiguous
    assert p.mask.dtype == torch.bool and abft_fast.Padding.of(p) is p
    assert p.query_mask(3).tolist() == m[:, 2:].bool().tolist()
    assert p.query_mask(7)[:, :2].sum() == 0 and p.query_mask(7)[:, 2:].tolist() == m.bool(
    ).tolist()
    with pytest.raises(ValueError, match="0 or 1"):
        abft_fast.Padding.of(m * 2)
    with pytest.raises(TypeError, match="bool or 0/1 integer"):
        abft_fast.Padding.of(m.float())
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        abft_fast.Padding.of(m[0])
    q = torch.randn(4, 2, 5, 8)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \[B, Lk\]"):
        abft_fast.attention(q, q, q, key_padding_mask=abft_fast.Padding.of(m[:, :4]))


def test_what_varlen_refuses(naive):
    g = fresh_generator()
    q = torch.randn(2, 4, 10, 16, generator=g, dtype=torch.bfloat16)
    holes = torch.tensor([[1, 0, 1] + [1] * 7, [1] * 10]).bool()
    right = torch.tensor([[1] * 7 + [0] * 3, [1] * 10]).bool()

    def call(**kw):
        return abft_fast.attention(q, q, q, backend="varlen", **kw)

    with pytest.raises(ValueError, match="holes"):
        call(key_padding_mask=abft_fast.Padding.of(holes))
    with pytest.raises(ValueError, match="right padding with causal attention.*"
                                         "zero_padded_queries=True"):
        call(key_padding_mask=abft_fast.Padding.of(right))
    call(key_padding_mask=abft_fast.Padding.of(right), causal=False)  # non-causal: exact
    call(key_padding_mask=right.flip(1))  # a tensor mask, by name: read here, then it runs
    with pytest.raises(ValueError, match="multiple of 8"):
        x = torch.randn(1, 2, 8, 12, dtype=torch.bfloat16)
        abft_fast.attention(x, x, x, backend="varlen")
    varlen.reset_kernel()
    kern = varlen.find_kernel()
    if kern is not None:  # the vendor kernel: CUDA, 16-bit
        with pytest.raises(RuntimeError, match="needs CUDA tensors"):
            call(window=3)
    x = q.double().cuda() if torch.cuda.is_available() else None
    if x is not None and kern is not None:
        with pytest.raises(TypeError, match="supports float16, bfloat16 inputs"):
            abft_fast.attention(x, x, x, backend="varlen", window=3)


def test_auto_takes_varlen_only_for_a_padding_it_computes(naive):
    dev = torch.device("cuda")
    q = torch.randn(2, 4, 10, 16, dtype=torch.bfloat16)
    right = torch.tensor([[1] * 7 + [0] * 3, [1] * 10]).bool()
    spec = make_spec(q, q, q, causal=True, scale=None, key_padding_mask=right, window=None,
                     probe_rows=None, probe_cols=None)
    assert attention_module.choose_backend(dev, torch.bfloat16, spec) == ["varlen", "triton",
                                                                          "torch"]
    assert "pass abft_fast.Padding.of(mask)" in varlen.why_unsupported(q, spec)
    zq = dataclasses.replace(spec, padding=abft_fast.Padding.of(right, zero_padded_queries=True))
    assert varlen.supports(q, zq)
    unmasked = dataclasses.replace(spec, key_padding_mask=None)
    assert attention_module.choose_backend(dev, torch.bfloat16, unmasked) == ["sdpa", "torch"]
    assert attention_module.choose_backend(torch.device("cpu"), torch.bfloat16, spec) == ["torch"]


def test_auto_on_cuda_runs_varlen(naive, monkeypatch):
    """``auto`` on a (pretended) GPU sends a Padding it can compute to varlen, a tensor mask to
    the fused kernel: the engine that ran is recorded."""
    ran = []
    for name in ("varlen", "triton"):
        engine = attention_module.ENGINES[name]

        def spy(q, k, v, spec, _real=engine.run, _name=name):
            ran.append(_name)
            return _real(q, k, v, spec)
        monkeypatch.setitem(attention_module.ENGINES, name, dataclasses.replace(engine, run=spy))
    monkeypatch.setattr(attention_module, "choose_backend",
                        lambda device, dtype, spec: ["varlen", "triton", "torch"])
    case = VCase(2, 4, 2, 16, 16, 16, padding="right", zero_queries=True)
    inp = inputs(case)
    inp["kpm"][1, 12:] = False  # whatever the draw, right padding
    got = run(case, inp, torch.bfloat16, "auto")
    case2 = dataclasses.replace(case, zero_queries=False)
    run(case2, inp, torch.bfloat16, "auto")  # causal right padding: not varlen's
    assert ran == ["varlen", "triton"]
    ref = run(case, inp, torch.float64, None)
    assert rel_err(got["out"], ref["out"]) < 2e-2


def test_no_host_read_per_call_once_the_padding_is_read(monkeypatch):
    """The layout is built once per Padding and shape; later calls, forward and backward, probes
    included (Triton probe kernels), read no tensor value (the vendor kernel stands in as a
    function that reads none; value checks as device asserts, as on a GPU)."""
    def fake(q, k, v, cu_q, cu_k, max_q, max_k, scale, window_size, enable_gqa):
        return q * 2
    varlen._found[:] = [varlen.Kernel("fake", fake, True, ("cpu",), (torch.bfloat16,))]
    try:
        m = torch.ones(2, 12, dtype=torch.bool)
        m[0, 8:] = False
        pad = abft_fast.Padding.of(m, zero_padded_queries=True)
        q = torch.randn(2, 4, 12, 16, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(2, 2, 12, 16, dtype=torch.bfloat16, requires_grad=True)
        rows, cols = torch.tensor([[7, 2], [11, -1]]), torch.tensor([[0, 5, 7], [3, -1, 11]])
        kw = dict(key_padding_mask=pad, window=4, probe_rows=rows, probe_cols=cols,
                  backend="varlen")
        abft_fast.attention(q, k, k, **kw)  # builds the layout: the one host read
        monkeypatch.setattr(spec_module, "checks_on_host", lambda device: False)  # GPU policy
        mode = NoHostReads()
        with mode:
            out, probs = abft_fast.attention(q, k, k, **kw)
            (out.float().sum() + probs.sum()).backward()
        assert mode.reads == [] and mode.asserts >= 2
        # the fake doubles q: rows kept are 2 q, the padded query rows 0
        want = (2 * q).detach().masked_fill(~m[:, None, :, None], 0)
        assert torch.equal(out.detach(), want)
    finally:
        varlen.reset_kernel()


def test_kernel_detection_by_feature():
    """This torch (2.13) has varlen_attn with window_size and enable_gqa; the aten fallback's
    schema has cu_seqlens and windows. Both kernels run on meta tensors with GQA and a window,
    and are differentiable."""
    pub, aten = varlen._public_kernel(), varlen._aten_kernel()
    assert pub is not None and pub.gqa and aten is not None and not aten.gqa
    q = torch.randn(10, 4, 16, device="meta", dtype=torch.float16, requires_grad=True)
    k = torch.randn(10, 2, 16, device="meta", dtype=torch.float16, requires_grad=True)
    k4 = torch.randn(10, 4, 16, device="meta", dtype=torch.float16, requires_grad=True)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device="meta")
    for kern, kk in ((pub, k), (aten, k4)):
        for window in ((-1, 0), (3, 0), (-1, -1)):
            out = kern.run(q, kk, kk, cu, cu, 6, 6, 0.25, window, kern.gqa)
            assert out.shape == q.shape and out.grad_fn is not None


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=str)
def test_vendor_varlen_matches_reference_gpu(case):
    """The vendor kernel itself (flash / cuDNN), bf16, on the GPU."""
    varlen.reset_kernel()
    if varlen.find_kernel() is None:
        pytest.skip("this torch has no varlen flash attention")
    inp = {n: (t.cuda() if isinstance(t, torch.Tensor) else t) for n, t in inputs(case).items()}
    ref = run(case, {n: (t.cpu() if isinstance(t, torch.Tensor) else t) for n, t in inp.items()},
              torch.float64, None)
    same = {n: t.cpu() for n, t in run(case, inp, torch.bfloat16, "torch").items()}
    got = {n: t.cpu() for n, t in run(case, inp, torch.bfloat16, "varlen").items()}
    check_rule(got, same, ref, floor=1e-3)


@pytest.mark.parametrize("case", RANDOM_CASES, ids=str)
def test_shared_random_cases(case, naive, monkeypatch):
    """The cases every backend runs, bf16: varlen computes each one it takes within the rule
    (causal right padding with padded query rows zeroed; the reference zeroes them too) and
    refuses, naming why, the one it cannot express (random holes)."""
    zero = case.padding == "right" and case.causal
    vcase = VCase(**dataclasses.asdict(case), zero_queries=zero)
    inp = inputs(vcase)
    if case.padding == "random" and not abft_fast.Padding.of(inp["kpm"]).contiguous:
        with pytest.raises(ValueError, match="holes"):
            run(vcase, inp, torch.bfloat16, "varlen")
        return
    ref = run(vcase, inp, torch.float64, None)
    if inp["probes_see_keys"]:
        assert ref["probs"].abs().sum() > 0
    same = run(vcase, inp, torch.bfloat16, "torch")
    poison_empty(monkeypatch)
    got = run(vcase, inp, torch.bfloat16, "varlen")
    monkeypatch.undo()
    check_rule(got, same, ref, floor=1e-3)


@pytest.mark.parametrize("first", ["eager", "compiled"])
def test_fullgraph_compile_matches_eager(naive, first):
    """torch.compile(fullgraph=True) through the varlen engine with probes (the kernel an opaque
    custom op, as the vendor one is; the layout built while tracing or before): same values and
    gradients as eager."""
    g = fresh_generator()
    q = torch.randn(2, 4, 24, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, 24, 16, generator=g, requires_grad=True) for _ in range(2))
    m = torch.ones(2, 24, dtype=torch.bool)
    m[0, 17:] = False
    m[1, :5] = False
    rows, cols = torch.tensor([[16, 3], [23, 5]]), torch.tensor([[0, 5, 16], [7, 6, 20]])

    def f(q, k, v, pad):
        out, p = abft_fast.attention(q, k, v, key_padding_mask=pad, window=7, probe_rows=rows,
                                     probe_cols=cols, backend="varlen")
        return (out * out).sum() + (p * torch.arange(3.0)).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    order = [f, compiled] if first == "eager" else [compiled, f]
    pad = abft_fast.Padding.of(m, zero_padded_queries=True)
    res = []
    for fn in order:
        loss = fn(q, k, v, pad)
        res.append((loss.detach(), *torch.autograd.grad(loss, (q, k, v))))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
