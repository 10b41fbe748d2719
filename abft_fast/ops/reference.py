"""Naive reference attention: materialises the full L x L matrix. For tests only.

Runs in whatever dtype it is given (use float64 for the ground truth). Same semantics as
``abft_fast.attention``: rows with no visible key give out = 0, lse = -inf, probs = 0; unused probe
slots (-1) give probs = 0.
"""
from __future__ import annotations

import torch

from .masks import visible
from .probe_math import gather_slots


def attention_reference(q, k, v, *, causal=True, scale=None, key_padding_mask=None, window=None,
                        probe_rows=None, probe_cols=None):
    """q [B,Hq,Lq,D], k/v [B,Hkv,Lk,D] -> (out [B,Hq,Lq,D], lse [B,Hq,Lq], probs or None).

    probs: [B,Hq,R,C] (or [B,Hq,R,Lk] when probe_cols is None).
    """
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    kk = k.repeat_interleave(g, dim=1)
    vv = v.repeat_interleave(g, dim=1)
    s = scale * torch.matmul(q, kk.transpose(-1, -2))  # [B,Hq,Lq,Lk]
    rows = torch.arange(lq, device=q.device).unsqueeze(0).expand(b, -1)
    cols = torch.arange(lk, device=q.device)
    vis = visible(rows, cols, lq=lq, lk=lk, causal=causal, window=window,
                  key_padding_mask=key_padding_mask).unsqueeze(1)  # [B,1,Lq,Lk]
    has = vis.any(-1, keepdim=True)  # [B,1,Lq,1]
    # rows with no visible key keep finite scores (so gradients stay finite) and are zeroed below
    s = torch.where(vis, s, torch.where(has, float("-inf"), 0.0).to(s.dtype))
    lse_all = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.where(vis, torch.exp(s - lse_all), torch.zeros_like(s))
    lse = torch.where(has, lse_all, float("-inf")).squeeze(-1)  # -inf on empty rows
    out = torch.matmul(p, vv)
    probs = None
    if probe_rows is not None:
        probs = gather_slots(p, probe_rows, 2)  # [B,Hq,R,Lk]
        if probe_cols is not None:
            probs = gather_slots(probs, probe_cols, 3)
    return out, lse, probs
