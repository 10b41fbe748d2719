"""Pure PyTorch backend: SDPA for the output, probe rows recomputed on the side.

Memory: the output uses ``scaled_dot_product_attention`` (with a [B, 1, Lq, Lk] bool mask only when
padding, a window or Lq != Lk needs one); the probes cost O(R * Lk) per head: scores of the R probe
rows against all keys, their log-sum-exp, then the C gathered columns. Autograd does the backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .masks import visible
from .probe_math import row_scores


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the probe probabilities: float32 for 16-bit inputs, else the input dtype."""
    return torch.promote_types(dtype, torch.float32)


def attention(q, k, v, causal, scale, key_padding_mask, window, probe_rows, probe_cols):
    out = _output(q, k, v, causal, scale, key_padding_mask, window)
    probs = None
    if probe_rows is not None:
        probs = probe_probs(q, k, causal, scale, key_padding_mask, window, probe_rows, probe_cols)
    return out, probs


def _output(q, k, v, causal, scale, kpm, window):
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    gqa = hq != hkv
    if kpm is None and window is None and (not causal or lq == lk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                              enable_gqa=gqa)
    rows = torch.arange(lq, device=q.device).unsqueeze(0).expand(b, -1)
    vis = visible(rows, torch.arange(lk, device=q.device), lq=lq, lk=lk, causal=causal,
                  window=window, key_padding_mask=kpm)  # [B, Lq, Lk]
    has = vis.any(-1, keepdim=True)  # [B, Lq, 1]
    # A row with no visible key would make SDPA return NaN (and NaN gradients): let it see every
    # key, then zero its output; its zero output gradient then contributes nothing to k and v.
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=(vis | ~has).unsqueeze(1),
                                         scale=scale, enable_gqa=gqa)
    return out.masked_fill(~has.unsqueeze(1), 0.0)


def probe_probs(q, k, causal, scale, kpm, window, probe_rows, probe_cols):
    """Probabilities of probe rows x probe cols, [B, Hq, R, C] (or [B, Hq, R, Lk])."""
    b, hq, lq, _ = q.shape
    lk = k.shape[2]
    rows = probe_rows.clamp(min=0)
    s = row_scores(q, k, probe_rows, acc_dtype(q.dtype)) * scale  # [B, Hq, R, Lk]
    vis = visible(rows, torch.arange(lk, device=q.device), lq=lq, lk=lk, causal=causal,
                  window=window, key_padding_mask=kpm)
    vis = vis & (probe_rows >= 0).unsqueeze(-1)
    vis = vis.unsqueeze(1)  # [B, 1, R, Lk]
    # masked keys get -inf; a row with no visible key keeps finite scores so that logsumexp and its
    # gradient stay finite, and is zeroed by the final where.
    has = vis.any(-1, keepdim=True)
    s = torch.where(vis, s, torch.where(has, float("-inf"), 0.0).to(s.dtype))
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.where(vis, torch.exp(s - lse), torch.zeros_like(s))
    if probe_cols is None:
        return p
    cols = probe_cols.clamp(min=0)
    p = torch.gather(p, 3, cols[:, None, None, :].expand(b, hq, rows.shape[1], -1))
    return p * (probe_cols >= 0)[:, None, None, :].to(p.dtype)
