"""Backend "triton": autograd over the fused Triton kernels (abft_fast.kernels.attention).

Forward: the flash kernel writes out and lse; the probe kernel writes P[r, c] from lse.
Backward: the probe gradient G folds into the flash backward through delta (see
abft_fast/probe_math.py), plus the R x C direct term into dq and dk.
"""
from __future__ import annotations

import torch

from .kernels import attention as K
from .probe_math import add_probe_direct, probe_delta_extra


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, kpm, window, rows, cols):
        out, lse = K.attention_fwd(q, k, v, kpm, causal=causal, window=window, scale=scale)
        probs = None
        if rows is not None:
            probs = K.probe_fwd(q, k, lse, rows, cols, kpm, causal=causal, window=window,
                                scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, kpm, rows, cols, probs)
        ctx.cfg = (causal, scale, window)
        ctx.mark_non_differentiable(lse)
        if probs is None:
            return out, lse
        return out, lse, probs

    @staticmethod
    def backward(ctx, dout, _dlse, dprobs=None):
        q, k, v, out, lse, kpm, rows, cols, probs = ctx.saved_tensors
        causal, scale, window = ctx.cfg
        if dout is None:
            dout = torch.zeros_like(out)
        ds = extra = None
        if probs is not None and dprobs is not None and probs.numel():
            ds, extra = probe_delta_extra(probs, dprobs, rows, q.shape[2])
        dq, dk, dv = K.attention_bwd(q, k, v, out, lse, dout, kpm, causal=causal, window=window,
                                     scale=scale, delta_extra=extra)
        if ds is not None:  # the R x C direct term, straight into the float32 accumulators
            add_probe_direct(dq, dk, q, k, ds, rows, cols, scale=scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def attention(q, k, v, causal, scale, key_padding_mask, window, probe_rows, probe_cols,
              return_lse=False):
    """Same contract as abft_fast.attention (arguments already checked). With return_lse, also
    returns lse [B, Hq, Lq] float32 (-inf on rows with no visible key)."""
    res = _FusedAttention.apply(q, k, v, causal, scale, key_padding_mask, window, probe_rows,
                                probe_cols)
    out, lse = res[0], res[1]
    probs = res[2] if probe_rows is not None else None
    if return_lse:
        return out, lse, probs
    return out, probs
