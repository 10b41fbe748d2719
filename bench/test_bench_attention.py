"""Attention op benchmarks: forward, backward and both, with and without probes.

Methods (``method`` column):
  abft_auto / abft_sdpa / abft_triton / abft_cuda / abft_torch  ``abft_fast.attention(...,
      backend=...)``; with probes it also returns P[probe rows, probe cols]. abft_sdpa = the best
      SDPA kernel for the output + the Triton probe kernels (unmasked shapes only); abft_torch =
      SDPA + probe rows recomputed in PyTorch, i.e. the "SDPA + recompute" baseline.
  sdpa_flash / sdpa_cudnn / sdpa_efficient / sdpa_math  ``F.scaled_dot_product_attention`` pinned
      to one backend with ``sdpa_kernel`` (no probes).
  flex  FlexAttention (compiled on CUDA, except at smoke sizes) returning its log-sum-exp; with
      probes, P = exp(s - lse) at the probe entries (``abft_fast.ops.probe_math.probe_probs_from_lse``),
      backward through lse.
  eager  matmul + float32 softmax + matmul (L x L matrix); with probes, gathered from that matrix
      (the ``output_attentions`` way).
Modes: fwd (training forward, inputs require grad), bwd (backward only; the forward runs in the
untimed setup), both. Causal throughout. Masks (``mask`` column, never compare rows of different
masks): none; pad-left / pad-right (each sequence's real length drawn from 50-100% of L; abft_*
get the [B, L] key padding mask as HF's integration gives it, ``Padding(zero_padded_queries=
True)``, the SDPA backends and eager a dense [B, 1, L, L] bool mask, FlexAttention a block mask);
window (sliding window, flags for abft_*, a dense mask for SDPA). abft_varlen = PyTorch's varlen
flash kernel for the output + the probe kernels (masked shapes only). Padded query rows (whose
output no real token reads) and rows that see no key get a zero output gradient and are left out
of the reference check, so that every method's results mean the same. Recorded per case: median
wall ms (host work and one synchronisation per
call included), TFLOP/s (FLOPs of benchlib.attention_flops, from the wall ms) and, on CUDA,
peak_mem_mb = peak allocated during the timed rounds above what was allocated before them (the
inputs), so for bwd it includes the setup's forward; event_ms (GPU time by CUDA events around
back-to-back calls) and graph_ms (CUDA-graph replay of the mode's work, or empty with
graph_reason when capture fails), both empty without CUDA (benchlib, "GPU kernel time").
"""
from __future__ import annotations

import functools

import benchlib
import pytest
import torch
import torch.nn.functional as F

_unavailable: dict = {}  # method -> reason (probed once per session)


def _method_unavailable(method, dev):
    if method in _unavailable:
        return _unavailable[method]
    why = None
    try:
        if method.startswith("abft_"):
            import abft_fast
            backend = method[5:]
            if backend == "cuda" and dev.type != "cuda":
                why = "abft_fast backend 'cuda' needs a CUDA GPU"
            elif backend == "varlen":  # a 16-bit windowed call: the case it exists for
                x = torch.randn(1, 1, 16, 16, device=dev, dtype=torch.bfloat16)
                abft_fast.attention(x, x, x, window=4, backend=backend)
            else:
                x = torch.randn(1, 1, 16, 16, device=dev)
                abft_fast.attention(x, x, x, backend=backend)
        elif method in ("sdpa_cudnn", "sdpa_efficient") and dev.type != "cuda":
            why = f"{method} needs a CUDA GPU"
        elif method == "flex":
            from torch.nn.attention import flex_attention  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any failure means: not usable here
        why = f"{method} unavailable: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    _unavailable[method] = why
    return why


@functools.cache
def _flex(compiled):
    from torch.nn.attention import flex_attention as fa
    fn = fa.flex_attention
    if compiled:
        # one compilation per shape; past dynamo's default recompile limit (8) flex would silently
        # fall back to its unfused eager path
        import torch._dynamo.config as dc
        for name, lo in (("recompile_limit", 256), ("cache_size_limit", 256),
                         ("accumulated_recompile_limit", 4096),
                         ("accumulated_cache_size_limit", 4096)):
            if isinstance(getattr(dc, name, None), int):
                setattr(dc, name, max(getattr(dc, name), lo))
        fn = torch.compile(fn, dynamic=False)
    return fn, getattr(fa, "AuxRequest", None)


def _block_mask(L, dev, kpm=None, window=None):
    from torch.nn.attention.flex_attention import create_block_mask
    if kpm is None and window is None:
        return _causal_block_mask(L, dev)

    def mask_mod(b, h, i, j):
        ok = i >= j
        if window is not None:
            ok = ok & (i - j < window)
        if kpm is not None:
            ok = ok & kpm[b, j]
        return ok
    b = None if kpm is None else kpm.shape[0]
    return create_block_mask(mask_mod, b, None, L, L, device=dev)


@functools.lru_cache(maxsize=1)  # cases of one shape run one after another
def _causal_block_mask(L, dev):
    from torch.nn.attention.flex_attention import create_block_mask
    return create_block_mask(lambda b, h, i, j: i >= j, None, None, L, L, device=dev)


@functools.lru_cache(maxsize=1)
def _causal_mask(L, dev):
    return torch.ones(L, L, dtype=torch.bool, device=dev).tril()


def _padding(s: benchlib.OpShape, g, dev):
    """[B, L] key padding mask of a padded shape: real lengths uniform in [L/2, L]."""
    if not s.mask.startswith("pad"):
        return None
    kpm = torch.zeros(s.B, s.L, dtype=torch.bool)
    for i in range(s.B):
        n = int(torch.randint(s.L // 2, s.L + 1, (1,), generator=g))
        if s.mask == "pad-left":
            kpm[i, s.L - n:] = True
        else:
            kpm[i, :n] = True
    return kpm.to(dev)


def _sdpa_backend(method):
    from torch.nn.attention import SDPBackend
    return {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
            "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
            "sdpa_math": SDPBackend.MATH}[method]


def _gather_probs(p, rows, cols):
    b, h, _, lk = p.shape
    pr = torch.gather(p, 2, rows[:, None, :, None].expand(b, h, rows.shape[1], lk))
    if cols is None:
        return pr
    return torch.gather(pr, 3, cols[:, None, None, :].expand(b, h, rows.shape[1], cols.shape[1]))


class OpCase:
    """Inputs and the callables of one (method, mode, probes, shape)."""

    def __init__(self, method, mode, probes, s: benchlib.OpShape, dev, compile_flex=True):
        self.method, self.mode, self.probes, self.s, self.dev = method, mode, probes, s, dev
        self.compile_flex = compile_flex and dev.type == "cuda"
        g = torch.Generator(device="cpu").manual_seed(0)
        dt = s.torch_dtype

        def rnd(*shape):
            return torch.randn(*shape, generator=g).to(device=dev, dtype=dt)

        grad = not (method == "flex" and dev.type == "cpu")  # FlexAttention: no CPU backward
        self.q = rnd(s.B, s.Hq, s.L, s.D).requires_grad_(grad)
        self.k = rnd(s.B, s.Hkv, s.L, s.D).requires_grad_(grad)
        self.v = rnd(s.B, s.Hkv, s.L, s.D).requires_grad_(grad)
        self.scale = s.D ** -0.5
        self.kpm = _padding(s, g, dev)
        self.padding = None  # what abft_* get: the mask read once, as the HF integration does
        if self.kpm is not None:
            import abft_fast
            self.padding = abft_fast.Padding.of(self.kpm, zero_padded_queries=True)
        self.window = s.window if s.mask == "window" else None
        # the last R real tokens (ABFT probes the last one)
        last = torch.full((s.B, 1), s.L - 1) if self.kpm is None else torch.tensor(
            self.padding.ends).unsqueeze(1) - 1
        self.rows = (last - torch.arange(s.R)).to(dev)
        self.cols = None
        if s.C is not None:
            self.cols = torch.stack([torch.randperm(s.L - s.R, generator=g)[:s.C].sort().values
                                     for _ in range(s.B)]).to(dev)
        self.dout = rnd(s.B, s.Hq, s.L, s.D)
        self.dense = None  # [B, 1, L, L] visibility for the SDPA / eager peers of masked shapes
        if s.mask != "none":
            from abft_fast.ops.masks import visible
            r = torch.arange(s.L, device=dev).expand(s.B, -1)
            vis = visible(r, torch.arange(s.L, device=dev), lq=s.L, lk=s.L, causal=True,
                          window=self.window, key_padding_mask=self.kpm)
            has = vis.any(-1, keepdim=True)
            live = has if self.kpm is None else has & self.kpm.unsqueeze(-1)  # real query rows
            self.dout = self.dout * live.unsqueeze(1).to(self.dout.dtype)  # the others: 0
            self.dense = (vis | ~has).unsqueeze(1)  # such rows see all keys (no NaN), weight 0
        self.dprobs = torch.randn(s.B, s.Hq, s.R, s.L if s.C is None else s.C,
                                  generator=g).to(dev)
        self.kv_expanded = False
        self.last = None

    # ---------------------------------------------------------------- forward of each method
    def forward(self):
        m, q, k, v = self.method, self.q, self.k, self.v
        rows, cols = (self.rows, self.cols) if self.probes else (None, None)
        gqa = q.shape[1] != k.shape[1]
        probs = None
        if m.startswith("abft_"):
            import abft_fast
            out, probs = abft_fast.attention(q, k, v, causal=True, probe_rows=rows,
                                             probe_cols=cols, key_padding_mask=self.padding,
                                             window=self.window, backend=m[5:])
        elif m.startswith("sdpa_"):
            from torch.nn.attention import sdpa_kernel
            with sdpa_kernel(_sdpa_backend(m)):
                if self.dense is None:
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                         scale=self.scale, enable_gqa=gqa)
                else:
                    out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.dense,
                                                         scale=self.scale, enable_gqa=gqa)
        elif m == "flex":
            flex, aux_req = _flex(self.compile_flex)
            bm = _block_mask(self.s.L, self.dev, self.kpm, self.window)
            if aux_req is not None:
                out, aux = flex(q, k, v, block_mask=bm, scale=self.scale, enable_gqa=gqa,
                                return_aux=aux_req(lse=True))
                lse = aux.lse
            else:
                out, lse = flex(q, k, v, block_mask=bm, scale=self.scale, enable_gqa=gqa,
                                return_lse=True)
            if self.probes:
                from abft_fast.ops.probe_math import probe_probs_from_lse
                from abft_fast.ops.spec import make_spec
                spec = make_spec(q, k, v, causal=True, scale=self.scale,
                                 key_padding_mask=self.kpm, window=self.window, probe_rows=rows,
                                 probe_cols=cols)
                probs = probe_probs_from_lse(q, k, lse, spec)
        elif m == "eager":
            grp = q.shape[1] // k.shape[1]
            kk = k.repeat_interleave(grp, 1) if grp > 1 else k
            vv = v.repeat_interleave(grp, 1) if grp > 1 else v
            sc = torch.matmul(q, kk.transpose(-1, -2)) * self.scale
            keep = _causal_mask(self.s.L, self.dev) if self.dense is None else self.dense
            sc = sc.masked_fill(~keep, float("-inf"))
            p = torch.softmax(sc, dim=-1, dtype=torch.float32).to(q.dtype)
            out = torch.matmul(p, vv)
            if self.probes:
                probs = _gather_probs(p, rows, cols).float()
        else:
            raise ValueError(m)
        self.last = (out, probs)
        return out, probs

    def _backward(self, out, probs, retain_graph=False):
        ts, gs = [out], [self.dout]
        if probs is not None:
            ts.append(probs)
            gs.append(self.dprobs.to(probs.dtype))
        torch.autograd.backward(ts, gs, retain_graph=retain_graph)

    def _clear(self):
        for t in (self.q, self.k, self.v):
            t.grad = None

    # ------------------------------------------------ (setup, target) for benchmark.pedantic
    def callables(self):
        dev = self.dev
        if self.mode == "fwd":
            def target():
                res = self.forward()
                benchlib.sync(dev)
                return res
            return None, target
        if self.mode == "bwd":
            def setup():
                self._clear()
                res = self.forward()
                benchlib.sync(dev)
                return res, {}

            def target(out, probs):
                self._backward(out, probs)
                benchlib.sync(dev)
                return self.grads()
            return setup, target

        def setup():
            self._clear()

        def target():
            out, probs = self.forward()
            self._backward(out, probs)
            benchlib.sync(dev)
            return self.grads()
        return setup, target

    def kernel_callables(self, graph=False):
        """(prepare or None, work) without host synchronisation, for benchlib.event_ms /
        graph_ms: work(*prepare()) is the timed part of the mode (fwd: forward; bwd: backward of a
        forward made by prepare; both: forward + backward). graph=True keeps the autograd graph
        of a bwd capture (retain_graph), so that replays read live saved tensors."""
        if self.mode == "fwd":
            return None, self.forward
        if self.mode == "bwd":
            def prepare():
                self._clear()
                return self.forward()

            def work(out, probs):
                self._backward(out, probs, retain_graph=graph)
            return prepare, work

        def both():
            self._clear()
            self._backward(*self.forward())
        return None, both

    def release(self):
        """Drop gradients and outputs (e.g. those living in a CUDA graph's memory pool)."""
        self._clear()
        self.last = None

    def once(self):
        setup, target = self.callables()
        args = setup() if setup else None
        return target(*args[0]) if args else target()

    def grads(self):
        return self.q.grad, self.k.grad, self.v.grad

    def expand_kv(self):
        """Give the method k/v with Hq heads (for SDPA backends without a GQA kernel)."""
        grp = self.s.Hq // self.s.Hkv
        self.k = self.k.detach().repeat_interleave(grp, 1).requires_grad_(self.k.requires_grad)
        self.v = self.v.detach().repeat_interleave(grp, 1).requires_grad_(self.v.requires_grad)
        self.kv_expanded = True

    # ------------------------------------------------------------------------------ checks
    def check(self, smoke: bool):
        s = self.s
        out, probs = self.last
        assert out.shape == (s.B, s.Hq, s.L, s.D) and out.dtype == s.torch_dtype
        assert torch.isfinite(out).all(), "non-finite output"
        if self.probes:
            assert probs is not None
            assert probs.shape == (s.B, s.Hq, s.R, s.L if s.C is None else s.C)
            assert torch.isfinite(probs).all(), "non-finite probes"
            assert probs.min() >= 0 and probs.max() <= 1 + 1e-3, "probes are not probabilities"
        else:
            assert probs is None
        if self.mode != "fwd":
            for name, g, t in zip("qkv", self.grads(), (self.q, self.k, self.v)):
                assert g is not None and g.shape == t.shape, f"d{name} missing or misshapen"
                assert torch.isfinite(g).all(), f"non-finite d{name}"
        if smoke:
            self._check_reference()

    def _check_reference(self):
        """Smoke sizes only: out, probes and gradients against the float64 reference."""
        from abft_fast.ops.reference import attention_reference
        tol = 1e-2 if self.dev.type == "cuda" else 1e-4  # TF32 dots on GPU; exact on CPU
        q, k, v = (t.detach().double().requires_grad_() for t in (self.q, self.k, self.v))
        rows, cols = (self.rows, self.cols) if self.probes else (None, None)
        ro, lse, rp = attention_reference(q, k, v, causal=True, probe_rows=rows, probe_cols=cols,
                                          key_padding_mask=self.kpm, window=self.window)
        out, probs = self.last
        live = torch.isfinite(lse).unsqueeze(-1)  # rows that see a key (peers differ elsewhere)
        if self.kpm is not None:  # and real query rows (abft_* zero the padded ones)
            live = live & self.kpm[:, None, :, None]
        torch.testing.assert_close(out.double() * live, ro * live, atol=tol, rtol=tol)
        if self.probes:
            torch.testing.assert_close(probs.double(), rp, atol=tol, rtol=tol)
        if self.mode != "fwd" and not self.kv_expanded:
            ts, gs = [ro], [self.dout.double()]
            if rp is not None:
                ts.append(rp)
                gs.append(self.dprobs.double())
            torch.autograd.backward(ts, gs)
            for g, r in zip(self.grads(), (q.grad, k.grad, v.grad)):
                torch.testing.assert_close(g.double(), r, atol=tol, rtol=tol)


def kernel_times(case: OpCase, dev, iters: int) -> dict:
    """Row fields event_ms, graph_ms, graph_reason (and a note on an out-of-memory event timing)
    of one case on CUDA (benchlib.event_ms / graph_ms); {} without CUDA."""
    if dev.type != "cuda":
        return {}
    got = {}
    prepare, work = case.kernel_callables()
    try:
        got["event_ms"] = benchlib.event_ms(work, dev, iters, prepare)
    except RuntimeError as e:
        if not benchlib.is_oom(e):
            raise
        got["note"] = "event timing: out of memory"
    finally:
        case.release()
        benchlib.free_memory()
    prepare, work = case.kernel_callables(graph=True)
    got["graph_ms"], got["graph_reason"] = benchlib.graph_ms(work, dev, iters, prepare,
                                                             cleanup=case.release)
    return got


def _join_notes(*notes) -> str:
    return "; ".join(n for n in notes if n)


def test_attention(op_case, benchmark, recorder):
    method, mode, probes, s = op_case
    dev = benchlib.device()
    why = _method_unavailable(method, dev)
    if why:
        pytest.skip(why)
    if method == "flex" and dev.type == "cpu" and mode != "fwd":
        pytest.skip("FlexAttention has no CPU backward")
    benchmark.group = f"{mode} {s.id}"
    flops = benchlib.attention_flops(s, mode)
    row = dict(method=method, mode=mode, probes=probes, dtype=s.dtype, B=s.B, Hq=s.Hq, Hkv=s.Hkv,
               L=s.L, D=s.D, R=s.R if probes else "", C=("all" if s.C is None else s.C)
               if probes else "", causal=s.causal, mask=s.mask, window=s.window or "",
               status="ok", note="")
    smoke = recorder.sizes == "smoke"
    case = stats = skip = None
    oom = False
    try:
        case = OpCase(method, mode, probes, s, dev, compile_flex=not smoke)
        if method.startswith("sdpa_"):
            try:
                case.once()
            except RuntimeError as e:
                if benchlib.is_oom(e) or s.Hq == s.Hkv:
                    raise
                case.expand_kv()  # this SDPA backend has no GQA kernel: give it Hq k/v heads
                row["note"] = "k/v expanded to Hq heads"
        if recorder.timing:
            case.once()  # first call: compile / autotune, outside the timing
            case.check(smoke)
            t = benchlib.wall(case.once, dev)
            rounds = benchlib.rounds_for(t, "ABFT_BENCH_SECONDS", 1.0, 3, 100)
        else:
            rounds = 1
        setup, target = case.callables()
        _, stats = benchlib.timed_pedantic(benchmark, target, setup, dev, rounds,
                                     warmup_rounds=1 if recorder.timing else 0, above_current=True)
        case.check(smoke)
        if stats:  # GPU time by CUDA events and by CUDA-graph replay (CUDA only)
            gpu = kernel_times(case, dev, rounds)
            row["note"] = _join_notes(row["note"], gpu.pop("note", ""))
            row.update(gpu)
    except RuntimeError as e:
        if benchlib.is_oom(e):
            oom = True
        elif method.startswith("sdpa_") and any(w in str(e).lower()
                                                for w in ("kernel", "backend")):
            skip = (f"{method}: no kernel for this shape/dtype/device "
                    f"({str(e).splitlines()[0][:120]})")
        else:
            raise
    if skip:  # outside the except block, so that the traceback does not keep the inputs alive
        case = None
        pytest.skip(skip)
    if oom:
        case = None
        benchlib.free_memory()
        recorder.add("attention", **{**row, "status": "oom"})
        pytest.skip(f"out of memory: {method} {mode} {s.id}")
    del case
    if stats:
        row.update(ms=stats["ms"], ms_min=stats["ms_min"], rounds=stats["rounds"],
                   tflops=flops / (stats["ms"] * 1e-3) / 1e12, peak_mem_mb=stats["peak_mem_mb"])
        benchmark.extra_info.update({k: v for k, v in row.items() if v != ""})
        recorder.add("attention", **row)
