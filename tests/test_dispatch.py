"""backend="auto": Triton on CUDA, else the CUDA extension, else torch, warning once per fallback."""
import warnings

import pytest
import torch

import importlib

A = importlib.import_module("abft_fast.attention")  # the module (abft_fast.attention is the function)


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
    monkeypatch.setattr(A, "triton_available", lambda d: (True, ""))
    monkeypatch.setattr(A, "cuda_ext_available", lambda d: (True, ""))
    monkeypatch.setattr(A, "_broken", {})
    q, k, v = (torch.randn(1, 2, 5, 16) for _ in range(3))
    args = (q, k, v, True, 0.25, None, None, torch.tensor([[4]]), None)
    with pytest.warns(RuntimeWarning) as rec:
        out, probs = A._run_auto(torch.device("cuda"), args)
    msgs = [str(w.message) for w in rec]
    assert any("not using 'triton'" in m and "failed to compile" in m for m in msgs)
    assert any("not using 'cuda'" in m for m in msgs)
    ref, pref = A._backend_module("torch").attention(*args)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(probs, pref)
    # second call: no new attempt, no new warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        A._run_auto(torch.device("cuda"), args)
    assert calls == ["triton", "cuda"]


def test_auto_does_not_swallow_argument_errors(monkeypatch):
    class Bad:
        def attention(self, *a):
            raise ValueError("bad shape")
    monkeypatch.setattr(A, "_backend_module", lambda n: Bad())
    monkeypatch.setattr(A, "triton_available", lambda d: (True, ""))
    monkeypatch.setattr(A, "_broken", {})
    q = torch.randn(1, 1, 2, 16)
    with pytest.raises(ValueError, match="bad shape"):
        A._run_auto(torch.device("cuda"), (q, q, q, True, 0.25, None, None, None, None))
