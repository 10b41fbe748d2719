"""Public entry point ``abft_fast.attention``: argument checks and backend dispatch."""
from __future__ import annotations

import numbers
import os
import warnings

import torch

BACKENDS = ("auto", "triton", "cuda", "torch")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_broken: dict[str, str] = {}  # backend name -> why "auto" stopped using it (warned once)


def attention(q, k, v, *, causal=True, scale=None, key_padding_mask=None, window=None,
              probe_rows=None, probe_cols=None, backend="auto"):
    """Attention that also returns selected attention probabilities, without an L x L matrix.

    Args:
      q: [B, Hq, Lq, D] queries; k, v: [B, Hkv, Lk, D] keys / values (SDPA layout). Hq must be a
        multiple of Hkv (GQA: query head h reads key/value head h // (Hq // Hkv)). Usually
        Lq == Lk; with Lq < Lk the queries are the last Lq positions (decode against a cache).
      causal: key j visible to query i iff j <= i + (Lk - Lq).
      scale: softmax scale, default D ** -0.5.
      key_padding_mask: [B, Lk] bool (or 0/1 integer, as HF's 2-D attention_mask), True = real key.
      window: sliding window (needs causal): key j visible to query i iff i' - window < j <= i',
        i' = i + (Lk - Lq).
      probe_rows: [B, R] integer query positions in [-1, Lq); -1 marks an unused slot.
      probe_cols: [B, C] integer key positions in [-1, Lk); -1 unused; None = full rows (C = Lk).
      backend: "auto" (Triton on CUDA, else the CUDA extension, else torch; torch on CPU),
        "triton", "cuda" or "torch".

    Returns:
      out: [B, Hq, Lq, D] in q's dtype; a row with no visible key gives 0.
      probs: [B, Hq, R, C] (or [B, Hq, R, Lk]) softmax probabilities P[row, col] in float32 for
        16-bit inputs (else q's dtype), or None when probe_rows is None. Unused slots, masked
        entries and rows with no visible key give 0. Gradients flow from out and probs into q, k, v.
    """
    return _dispatch(q, k, v, causal, scale, key_padding_mask, window, probe_rows, probe_cols,
                     backend, check_values=True)


def attention_prechecked(q, k, v, *, causal=True, scale=None, key_padding_mask=None, window=None,
                         probe_rows=None, probe_cols=None, backend="auto"):
    """``attention`` without the two checks that read tensor VALUES (probe indices in range,
    integer padding masks 0/1), which synchronise a GPU with the host on every call. For callers
    that validated those values once themselves, like ``abft_fast.hf`` (once per probe context and
    shape instead of once per layer). Shapes, dtypes and devices are still checked."""
    return _dispatch(q, k, v, causal, scale, key_padding_mask, window, probe_rows, probe_cols,
                     backend, check_values=False)


def _dispatch(q, k, v, causal, scale, key_padding_mask, window, probe_rows, probe_cols, backend,
              check_values):
    key_padding_mask, window, scale = _check(q, k, v, causal, scale, key_padding_mask, window,
                                             probe_rows, probe_cols, backend, check_values)
    args = (q, k, v, causal, scale, key_padding_mask, window, probe_rows, probe_cols)
    if backend == "auto":
        return _run_auto(q.device, args)
    _require_available(backend, q)
    return _backend_module(backend).attention(*args)


def _backend_module(name):
    if name == "torch":
        from . import torch_backend as m
    elif name == "triton":
        from . import triton_backend as m
    elif name == "cuda":
        from . import cuda_backend as m
    else:  # pragma: no cover - _check rejects it first
        raise ValueError(name)
    return m


def triton_available(device: torch.device) -> tuple[bool, str]:
    """(usable, reason) for the Triton backend on tensors of ``device``."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - triton missing
        return False, f"Triton cannot be imported ({e})"
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    return False, ("Triton needs CUDA tensors (or TRITON_INTERPRET=1 set before abft_fast is "
                   f"imported, to run kernels on the CPU); got tensors on {device}")


def cuda_ext_available(device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, f"the CUDA extension needs CUDA tensors; got tensors on {device}"
    if torch.version.cuda is None:  # pragma: no cover
        return False, "this torch build has no CUDA"
    return True, ""


def _require_available(backend, q):
    if backend == "torch":
        return
    ok, why = (triton_available if backend == "triton" else cuda_ext_available)(q.device)
    if not ok:
        raise RuntimeError(f"backend={backend!r} is not available: {why}")
    if backend == "triton" and q.dtype == torch.float64:
        raise TypeError("backend='triton' supports float16, bfloat16 and float32 inputs; got "
                        "float64 (use backend='torch' for float64)")
    if backend == "cuda" and q.dtype == torch.float64:
        raise TypeError("backend='cuda' supports float16, bfloat16 and float32 inputs; got float64")


def _run_auto(device, args):
    if device.type == "cuda" and args[0].dtype != torch.float64:
        for name in ("triton", "cuda"):
            if name in _broken:
                continue
            ok, why = (triton_available if name == "triton" else cuda_ext_available)(device)
            if not ok:
                _mark_broken(name, why)
                continue
            try:
                return _backend_module(name).attention(*args)
            except (ValueError, TypeError):
                raise
            except Exception as e:  # compile / build failure: fall back once, loudly
                _mark_broken(name, f"{type(e).__name__}: {e}")
    return _backend_module("torch").attention(*args)


def _mark_broken(name, why):
    _broken[name] = why
    warnings.warn(f"abft_fast: backend 'auto' is not using {name!r}: {why}", RuntimeWarning,
                  stacklevel=4)


def _check(q, k, v, causal, scale, kpm, window, probe_rows, probe_cols, backend,
           check_values=True):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, L, D], got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    b, hq, lq, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if k.shape[0] != b:
        raise ValueError(f"k batch size {k.shape[0]} does not match q batch size {b}")
    if k.shape[3] != d:
        raise ValueError(f"k head dim {k.shape[3]} does not match q head dim {d}")
    hkv, lk = k.shape[1], k.shape[2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hkv}) for GQA")
    if lq == 0 or lk == 0 or d == 0 or b == 0:
        raise ValueError(f"q and k must have non-zero sizes, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if scale is None:
        scale = d ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (
            float(scale) == float(scale) and abs(float(scale)) != float("inf")):
        raise TypeError(f"scale must be a finite real number or None, got {scale!r}")
    scale = float(scale)
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
            raise ValueError(f"window must be a positive int or None, got {window!r}")
        if not causal:
            raise ValueError("window (sliding-window attention) requires causal=True")
        window = int(window)
    if kpm is not None:
        if not isinstance(kpm, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a torch.Tensor, got {type(kpm).__name__}")
        if tuple(kpm.shape) != (b, lk):
            raise ValueError(f"key_padding_mask must have shape [B, Lk] = [{b}, {lk}], got "
                             f"{tuple(kpm.shape)}")
        if kpm.dtype.is_floating_point or kpm.dtype.is_complex:
            raise TypeError("key_padding_mask must be bool (True = real token) or a 0/1 integer "
                            f"mask, got {kpm.dtype}; additive float masks are not accepted")
        if kpm.device != q.device:
            raise ValueError(f"key_padding_mask is on {kpm.device}, q on {q.device}")
        if kpm.dtype != torch.bool:
            if check_values and bool(((kpm != 0) & (kpm != 1)).any()):
                raise ValueError("key_padding_mask integer values must be 0 or 1")
            kpm = kpm != 0
    if probe_cols is not None and probe_rows is None:
        raise ValueError("probe_cols given without probe_rows")
    for name, t, hi in (("probe_rows", probe_rows, lq), ("probe_cols", probe_cols, lk)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.int64:
            raise TypeError(f"{name} must be int64, got {t.dtype}")
        if t.dim() != 2 or t.shape[0] != b:
            raise ValueError(f"{name} must have shape [B, n] with B = {b}, got {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
        if check_values and t.numel() and (bool((t < -1).any()) or bool((t >= hi).any())):
            raise ValueError(f"{name} values must lie in [-1, {hi}) (-1 = unused slot); got "
                             f"min {int(t.min())}, max {int(t.max())}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return kpm, window, scale
