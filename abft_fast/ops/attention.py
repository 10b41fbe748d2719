"""Public entry point ``abft_fast.attention``: argument spec, engine choice, dispatch."""
from __future__ import annotations

import dataclasses
import warnings

import torch

from .available import cuda_ext_available, triton_available  # re-exported
from .engines import ENGINES, Engine
from .padding import Padding
from .spec import BACKENDS, AttentionSpec, check_backend, make_spec

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
      key_padding_mask: [B, Lk] bool (or 0/1 integer, as HF's 2-D attention_mask), True = real key;
        or an :class:`abft_fast.Padding` (the mask read once on the host, which the varlen kernel
        needs; with ``zero_padded_queries=True`` query rows at padded positions give 0).
      window: sliding window (needs causal): key j visible to query i iff i' - window < j <= i',
        i' = i + (Lk - Lq).
      probe_rows: [B, R] int64 query positions in [-1, Lq); -1 marks an unused slot.
      probe_cols: [B, C] int64 key positions in [-1, Lk); -1 unused; None = full rows (C = Lk).
      backend: "auto" (see :func:`choose_backend`), "sdpa", "varlen", "triton", "cuda" or "torch"
        (docs/design.md, "engines").

    Returns:
      out: [B, Hq, Lq, D] in q's dtype; a row with no visible key gives 0.
      probs: [B, Hq, R, C] (or [B, Hq, R, Lk]) softmax probabilities P[row, col] in float32 for
        16-bit inputs (else q's dtype), or None when probe_rows is None. Unused slots, masked
        entries and rows with no visible key give 0. Gradients flow from out and probs into q, k, v.

    Index values out of range raise ValueError at once on the CPU; on a GPU they are checked by an
    asynchronous device assert (no host synchronisation), which stops the stream with a message
    naming the argument.
    """
    check_backend(backend)
    spec = make_spec(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                     window=window, probe_rows=probe_rows, probe_cols=probe_cols)
    return run(q, k, v, spec, backend)


def attention_prechecked(q, k, v, *, causal=True, scale=None, key_padding_mask=None, window=None,
                         probe_rows=None, probe_cols=None, backend="auto"):
    """``attention`` without the value checks (probe indices in range, integer padding masks 0/1),
    for callers that validated those values once themselves, like ``abft_fast.hf`` (once per
    probe context and shape instead of once per layer). Shapes, dtypes and devices are checked."""
    check_backend(backend)
    spec = make_spec(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                     window=window, probe_rows=probe_rows, probe_cols=probe_cols,
                     check_values=False)
    return run(q, k, v, spec, backend)


def run(q, k, v, spec: AttentionSpec, backend: str):
    """Dispatch a checked call to ``backend`` (or the one ``auto`` chooses)."""
    if backend == "auto":
        return _run_auto(q, k, v, spec)
    if backend == "varlen" and spec.key_padding_mask is not None and spec.padding is None:
        # asked for by name with a tensor mask: read it on the host here (one sync per call)
        spec = dataclasses.replace(spec, padding=Padding.of(spec.key_padding_mask))
    engine = ENGINES[backend]
    why = engine.unavailable(q.device)
    if why:
        raise RuntimeError(f"backend={backend!r} is not available: {why}")
    dtypes = engine.dtypes(q, spec)
    if q.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"backend={backend!r} supports {names} inputs; got {q.dtype}"
                        + (" (use backend='torch' for float64)" if q.dtype == torch.float64
                           else ""))
    refusal = engine.refuses(q, spec)
    if refusal:
        raise ValueError(refusal)
    return _call(engine, q, k, v, spec)


def _call(engine: Engine, q, k, v, spec: AttentionSpec):
    out, probs = engine.run(q, k, v, spec)
    return _zero_padded_queries(out, probs, spec, engine.zeroes_padded_queries)


def _zero_padded_queries(out, probs, spec: AttentionSpec, out_done: bool):
    """Rows of ``spec.query_mask`` that are False give out 0 and probes 0 (``out_done``: the
    engine left those rows at 0 already)."""
    qm = spec.query_mask
    if qm is None:
        return out, probs
    if not out_done:
        out = out.masked_fill(~qm[:, None, :, None], 0.0)
    if probs is not None:
        rows = spec.probe_rows
        real = torch.gather(qm, 1, rows.clamp(min=0)) & (rows >= 0)  # [B, R]
        probs = probs.masked_fill(~real[:, None, :, None], 0.0)
    return out, probs


def choose_backend(device: torch.device, dtype: torch.dtype, spec: AttentionSpec) -> list[str]:
    """The engines ``auto`` tries, in order (docs/design.md, "engines"). ``auto`` never falls back
    to an engine measured slower than the torch backend on the same case:

    - CPU, or float64: torch.
    - CUDA, unmasked (no padding, no window; causal Lq < Lk allowed): sdpa, i.e. PyTorch's best
      SDPA kernel for the output plus the Triton probe kernels, then torch.
    - CUDA with padding or a window: varlen (PyTorch's varlen flash kernel for the output, the
      probe kernels for the probes) where it computes the call exactly (``varlen.supports``:
      fp16 / bf16, head dim a multiple of 8 up to 256, the padding given as a
      :class:`Padding` whose real tokens form one run per row, no causal right padding unless
      padded query rows are zeroed), then the fused Triton kernel, then torch (which never
      builds L x L). Not yet measured on a GPU: the order is the issue's rule, to be replaced
      by measured ratios (docs/design.md).
    - backend="cuda" (SDPA through the torch backend + CUDA C++ probe kernels) is not in the
      list: it has not been timed against torch on a GPU (the fused CUDA kernels it ran before
      took 51 ms where the torch backend took 4.2 ms, H100, bf16 causal L 4096).
    """
    if device.type != "cuda" or dtype == torch.float64:
        return ["torch"]
    if spec.key_padding_mask is None and spec.window is None:
        return ["sdpa", "torch"]
    return ["varlen", "triton", "torch"]


def _run_auto(q, k, v, spec: AttentionSpec):
    for name in choose_backend(q.device, q.dtype, spec):
        engine = ENGINES[name]
        if name == "torch":
            break
        if name in _broken:
            continue
        why = engine.unavailable(q.device)
        if why:  # not on this machine: say so once
            _mark_broken(name, why)
            continue
        if q.dtype not in engine.dtypes(q, spec) or engine.refuses(q, spec):
            continue  # not this call's engine (dtype, head dim, mask): no warning
        try:
            return _call(engine, q, k, v, spec)
        except (ValueError, TypeError, torch.OutOfMemoryError):
            raise
        except Exception as e:  # compile / build failure: fall back once, loudly
            if _is_device_error(e):  # a CUDA error or device assert: the engine is not broken
                raise
            _mark_broken(name, f"{type(e).__name__}: {e}")
    return _call(ENGINES["torch"], q, k, v, spec)


def _is_device_error(e: Exception) -> bool:
    """A CUDA error, device-side assert or out-of-memory (whatever exception type carries it):
    the state of the device, not a broken engine."""
    if hasattr(torch, "AcceleratorError") and isinstance(e, torch.AcceleratorError):
        return True
    msg = str(e)
    return any(w in msg for w in ("CUDA error", "device-side assert", "out of memory"))


def _mark_broken(name, why):
    _broken[name] = why
    warnings.warn(f"abft_fast: backend 'auto' is not using {name!r}: {why}", RuntimeWarning,
                  stacklevel=4)


__all__ = ["BACKENDS", "Padding", "attention", "attention_prechecked", "choose_backend", "run",
           "triton_available", "cuda_ext_available"]
