"""backend="auto": the engine order per case, and one loud fallback per broken engine."""
import dataclasses
import importlib
import warnings

import pytest
import torch
from cases import spec_of

A = importlib.import_module("abft_fast.ops.attention")  # the module (abft_fast.attention is the function)


def test_auto_order_per_case():
    q = torch.randn(1, 2, 5, 16)
    kpm = torch.ones(1, 5, dtype=torch.bool)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    plain = spec_of(q, q, q)
    assert A.choose_backend(cpu, torch.float16, plain) == ["torch"]
    assert A.choose_backend(cuda, torch.float64, plain) == ["torch"]
    assert A.choose_backend(cuda, torch.bfloat16, plain) == ["sdpa", "torch"]
    assert A.choose_backend(cuda, torch.bfloat16, spec_of(q[:, :, :3], q, q)) == ["sdpa", "torch"]
    padded = spec_of(q, q, q, key_padding_mask=kpm)
    windowed = spec_of(q, q, q, window=2)
    # masked: PyTorch's varlen flash kernel (where it computes the call: tests/ops/test_varlen.py),
    # the fused Triton kernel, then torch; never the fused CUDA C++ kernels, which were measured
    # slower than the torch backend (bench/results/summary.md)
    for spec in (padded, windowed, spec_of(q[:, :, :3], q, q, key_padding_mask=kpm, window=2)):
        for dt in (torch.float16, torch.bfloat16, torch.float32):
            order = A.choose_backend(cuda, dt, spec)
            assert order == ["varlen", "triton", "torch"]
    for spec in (plain, padded, windowed):  # whatever the case, auto ends with torch
        for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            for dev in (cuda, cpu):
                order = A.choose_backend(dev, dt, spec)
                assert order[-1] == "torch" and "cuda" not in order


def _replace_engines(monkeypatch, run, names=("triton", "cuda")):
    """Engines ``names`` available everywhere, taking every call, running ``run(name)``."""
    for n in names:
        e = A.ENGINES[n]
        monkeypatch.setitem(A.ENGINES, n, dataclasses.replace(
            e, unavailable=lambda d: "", refuses=lambda q, s: "", run=run(n)))
    monkeypatch.setattr(A, "_broken", {})


def test_auto_falls_back_once_with_a_warning(monkeypatch):
    calls = []

    def broken(name):
        def run(*a):
            calls.append(name)
            raise RuntimeError(f"{name} failed to compile")
        return run
    _replace_engines(monkeypatch, broken)
    monkeypatch.setattr(A, "choose_backend", lambda d, t, s: ["triton", "cuda", "torch"])
    q, k, v = (torch.randn(1, 2, 5, 16) for _ in range(3))
    spec = spec_of(q, k, v, scale=0.25, probe_rows=torch.tensor([[4]]))
    with pytest.warns(RuntimeWarning) as rec:
        out, probs = A._run_auto(q, k, v, spec)
    msgs = [str(w.message) for w in rec]
    assert any("not using 'triton'" in m and "failed to compile" in m for m in msgs)
    assert any("not using 'cuda'" in m for m in msgs)
    ref, pref = A.ENGINES["torch"].run(q, k, v, spec)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(probs, pref)
    # second call: no new attempt, no new warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        A._run_auto(q, k, v, spec)
    assert calls == ["triton", "cuda"]


def test_auto_does_not_swallow_argument_errors(monkeypatch):
    def bad(name):
        def run(*a):
            raise ValueError("bad shape")
        return run
    _replace_engines(monkeypatch, bad, ("triton",))
    monkeypatch.setattr(A, "choose_backend", lambda d, t, s: ["triton", "torch"])
    q = torch.randn(1, 1, 2, 16)
    with pytest.raises(ValueError, match="bad shape"):
        A._run_auto(q, q, q, spec_of(q, q, q))


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory (made up)"),
                                   RuntimeError("CUDA error: device-side assert triggered")],
                         ids=["oom", "device-assert"])
def test_auto_does_not_drop_an_engine_on_device_errors(monkeypatch, error):
    def failing(name):
        def run(*a):
            raise error
        return run
    _replace_engines(monkeypatch, failing, ("triton",))
    monkeypatch.setattr(A, "choose_backend", lambda d, t, s: ["triton", "torch"])
    q = torch.randn(1, 1, 2, 16)
    with pytest.raises(type(error)):
        A._run_auto(q, q, q, spec_of(q, q, q))
    assert A._broken == {}


def test_auto_skips_an_engine_that_refuses_the_call_without_a_warning(monkeypatch):
    """A call an engine does not take (here: varlen and a tensor padding mask, float32) goes on
    to the next engine silently; an engine missing from the machine is named once."""
    monkeypatch.setattr(A, "_broken", {})
    monkeypatch.setattr(A, "choose_backend", lambda d, t, s: ["triton", "varlen", "torch"])
    monkeypatch.setitem(A.ENGINES, "triton", dataclasses.replace(
        A.ENGINES["triton"], unavailable=lambda d: "no Triton here (made up)"))
    from abft_fast.ops import varlen
    varlen.use_naive_kernel()
    try:
        q = torch.randn(1, 2, 6, 16)
        kpm = torch.tensor([[1, 1, 1, 1, 0, 0]]).bool()
        with pytest.warns(RuntimeWarning, match="not using 'triton': no Triton here"):
            A._run_auto(q, q, q, spec_of(q, q, q, key_padding_mask=kpm))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out, _ = A._run_auto(q, q, q, spec_of(q, q, q, key_padding_mask=kpm))
        assert set(A._broken) == {"triton"}
    finally:
        varlen.reset_kernel()
