"""Backend "cuda": CUDA C++ probe kernels (csrc/) beside PyTorch's SDPA, for machines where Triton
cannot run.

One route for every case (docs/cuda.md): the output and its gradient come from PyTorch's SDPA
through the torch backend (``torch_backend.output``: one unmasked call, cuDNN / flash on a GPU;
with key padding, a window or causal Lq != Lk, blocks of at most 128 query rows with a band mask,
never L x L; see ``output`` for GQA), the probes from the CUDA probe kernels (csrc/probes.cuh):
row lse and probabilities in the forward, dk and the R rows of dq in the backward, O(R * L * d)
work, with the same masks. They run as the torch.library ops ``abft_fast::cuda_probe_rows`` /
``abft_fast::cuda_probe_rows_backward`` (registered in ``ops/probes.py`` with the other probe
providers; fake implementations and autograd, so ``torch.compile`` traces them). The sdpa and
varlen engines use the same ops where Triton cannot run (``probes.choose``).

The fused CUDA kernels (csrc/attention_*.cuh: out, lse and the probes folded into one flash
loop) are no longer on this route: measured 51 ms where cuDNN took 2.2 ms (H100, bf16, causal,
L 4096). They stay in the extension, reachable only explicitly: ``attention_with_extension(...,
route="fused")`` and the ``abft_fast::fused_attention`` op with engine "cuda" (ops/fused.py).

The extension (prebuilt, or JIT-compiled on first use and cached) is loaded by :mod:`.cuda_ext`.
Importing this module never compiles anything and needs no GPU.
"""
from __future__ import annotations

import dataclasses

import torch

from . import fused, probe_ops, torch_backend
from .cuda_ext import (  # noqa: F401  (re-exported: the loader lives in cuda_ext)
    EXTENSION_NAME,
    JIT_SOURCES,
    build_directory,
    csrc_dir,
    extension_loads,
    is_cached,
    load_extension,
)
from .probes import cuda_probe_rows_op
from .spec import AttentionSpec

MAX_HEAD_DIM = 256
ROUTES = ("probes", "fused")


def attention_with_extension(ext, q, k, v, spec: AttentionSpec, route: str = "probes"):
    """``attention`` on an explicit extension module (``ext.probe_fwd`` / ``ext.probe_bwd``, and
    ``ext.fwd`` / ``ext.bwd`` for route "fused", as in csrc/binding.cpp), eager autograd; the
    tests pass the CPU-emulation build of the same kernels. ``route``: "probes" (what
    ``attention`` runs: SDPA output + probe kernels) or "fused" (the fused kernels)."""
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    _check_head_dim(spec)
    if route == "fused":
        out, _, probs = fused.FusedAttention.apply(fused.ExtensionEngine(ext), spec, q, k, v)
        return out, probs
    out = output(q, k, v, spec)
    probs = None
    if spec.has_probes:
        probs, _ = _ExtensionProbes.apply(ext, q, k, spec.key_padding_mask, spec.probe_rows,
                                          spec.probe_cols, spec.causal, spec.scale,
                                          spec.window or 0)
    return out, probs


def _check_head_dim(spec: AttentionSpec):
    if spec.head_dim > MAX_HEAD_DIM:
        raise ValueError(f"backend='cuda' supports head dims up to {MAX_HEAD_DIM}, got "
                         f"{spec.head_dim}")


def attention(q, k, v, spec: AttentionSpec):
    """Same contract as ``abft_fast.attention`` (arguments already checked there):
    q [B, Hq, Lq, D], k / v [B, Hkv, Lk, D] CUDA tensors (fp32 / fp16 / bf16, D <= 256) ->
    (out [B, Hq, Lq, D], probs [B, Hq, R, C] float32 or None)."""
    _check_head_dim(spec)
    load_extension()  # build (or fail, naming why) before the op runs
    out = output(q, k, v, spec)
    probs = None
    if spec.has_probes:
        probs, _ = cuda_probe_rows_op(q, k, spec.key_padding_mask, spec.probe_rows,
                                      spec.probe_cols, spec.causal, spec.scale, spec.window or 0)
    return out, probs


# ------------------------------------------------------------------------------------ output

def output(q, k, v, spec: AttentionSpec):
    """The attention output [B, Hq, Lq, D] (differentiable) from ``torch_backend.output``, with
    k / v expanded to the Hq query heads first where ``expands_kv`` says so."""
    if expands_kv(q, k, v, spec):
        g = spec.group
        k, v = (t.repeat_interleave(g, dim=1) for t in (k, v))
        spec = dataclasses.replace(spec, kv_heads=spec.q_heads)
    return torch_backend.output(q, k, v, spec)


def expands_kv(q, k, v, spec: AttentionSpec) -> bool:
    """Whether ``output`` repeats k / v to the query heads before SDPA: only for GQA calls on a
    GPU that run with a mask (``spec.masked``: key padding, window, causal Lq != Lk; the torch
    backend's query-block path) and that no fused SDPA kernel takes as GQA. PyTorch's
    memory-efficient kernel, the one that takes a mask, does not take ``enable_gqa``; such a
    call would fall to the math backend, which materialises each block's [B, Hq, block, band]
    scores and runs unfused. Repeating k / v costs (Hq / Hkv - 1) x their size in memory, once
    per call; the check is PyTorch's own (``torch.backends.cuda.can_use_*_attention``) on a
    one-row slice, host-side only. Not under torch.compile (compiled graphs keep GQA)."""
    if spec.q_heads == spec.kv_heads or not spec.masked or q.device.type != "cuda":
        return False
    if torch.compiler.is_compiling():  # the check is not traceable: compiled graphs keep GQA
        return False
    key = (q.device, q.dtype, spec.q_heads, spec.kv_heads, spec.head_dim,
           tuple(t.stride(-1) == 1 for t in (q, k, v)))
    if key not in _gqa_fused:
        _gqa_fused[key] = _fused_sdpa_takes(q[:, :, :1], k[:, :, :1], v[:, :, :1], gqa=True)
    return not _gqa_fused[key]


_gqa_fused: dict = {}  # (device, dtype, Hq, Hkv, D, unit strides) -> a fused kernel takes it


def _fused_sdpa_takes(q, k, v, gqa: bool) -> bool:
    """True when a fused SDPA kernel (memory-efficient or cuDNN) accepts a masked call of these
    heads, strides and dtypes; False when it would go to the math backend (or the check fails).
    The mask is additive in q's dtype, as SDPA converts a bool mask before choosing a kernel."""
    try:
        from torch.backends import cuda as sdp

        mask = q.new_zeros(q.shape[0], 1, q.shape[2], k.shape[2])
        params = sdp.SDPAParams(q, k, v, mask, 0.0, False, gqa)
        checks = [sdp.can_use_efficient_attention]
        if hasattr(sdp, "can_use_cudnn_attention"):
            checks.append(sdp.can_use_cudnn_attention)
        return any(bool(c(params, False)) for c in checks)
    except Exception:  # a torch without these checks: expanding is the safe choice
        return False


# ------------------------------------------------------------------------------- probe kernels

def _probe_backward(ext, dprobs, q, k, probs, lse, key_padding_mask, probe_rows, probe_cols,
                    causal, scale, window):
    """-> (dq [B,Hq,Lq,D] in q's dtype, non-zero on the probe rows only; dk [B,Hkv,Lk,D] in k's
    dtype). ds = P G, u = sum_c ds, E = ds scattered to full rows; the kernels form
    dS = E - u P against every visible key (csrc/probes.cuh)."""
    u, e = probe_ops.grad_inputs(probs, dprobs, probe_cols, k.shape[2])
    dq_rows, dk = ext.probe_bwd(q, k, probe_rows, lse, u, e, key_padding_mask, causal, scale,
                                window)
    # straight into q's dtype: no float32 [B, Hq, Lq, D] pass
    return probe_ops.add_rows(torch.zeros_like(q, memory_format=torch.contiguous_format),
                              dq_rows, probe_rows), dk


class _ExtensionProbes(torch.autograd.Function):
    """The probe kernels of an explicit extension module (eager; see attention_with_extension)."""

    @staticmethod
    def forward(ctx, ext, q, k, key_padding_mask, probe_rows, probe_cols, causal, scale, window):
        probs, lse = ext.probe_fwd(q, k, probe_rows, probe_cols, key_padding_mask, causal, scale,
                                   window)
        ctx.save_for_backward(q, k, probs, lse, key_padding_mask, probe_rows, probe_cols)
        ctx.ext, ctx.cfg = ext, (causal, scale, window)
        ctx.mark_non_differentiable(lse)
        return probs, lse

    @staticmethod
    def backward(ctx, dprobs, _dlse):
        q, k, probs, lse, kpm, rows, cols = ctx.saved_tensors
        dq, dk = _probe_backward(ctx.ext, dprobs, q, k, probs, lse, kpm, rows, cols, *ctx.cfg)
        return None, dq, dk, None, None, None, None, None, None
