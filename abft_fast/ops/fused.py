"""The fused engines (Triton kernels, CUDA C++ kernels): one forward / backward recipe, one
autograd Function, and the torch.library ops that make them traceable by ``torch.compile``.

An engine gives ``forward(q, k, v, spec) -> (out, lse)`` and
``backward(q, k, v, out, lse, dout, spec, delta_extra, ds) -> (dq, dk, dv)``. The probes are
folded in the same way for every engine (docs/design.md, "fused probes"): the forward gets
P[r, c] = exp(scale q_r . k_c - lse_r) from the stored lse; the backward adds
u_r = sum_c P_rc G_rc to the flash delta of row r (``delta_extra``) and the R x C direct term
``ds = P * G`` into dq / dk.

``abft_fast::fused_attention`` / ``abft_fast::fused_attention_backward`` are registered with
``torch.library.custom_op`` (fake implementations for tracing, autograd registered), so
``torch.compile(fullgraph=True)`` sees one opaque op per attention call.
"""
from __future__ import annotations

import torch

from .probe_math import (
    add_probe_direct,
    probe_delta_extra,
    probe_probs_from_lse,
)
from .probe_ops import grad_inputs
from .spec import AttentionSpec, probs_dtype


class TritonEngine:
    name = "triton"

    @staticmethod
    def forward(q, k, v, spec: AttentionSpec):
        from ..kernels import attention as kernels  # the Triton kernels, imported on first use
        return kernels.attention_fwd(q, k, v, spec.key_padding_mask, causal=spec.causal,
                                     window=spec.window, scale=spec.scale)

    @staticmethod
    def probes(q, k, lse, spec: AttentionSpec):
        from ..kernels import attention as kernels
        return kernels.probe_fwd(q, k, lse, spec.probe_rows, spec.probe_cols,
                                 spec.key_padding_mask, causal=spec.causal, window=spec.window,
                                 scale=spec.scale)

    @staticmethod
    def backward(q, k, v, out, lse, dout, spec: AttentionSpec, probs, dprobs):
        """The probe rows' dq by the probe kernel, then the delta pre-pass and one launch for the
        whole backward, which adds the probe part of dk and the probe rows' dq before its single
        rounding to the input dtype."""
        from ..kernels import attention as kernels
        probe = {}
        if dprobs is not None:
            from ..kernels.probes import probe_rows_dq
            u, e = grad_inputs(probs, dprobs, spec.probe_cols, spec.k_len)
            rows = spec.probe_rows
            lse_rows = torch.gather(lse, 2, rows.clamp(min=0)[:, None, :].expand(*u.shape))
            dq_rows = probe_rows_dq(q, k, rows, lse_rows, u, e, spec.key_padding_mask,
                                    causal=spec.causal, window=spec.window, scale=spec.scale)
            probe = dict(probe_rows=rows, probe_u=u, probe_e=e, probe_dq=dq_rows)
        return kernels.attention_bwd(q, k, v, out, lse, dout, spec.key_padding_mask,
                                     causal=spec.causal, window=spec.window, scale=spec.scale,
                                     **probe)


class ExtensionEngine:
    """The CUDA C++ kernels of csrc/ behind ``ext.fwd`` / ``ext.bwd`` (csrc/binding.cpp); the
    tests pass the CPU-emulation build of the same kernels."""
    name = "cuda"

    def __init__(self, ext):
        self.ext = ext

    def forward(self, q, k, v, spec: AttentionSpec):
        return self.ext.fwd(q, k, v, spec.key_padding_mask, spec.causal, spec.scale,
                            spec.window or 0)

    @staticmethod
    def probes(q, k, lse, spec: AttentionSpec):
        return probe_probs_from_lse(q, k, lse, spec)

    def backward(self, q, k, v, out, lse, dout, spec: AttentionSpec, probs, dprobs):
        dq_add = dk_add = extra = None
        if dprobs is not None:  # the direct term, added by the kernel to its float32 accumulators
            ds, extra = probe_delta_extra(probs, dprobs, spec.probe_rows, spec.q_len)
            dq_add = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
            dk_add = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
            add_probe_direct(dq_add, dk_add, q, k, ds, spec)
        return self.ext.bwd(dout, q, k, v, out, lse, spec.key_padding_mask, extra, dq_add,
                            dk_add, spec.causal, spec.scale, spec.window or 0)


def empty_probs(q, spec: AttentionSpec):
    return torch.zeros(spec.batch, spec.q_heads, spec.probe_rows.shape[1], spec.n_cols,
                       dtype=probs_dtype(q.dtype), device=q.device)


def fused_forward(engine, q, k, v, spec: AttentionSpec):
    """-> (out [B,Hq,Lq,D], lse [B,Hq,Lq] float32, probs [B,Hq,R,C] or None)."""
    out, lse = engine.forward(q, k, v, spec)
    probs = None
    if spec.has_probes:
        empty = spec.probe_rows.shape[1] == 0 or spec.n_cols == 0
        probs = empty_probs(q, spec) if empty else engine.probes(q, k, lse, spec)
    return out, lse, probs


def fused_backward(engine, q, k, v, out, lse, probs, dout, dprobs, spec: AttentionSpec):
    """-> (dq, dk, dv) in the input dtype; ``dprobs`` None when the probes got no gradient."""
    if dout is None:
        dout = torch.zeros_like(out)
    if probs is None or dprobs is None or not probs.numel():
        probs = dprobs = None
    return engine.backward(q, k, v, out, lse, dout, spec, probs, dprobs)


class FusedAttention(torch.autograd.Function):
    """Autograd over an explicit engine object (eager only; the named engines go through the
    torch.library op below)."""

    @staticmethod
    def forward(ctx, engine, spec, q, k, v):
        out, lse, probs = fused_forward(engine, q, k, v, spec)
        ctx.save_for_backward(q, k, v, out, lse, probs)
        ctx.engine, ctx.spec = engine, spec
        ctx.mark_non_differentiable(lse)
        return out, lse, probs

    @staticmethod
    def backward(ctx, dout, _dlse, dprobs=None):
        q, k, v, out, lse, probs = ctx.saved_tensors
        dq, dk, dv = fused_backward(ctx.engine, q, k, v, out, lse, probs, dout, dprobs, ctx.spec)
        return None, None, dq, dk, dv


# ------------------------------------------------------------------------ torch.library ops

def _engine(name: str):
    if name == "triton":
        return TritonEngine
    if name == "cuda":
        from .cuda_ext import load_extension
        return ExtensionEngine(load_extension())
    raise ValueError(f"unknown fused engine {name!r}")


def _spec_of(q, k, kpm, rows, cols, causal, scale, window) -> AttentionSpec:
    b, hq, lq, d = q.shape
    return AttentionSpec(b, hq, k.shape[1], lq, k.shape[2], d, causal, scale,
                         window if window > 0 else None, kpm, rows, cols)


def _no_probes(q):
    return q.new_empty((0,), dtype=probs_dtype(q.dtype))


@torch.library.custom_op("abft_fast::fused_attention", mutates_args=(), device_types=None)
def fused_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       key_padding_mask: torch.Tensor | None, probe_rows: torch.Tensor | None,
                       probe_cols: torch.Tensor | None, causal: bool, scale: float, window: int,
                       engine: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (out, lse, probs); probs is an empty tensor when probe_rows is None."""
    spec = _spec_of(q, k, key_padding_mask, probe_rows, probe_cols, causal, scale, window)
    out, lse, probs = fused_forward(_engine(engine), q, k, v, spec)
    return out, lse, _no_probes(q) if probs is None else probs


@fused_attention_op.register_fake
def _(q, k, v, key_padding_mask, probe_rows, probe_cols, causal, scale, window, engine):
    b, hq, lq, _ = q.shape
    out = q.new_empty(q.shape)  # contiguous, as the engines write it
    lse = q.new_empty((b, hq, lq), dtype=torch.float32)
    if probe_rows is None:
        return out, lse, _no_probes(q)
    c = k.shape[2] if probe_cols is None else probe_cols.shape[1]
    return out, lse, q.new_empty((b, hq, probe_rows.shape[1], c), dtype=probs_dtype(q.dtype))


@torch.library.custom_op("abft_fast::fused_attention_backward", mutates_args=(),
                         device_types=None)
def fused_attention_backward_op(
        dout: torch.Tensor, dprobs: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
        v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, probs: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None, probe_rows: torch.Tensor | None,
        probe_cols: torch.Tensor | None, causal: bool, scale: float, window: int,
        engine: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq, dk, dv) in the input dtype."""
    spec = _spec_of(q, k, key_padding_mask, probe_rows, probe_cols, causal, scale, window)
    return fused_backward(_engine(engine), q, k, v, out, lse, probs, dout, dprobs, spec)


@fused_attention_backward_op.register_fake
def _(dout, dprobs, q, k, v, out, lse, probs, key_padding_mask, probe_rows, probe_cols, causal,
      scale, window, engine):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))  # contiguous


def _setup_context(ctx, inputs, output):
    q, k, v, kpm, rows, cols, causal, scale, window, engine = inputs
    out, lse, probs = output
    ctx.save_for_backward(q, k, v, out, lse, probs if rows is not None else None, kpm, rows,
                          cols)
    ctx.cfg = (causal, scale, window, engine)


def _backward(ctx, dout, _dlse, dprobs):
    q, k, v, out, lse, probs, kpm, rows, cols = ctx.saved_tensors
    causal, scale, window, engine = ctx.cfg
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = fused_attention_backward_op(
        dout, dprobs if probs is not None else None, q, k, v, out, lse, probs, kpm, rows, cols,
        causal, scale, window, engine)
    return dq, dk, dv, None, None, None, None, None, None, None


fused_attention_op.register_autograd(_backward, setup_context=_setup_context)


def attention(q, k, v, spec: AttentionSpec, engine: str, return_lse: bool = False):
    """Run a named fused engine ("triton" or "cuda") through the torch.library op.

    Returns (out, probs or None), or (out, lse, probs or None) with ``return_lse``."""
    out, lse, probs = fused_attention_op(q, k, v, spec.key_padding_mask, spec.probe_rows,
                                         spec.probe_cols, spec.causal, spec.scale,
                                         spec.window or 0, engine)
    probs = probs if spec.has_probes else None
    return (out, lse, probs) if return_lse else (out, probs)
