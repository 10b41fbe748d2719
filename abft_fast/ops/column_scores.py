"""Attention column scores for KV-cache eviction (SnapKV, H2O, TOVA-style statistics), without an
L x L matrix.

``column_scores(q, k)[b, h, j] = sum_{i in rows} P[b, h, i, j]``, P the softmax probabilities of
``abft_fast.attention`` with the same arguments (same visibility rule: causal with bottom-right
alignment when Lq < Lk, key padding, sliding window, GQA). ``rows=None`` sums over every query row
(H2O's accumulated attention); ``rows=[B, R]`` over chosen rows (SnapKV's observation window),
-1 marking an unused slot and a row listed twice counting twice.

Backends:
  torch   PyTorch only. Rows given: the R rows' scores against all keys, their logsumexp, the sum
          over rows: O(R * Lk) memory per head. All rows: blocks of query rows, each against the
          keys of its causal / window band, the block sized so that its scores stay under
          ``BLOCK_BUDGET`` elements; never [Lq, Lk].
  triton  abft_fast.kernels.column_scores: a row-lse pass, then one pass over key blocks that sums
          exp(s - lse) per key; O(N_rows * Lk * D) work, O(N_rows + Lk) memory per head.
  auto    triton on CUDA (float16 / bfloat16 / float32), else torch.
Forward only: inputs that require grad raise unless grad mode is off.
"""
from __future__ import annotations

import torch

from .masks import visible
from .probe_math import row_scores
from .spec import (
    AttentionSpec,
    check_causal,
    check_index_tensor,
    check_index_values,
    check_key_padding_mask,
    check_qkv,
    check_scale,
    check_window,
    padding_parts,
    probs_dtype,
)

COLUMN_BACKENDS = ("auto", "torch", "triton")
BLOCK_BUDGET = 1 << 22  # elements of one query block's scores [B, Hq, block, band] (torch, rows=None)

__all__ = ["COLUMN_BACKENDS", "column_scores", "column_scores_prechecked"]


def column_scores(q, k, *, rows=None, causal=True, scale=None, key_padding_mask=None, window=None,
                  backend="auto"):
    """Per query head and key, the attention probability summed over query rows.

    Args:
      q: [B, Hq, Lq, D] queries; k: [B, Hkv, Lk, D] keys (SDPA layout; Hq a multiple of Hkv).
      rows: [B, R] int64 query positions in [-1, Lq) (-1 = unused slot; duplicates count as often
        as listed), or None for every query row.
      causal, scale, key_padding_mask, window: as in :func:`abft_fast.attention`.
      backend: "auto" (triton on CUDA, torch otherwise), "torch" or "triton".

    Returns:
      [B, Hq, Lk] float32 (float64 for float64 inputs): ``sum_{i in rows} P[i, j]``. Masked keys,
      unused slots and rows that see no key contribute 0; with rows=None each row's scores sum to
      1 (0 for a row that sees no key), so the result sums to the number of non-empty rows.

    Forward only: raises RuntimeError if q or k requires grad while grad mode is on.
    """
    return _column_scores(q, k, rows, causal, scale, key_padding_mask, window, backend, True)


def column_scores_prechecked(q, k, *, rows=None, causal=True, scale=None, key_padding_mask=None,
                             window=None, backend="auto"):
    """``column_scores`` without the value checks (rows in range, integer masks 0/1), for callers
    that validated the values once (``abft_fast.hf``). Shapes, dtypes and devices are checked."""
    return _column_scores(q, k, rows, causal, scale, key_padding_mask, window, backend, False)


def _column_scores(q, k, rows, causal, scale, key_padding_mask, window, backend, check_values):
    if backend not in COLUMN_BACKENDS:
        raise ValueError(f"backend must be one of {COLUMN_BACKENDS}, got {backend!r}")
    spec = make_column_spec(q, k, rows=rows, causal=causal, scale=scale,
                            key_padding_mask=key_padding_mask, window=window,
                            check_values=check_values)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        raise RuntimeError("column_scores does not support gradients; call it under "
                           "torch.no_grad() or detach q and k")
    if backend == "auto":
        backend = "triton" if q.device.type == "cuda" and q.dtype != torch.float64 else "torch"
    if backend == "triton":
        return _triton(q, k, spec)
    return _torch(q, k, spec)


def make_column_spec(q, k, *, rows, causal, scale, key_padding_mask, window,
                     check_values=True) -> AttentionSpec:
    """Validate the arguments of :func:`column_scores` (naming the argument); the rows travel as
    the spec's ``probe_rows`` (None = every row), ``probe_cols`` is None."""
    check_qkv(q, k)
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    causal = check_causal(causal)
    scale = check_scale(scale, d)
    window = check_window(window, causal)
    kpm = check_key_padding_mask(key_padding_mask, b, lk, q.device, check_values)
    if rows is not None:
        check_index_tensor("rows", rows, batch=b, device=q.device)
        if check_values:
            check_index_values("rows", rows, lq)
    return AttentionSpec(b, hq, hkv, lq, lk, d, causal, scale, window, kpm, rows, None,
                         *padding_parts(key_padding_mask, lq))


def _real_rows(spec: AttentionSpec):
    """[B, R] (or [B, Lq] for every row) bool: rows that count; None when all do. Rows of a
    zero_padded_queries Padding at padded positions see no key, so they count 0."""
    qm = spec.query_mask
    if qm is None or spec.probe_rows is None:
        return qm
    return torch.gather(qm, 1, spec.probe_rows.clamp(min=0))


# ------------------------------------------------------------------------------------- triton

def _triton(q, k, spec: AttentionSpec):
    from .available import triton_available
    ok, why = triton_available(q.device)
    if not ok:
        raise RuntimeError(f"backend='triton' is not available: {why}")
    if q.dtype == torch.float64:
        raise TypeError("backend='triton' supports float16, bfloat16 and float32 inputs; got "
                        "float64 (use backend='torch' for float64)")
    from ..kernels.column_scores import column_scores_fwd
    real = _real_rows(spec)
    row_mask = None if real is None else real[:, None, :].expand(-1, spec.q_heads, -1)
    return column_scores_fwd(q, k, spec.probe_rows, spec.key_padding_mask, causal=spec.causal,
                             window=spec.window, scale=spec.scale, row_mask=row_mask)


# -------------------------------------------------------------------------------------- torch

def _torch(q, k, spec: AttentionSpec):
    with torch.no_grad():
        if spec.probe_rows is not None:
            return _torch_rows(q, k, spec)
        return _torch_all_rows(q, k, spec)


def _probs(s, vis):
    """Softmax of scores s [..., n] over the visible entries; rows with none give 0."""
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return torch.where(vis, torch.exp(s - lse), torch.zeros_like(s))


def _torch_rows(q, k, spec: AttentionSpec):
    rows = spec.probe_rows
    out_dt = probs_dtype(q.dtype)
    if rows.shape[1] == 0:
        return torch.zeros(spec.batch, spec.q_heads, spec.k_len, dtype=out_dt, device=q.device)
    s = row_scores(q, k, rows, out_dt) * spec.scale  # [B, Hq, R, Lk]
    vis = visible(rows.clamp(min=0), torch.arange(spec.k_len, device=q.device), lq=spec.q_len,
                  lk=spec.k_len, causal=spec.causal, window=spec.window,
                  key_padding_mask=spec.key_padding_mask)
    vis = vis & (rows >= 0).unsqueeze(-1)
    real = _real_rows(spec)
    if real is not None:
        vis = vis & real.unsqueeze(-1)
    return _probs(s, vis.unsqueeze(1)).sum(2)  # vis [B, 1, R, Lk]


def _band(spec: AttentionSpec, q0: int, q1: int) -> tuple[int, int]:
    """[lo, hi) of the keys that queries [q0, q1) can see under the causal / window rule."""
    lo, hi = 0, spec.k_len
    if spec.causal:
        hi = max(0, min(spec.k_len, q1 + spec.offset))
        if spec.window is not None:
            lo = max(0, q0 + spec.offset - spec.window + 1)
    return lo, hi


def _torch_all_rows(q, k, spec: AttentionSpec):
    b, hq, hkv, g, d = spec.batch, spec.q_heads, spec.kv_heads, spec.group, spec.head_dim
    out_dt = probs_dtype(q.dtype)
    out = torch.zeros(b, hq, spec.k_len, dtype=out_dt, device=q.device)
    block = max(16, BLOCK_BUDGET // max(1, b * hq * spec.k_len))
    kd = k.to(out_dt)
    for q0 in range(0, spec.q_len, block):
        q1 = min(spec.q_len, q0 + block)
        lo, hi = _band(spec, q0, q1)
        if hi <= lo:
            continue
        n = q1 - q0
        qb = q[:, :, q0:q1].to(out_dt).reshape(b, hkv, g * n, d)
        s = torch.matmul(qb, kd[:, :, lo:hi].transpose(-1, -2)).reshape(b, hq, n, hi - lo)
        rows = torch.arange(q0, q1, device=q.device).unsqueeze(0).expand(b, -1)
        vis = visible(rows, torch.arange(lo, hi, device=q.device), lq=spec.q_len, lk=spec.k_len,
                      causal=spec.causal, window=spec.window,
                      key_padding_mask=spec.key_padding_mask)  # [B, n, band]
        if spec.query_mask is not None:
            vis = vis & spec.query_mask[:, q0:q1, None]
        vis = vis.unsqueeze(1)
        out[:, :, lo:hi] += _probs(s * spec.scale, vis).sum(2)
    return out
