"""Visibility rule shared by every backend (small, dense helpers; never used by the fused kernels).

Query i (0 <= i < Lq) sits at absolute position i + (Lk - Lq) ("bottom-right" alignment, so that
Lq < Lk is a decode step against a cache). Key j is visible to query i iff
  key_padding_mask[b, j]                                  (when given)
  and j <= i + (Lk - Lq)                                  (when causal)
  and j >  i + (Lk - Lq) - window                         (when window is given; needs causal)
"""
from __future__ import annotations

import torch


def visible(rows: torch.Tensor, cols: torch.Tensor, *, lq: int, lk: int, causal: bool,
            window: int | None, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Bool visibility of keys ``cols`` to queries ``rows``.

    rows: [B, R] int64 query positions; cols: [C] or [B, C] int64 key positions.
    Returns [B, R, C] bool. Out-of-range positions (e.g. -1 slots) must be handled by the caller.
    """
    b = rows.shape[0]
    if cols.dim() == 1:
        cols = cols.unsqueeze(0).expand(b, -1)
    ok = torch.ones(b, rows.shape[1], cols.shape[1], dtype=torch.bool, device=rows.device)
    qpos = (rows + (lk - lq)).unsqueeze(-1)
    kpos = cols.unsqueeze(1)
    if causal:
        ok &= kpos <= qpos
        if window is not None:
            ok &= kpos > qpos - window
    if key_padding_mask is not None:
        ok &= torch.gather(key_padding_mask, 1, cols.clamp(0, lk - 1)).unsqueeze(1)
    return ok
