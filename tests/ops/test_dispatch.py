"""backend="auto": the engine order per case, and one loud fallback per broken engine."""
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


def test_auto_falls_back_once_with_a_warning(monkeypatch):
    calls = []

    class Broken:
        def __init__(self, name):
            self.name = name

        def attention(self, *a):
            calls.append(self.name)
            raise RuntimeError(f"{self.name} failed to compile")

    real = A._backend_module
    monkeypatch.setattr(A, "_backend_module",
                        lambda n: real(n) if n == "torch" else Broken(n))
    monkeypatch.setattr(A, "_available", lambda n, d: (True, ""))
    monkeypatch.setattr(A, "choose_backend", lambda d, t, s: ["triton", "cuda", "torch"])
    monkeypatch.setattr(A, "_broken", {})
    q, k, v = (torch.randn(1, 2, 5, 16) for _ in range(3))
    spec = spec_of(q, k, v, scale=0.25, probe_rows=torch.tensor([[4]]))
    with pytest.warns(RuntimeWarning) as rec:
        out, probs = A._run_auto(q, k, v, spec)
    msgs = [str(w.message) for w in rec]
    assert any("not using 'triton'" in m and "failed to compile" in m for m in msgs)
    assert any("not using 'cuda'" in m for m in msgs)
    ref, pref = real("torch").attention(q, k, v, spec)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(probs, pref)
    # second call: no new attempt, no new warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        A._run_auto(q, k, v, spec)
    assert calls == ["triton", "cuda"]


def test_auto_does_not_swallow_argument_errors(monkeypatch):
    class Bad:
        def attention(self, *a):
            raise ValueError("bad shape")
    monkeypatch.setattr(A, "_backend_module", lambda n: Bad())
    monkeypatch.setattr(A, "_available", lambda n, d: (True, ""))
    monkeypatch.setattr(A, "choose_backend", lambda d, t, s: ["triton", "torch"])
    monkeypatch.setattr(A, "_broken", {})
    q = torch.randn(1, 1, 2, 16)
    with pytest.raises(ValueError, match="bad shape"):
        A._run_auto(q, q, q, spec_of(q, q, q))


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory (made up)"),
                                   RuntimeError("CUDA error: device-side assert triggered")],
                         ids=["oom", "device-assert"])
def test_auto_does_not_drop_an_engine_on_device_errors(monkeypatch, error):
    class Failing:
        def attention(self, *a):
            raise error
    monkeypatch.setattr(A, "_backend_module", lambda n: Failing())
    monkeypatch.setattr(A, "_available", lambda n, d: (True, ""))
    monkeypatch.setattr(A, "choose_backend", lambda d, t, s: ["triton", "torch"])
    monkeypatch.setattr(A, "_broken", {})
    q = torch.randn(1, 1, 2, 16)
    with pytest.raises(type(error)):
        A._run_auto(q, q, q, spec_of(q, q, q))
    assert A._broken == {}
