"""Naive reference attention: materialises the full L x L matrix. For tests only.

Runs in whatever dtype it is given (use float64 for the ground truth). Same semantics as
``abft_fast.attention``: rows with no visible key give out = 0, lse = -inf, probs = 0; unused probe
slots (-1) give probs = 0. It shares no code with the op: the visibility rule and the probe
gathering are written out again here from the op's docstring, so that a bug in the op's
``masks.visible`` or ``probe_math`` cannot hide in its own reference.
"""
from __future__ import annotations

import torch


def visibility(b, lq, lk, causal, window, key_padding_mask, device):
    """[B, Lq, Lk] bool: key j visible to query i iff (not causal or j <= i') and (no window or
    j > i' - window) and the key is not padding, where i' = i + (Lk - Lq)."""
    i = torch.arange(lq, device=device)[:, None] + (lk - lq)
    j = torch.arange(lk, device=device)[None, :]
    vis = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if causal:
        vis = vis & (j <= i)
        if window is not None:
            vis = vis & (j > i - window)
    vis = vis[None].expand(b, lq, lk)
    if key_padding_mask is not None:
        vis = vis & (key_padding_mask[:, None, :] != 0)
    return vis


def _pick(x, idx, dim):
    """x [B, H, A, Bd] indexed along dim (2 or 3) at idx [B, n] (-1: a slot of zeros)."""
    bi = torch.arange(x.shape[0], device=x.device)[:, None]
    moved = x.movedim(dim, 1)  # [B, A|Bd, H, other]
    got = moved[bi, idx.clamp(min=0)]  # [B, n, H, other]
    got = got * (idx >= 0)[:, :, None, None].to(got.dtype)
    return got.movedim(1, dim)


def attention_reference(q, k, v, *, causal=True, scale=None, key_padding_mask=None, window=None,
                        probe_rows=None, probe_cols=None, zero_padded_queries=False):
    """q [B,Hq,Lq,D], k/v [B,Hkv,Lk,D] -> (out [B,Hq,Lq,D], lse [B,Hq,Lq], probs or None).

    probs: [B,Hq,R,C] (or [B,Hq,R,Lk] when probe_cols is None). zero_padded_queries: query i
    whose position i + (Lk - Lq) is padding (or before key 0) has no visible key at all.
    """
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    kk = k.repeat_interleave(g, dim=1)
    vv = v.repeat_interleave(g, dim=1)
    s = scale * torch.matmul(q, kk.transpose(-1, -2))  # [B,Hq,Lq,Lk]
    vis = visibility(b, lq, lk, causal, window, key_padding_mask, q.device)
    if zero_padded_queries and key_padding_mask is not None:
        pos = torch.arange(lq, device=q.device) + (lk - lq)  # each query's own key position
        real = (key_padding_mask[:, pos.clamp(min=0)] != 0) & (pos >= 0)  # [B, Lq]
        vis = vis & real[:, :, None]
    vis = vis.unsqueeze(1)
    has = vis.any(-1, keepdim=True)  # [B,1,Lq,1]
    # rows with no visible key keep finite scores (so gradients stay finite) and are zeroed below
    s = torch.where(vis, s, torch.where(has, float("-inf"), 0.0).to(s.dtype))
    lse_all = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.where(vis, torch.exp(s - lse_all), torch.zeros_like(s))
    lse = torch.where(has, lse_all, float("-inf")).squeeze(-1)  # -inf on empty rows
    out = torch.matmul(p, vv)
    probs = None
    if probe_rows is not None:
        probs = _pick(p, probe_rows, 2)  # [B,Hq,R,Lk]
        if probe_cols is not None:
            probs = _pick(probs, probe_cols, 3)
    return out, lse, probs
