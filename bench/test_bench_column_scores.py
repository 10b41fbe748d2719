"""Column-score benchmarks (KV-cache eviction statistics), forward only, causal.

Rows (``rows`` column): "w32" = the last 32 queries (SnapKV's observation window), "all" = every
query row (H2O's accumulated attention).
Methods:
  abft_triton / abft_torch  ``abft_fast.column_scores(..., backend=...)``: no L x L matrix.
  eager      matmul + float32 softmax over the full [L, L] matrix (what ``output_attentions``
             materialises), then the sum over the chosen rows.
  recompute  the PyTorch recompute of SnapKV / kvpress: k expanded to Hq heads, the window's
             queries against all keys, masked float32 softmax, sum ("w32" only; for "all" it is
             eager).
Sizes: smoke (CPU / CI, float32, checked against the float64 reference) or, on CUDA with timing
on, bf16 GQA 32/8, d 128, L 4k / 16k / 32k. Timings go to pytest-benchmark's output
(``extra_info``: ms, peak_mem_mb on CUDA); nothing is appended to bench/results/*.csv.
"""
from __future__ import annotations

import benchlib
import pytest
import torch

import abft_fast

METHODS = ("abft_triton", "abft_torch", "eager", "recompute")
ROWS = ("w32", "all")
WINDOW = 32


def _shapes(sizes):
    if sizes == "smoke":
        return [("fp32", 1, 4, 2, 48, 16), ("fp32", 2, 2, 1, 40, 32)]
    lens = (4096,) if sizes == "quick" else (4096, 16384, 32768)
    return [("bf16", 1, 32, 8, L, 128) for L in lens]


def pytest_generate_tests(metafunc):
    if "cs_case" in metafunc.fixturenames:
        sizes = metafunc.config._abft_bench.sizes
        cases = [(m, r, s) for s in _shapes(sizes) for r in ROWS for m in METHODS
                 if not (m == "recompute" and r == "all")]
        metafunc.parametrize("cs_case", cases, ids=[
            f"{m}-{r}-{s[0]}-B{s[1]}-H{s[2]}-kv{s[3]}-L{s[4]}-d{s[5]}" for m, r, s in cases])


def _unavailable(method, dev):
    if method == "abft_triton":
        from abft_fast.ops.attention import triton_available
        ok, why = triton_available(dev)
        return None if ok else why
    return None


def _rows(b, L, dev):
    return torch.arange(L - WINDOW, L, device=dev).expand(b, WINDOW)


def eager(q, k, rows, scale):
    g = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(g, 1)
    L = q.shape[2]
    s = torch.matmul(q, kk.transpose(-1, -2)) * scale
    s = s.masked_fill(~torch.ones(L, L, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    p = torch.softmax(s, dim=-1, dtype=torch.float32)
    return p.sum(2) if rows is None else p[:, :, L - WINDOW:].sum(2)


def recompute(q, k, scale):
    g = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(g, 1)
    L = q.shape[2]
    s = torch.matmul(q[:, :, L - WINDOW:], kk.transpose(-1, -2)).float() * scale
    qpos = torch.arange(L - WINDOW, L, device=q.device)[:, None]
    s = s.masked_fill(torch.arange(L, device=q.device)[None, :] > qpos, float("-inf"))
    return torch.softmax(s, dim=-1).sum(2)


def test_column_scores(cs_case, benchmark, recorder):
    method, rows_kind, (dt, B, Hq, Hkv, L, D) = cs_case
    dev = benchlib.device()
    why = _unavailable(method, dev)
    if why:
        pytest.skip(why)
    g = torch.Generator().manual_seed(0)
    dtype = benchlib.DTYPES[dt]
    q = torch.randn(B, Hq, L, D, generator=g).to(dev, dtype)
    k = torch.randn(B, Hkv, L, D, generator=g).to(dev, dtype)
    rows = _rows(B, L, dev) if rows_kind == "w32" else None
    scale = D ** -0.5
    if method.startswith("abft_"):
        def fn():
            return abft_fast.column_scores(q, k, rows=rows, backend=method[5:])
    elif method == "eager":
        def fn():
            return eager(q, k, rows, scale)
    else:
        def fn():
            return recompute(q, k, scale)

    def target():
        with torch.no_grad():
            out = fn()
        benchlib.sync(dev)
        return out
    benchmark.group = f"colscores {rows_kind} {dt}-B{B}-H{Hq}-kv{Hkv}-L{L}-d{D}"
    stats = None
    try:
        if recorder.timing:
            target()  # compile / autotune outside the timing
            rounds = benchlib.rounds_for(benchlib.wall(target, dev), "ABFT_BENCH_SECONDS", 1.0,
                                         3, 100)
        else:
            rounds = 1
        out, stats = benchlib.timed_pedantic(benchmark, target, None, dev, rounds,
                                             warmup_rounds=1 if recorder.timing else 0,
                                             above_current=True)
    except RuntimeError as e:
        if benchlib.is_oom(e):
            benchlib.free_memory()
            pytest.skip(f"out of memory: {method} {rows_kind} L{L}")
        raise
    assert out.shape == (B, Hq, L) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    if recorder.sizes == "smoke":  # against the float64 reference
        from abft_fast.ops.reference import attention_reference
        r = torch.arange(L).expand(B, -1) if rows is None else rows.cpu()
        _, _, p = attention_reference(q.double().cpu(), k.double().cpu(), k.double().cpu(),
                                      probe_rows=r)
        torch.testing.assert_close(out.double().cpu(), p.sum(2), rtol=1e-4, atol=1e-5)
    if stats:
        benchmark.extra_info.update(method=method, rows=rows_kind, dtype=dt, B=B, Hq=Hq, Hkv=Hkv,
                                    L=L, D=D, ms=stats["ms"], peak_mem_mb=stats["peak_mem_mb"])
