"""Triton probe kernels: attention probabilities of a few query rows, and their backward, for the
"sdpa" engine (the output and its gradient come from PyTorch's SDPA; these give only the probes).

Per key/value head, the probe rows of its G query heads form one tile of M = G x R rows
(row m: query head hk * G + m // R, probe slot m % R). With scale s and visibility as in
abft_fast.kernels.attention (causal, window, key padding; query i at absolute position i + Lk - Lq):

  _probe_fwd_kernel   lse_r = log sum_j exp(s q_r . k_j) over the visible keys (online, one pass
                      over the tile's key range: from the earliest row's first window key,
                      rounded down to a key block, to the latest row's causal limit), then
                      P[r, c] = exp(s q_r . k_c - lse_r) at the probe columns (or
                      every key: full rows). Writes P [B, Hq, R, C] and lse [B, Hq, R].
  _probe_dk_kernel    dK_j = s * sum_r dS_rj q_r for one key block (dS in the input dtype for the
                      tensor-core dot; in bfloat16 as two parts, see _dot_ds), with
                      dS_rj = E_rj - u_r P_rj, E the probe gradient scattered to full rows
                      (E_rj = sum_{c: cols_c = j} P_rc G_rc) and u_r = sum_c P_rc G_rc;
                      stores dK, or adds it in place into a given dk of any strides (unit last
                      stride), e.g. SDPA's dk of a transposed k.
  _probe_dq_kernel    dQ_r = s * sum_j dS_rj k_j for one tile of probe rows, over the same key
                      range as the forward.

O(R * Lk * D) work and O(R * Lk) memory per head; no L x L anywhere. No autograd here.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention import _dot, _interpreting, _key_ok, padded_head_dim


@triton.jit
def _probe_tile(Q, ROWS, s_qb, s_qh, s_ql, b, hk, G, R, Lq, D, pid_m,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows of probe tile pid_m: (q [BM, BD], head index, slot, row position, row valid)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_tile = offs_m < G * R
    g = offs_m // R
    slot = offs_m % R
    h = hk * G + g
    row = tl.load(ROWS + b * R + slot, mask=in_tile, other=-1)
    ok = in_tile & (row >= 0) & (row < Lq)
    row_c = tl.where(ok, row, 0)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + b * s_qb + h[:, None] * s_qh + row_c[:, None] * s_ql + offs_d[None, :],
                mask=ok[:, None] & (offs_d[None, :] < D), other=0.0)
    return q, h, slot, row_c, ok


@triton.jit
def _row_visible(row_c, row_ok, offs_n, kp_ok, OFF, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    ok = row_ok[:, None] & kp_ok[None, :]
    if CAUSAL:
        qpos = row_c[:, None] + OFF
        ok = ok & (offs_n[None, :] <= qpos)
        if WINDOW > 0:
            ok = ok & (offs_n[None, :] > qpos - WINDOW)
    return ok


@triton.jit
def _dot_ds(ds, x, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """ds (float32) @ x (input dtype) on tensor cores. In bfloat16 ds goes in as the sum of two
    bfloat16 parts (ds rounded, then its remainder): one rounding of ds to bfloat16 (8 bits) costs
    the probe gradients twice the error of the same maths in PyTorch, which keeps ds in float32;
    float16 (11 bits) and float32 take one dot."""
    if x.dtype == tl.bfloat16:
        hi = ds.to(tl.bfloat16)
        lo = (ds - hi.to(tl.float32)).to(tl.bfloat16)
        return _dot(hi, x, PREC, UPCAST) + _dot(lo, x, PREC, UPCAST)
    return _dot(ds.to(x.dtype), x, PREC, UPCAST)


@triton.jit
def _key_range(row_c, row_ok, OFF, Lk, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """[lo, hi) of the keys a probe tile scans: from the first key the earliest row's window
    shows (rounded down to a key block) to the latest row's causal limit; lo >= hi when no row
    of the tile is valid."""
    lo = 0
    hi = Lk
    if CAUSAL:
        hi = tl.minimum(Lk, tl.max(tl.where(row_ok, row_c, 0)).to(tl.int32) + OFF + 1)
        if WINDOW > 0:
            first = tl.min(tl.where(row_ok, row_c, Lk)).to(tl.int32) + OFF - WINDOW + 1
            lo = tl.maximum(first, 0) // BLOCK_N * BLOCK_N
    return lo, hi


@triton.jit
def _row_grad_stats(LSE, U, b, h, slot, Hq, R, row_ok):
    """(index of (b, h, slot), row valid and seeing a key, base-2 lse, u) of probe tile rows."""
    ridx = (b * Hq + h) * R + slot
    lse = tl.load(LSE + ridx, mask=row_ok, other=float("-inf"))
    row_ok = row_ok & (lse != float("-inf"))
    lse2 = tl.where(row_ok, lse * 1.4426950408889634, 0.0)
    u = tl.load(U + ridx, mask=row_ok, other=0.0)
    return ridx, row_ok, lse2, u


@triton.jit
def _probe_fwd_kernel(Q, K, ROWS, COLS, P, LSE, KPM,
                      s_qb, s_qh, s_ql, s_kb, s_kh, s_kl, s_kpm_b,
                      Hq, G, Lq, Lk, D, R, C, sm_scale,
                      CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
                      FULL_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)
    Hkv = Hq // G
    b = bhk // Hkv
    hk = bhk % Hkv
    OFF = Lk - Lq
    q, h, slot, row_c, row_ok = _probe_tile(Q, ROWS, s_qb, s_qh, s_ql, b, hk, G, R, Lq, D, pid_m,
                                            BLOCK_M, BLOCK_D)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    k_base = K + b * s_kb + hk * s_kh
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    lo, hi = _key_range(row_c, row_ok, OFF, Lk, CAUSAL, WINDOW, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kp_ok = _key_ok(KPM, s_kpm_b, b, offs_n, Lk, HAS_KPM)
        kt = tl.load(k_base + offs_n[None, :] * s_kl + offs_d[:, None],
                     mask=(offs_n[None, :] < Lk) & dmask[:, None], other=0.0)
        s = _dot(q, kt, PREC, UPCAST) * qk_scale
        s = tl.where(_row_visible(row_c, row_ok, offs_n, kp_ok, OFF, CAUSAL, WINDOW), s,
                     float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    empty = l_i == 0.0
    lse2 = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    out_row = (b * Hq + h) * R + slot  # [BM] index of (b, h, slot)
    in_tile = pid_m * BLOCK_M + tl.arange(0, BLOCK_M) < G * R
    tl.store(LSE + out_row, tl.where(empty, float("-inf"), lse2 * 0.6931471805599453),
             mask=in_tile)
    n_out = Lk if FULL_ROWS else C
    for start_c in tl.range(0, n_out, BLOCK_N):
        offs_c = start_c + tl.arange(0, BLOCK_N)
        cmask = offs_c < n_out
        if FULL_ROWS:
            col = offs_c
        else:
            col = tl.load(COLS + b * C + offs_c, mask=cmask, other=-1)
        col_ok = cmask & (col >= 0)
        col_c = tl.where(col_ok, col, 0)
        kp_ok = _key_ok(KPM, s_kpm_b, b, col_c, Lk, HAS_KPM) & col_ok
        kt = tl.load(k_base + col_c[None, :] * s_kl + offs_d[:, None],
                     mask=col_ok[None, :] & dmask[:, None], other=0.0)
        s = _dot(q, kt, PREC, UPCAST) * qk_scale
        ok = _row_visible(row_c, row_ok, col_c, kp_ok, OFF, CAUSAL, WINDOW)
        p = tl.where(ok, tl.exp2(tl.where(ok, s - lse2[:, None], 0.0)), 0.0)
        tl.store(P + out_row[:, None] * n_out + offs_c[None, :], p,
                 mask=in_tile[:, None] & cmask[None, :])


@triton.jit
def _probe_dk_kernel(Q, K, ROWS, LSE, U, E, DK, KPM,
                     s_qb, s_qh, s_ql, s_kb, s_kh, s_kl, s_kpm_b, s_dkb, s_dkh, s_dkl,
                     Hq, G, Lq, Lk, D, R, sm_scale,
                     CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     PREC: tl.constexpr, UPCAST: tl.constexpr, ACCUMULATE: tl.constexpr):
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)
    Hkv = Hq // G
    b = bhk // Hkv
    hk = bhk % Hkv
    OFF = Lk - Lq
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    nmask = offs_n < Lk
    kp_ok = _key_ok(KPM, s_kpm_b, b, offs_n, Lk, HAS_KPM)
    kt = tl.load(K + b * s_kb + hk * s_kh + offs_n[None, :] * s_kl + offs_d[:, None],
                 mask=nmask[None, :] & dmask[:, None], other=0.0)
    qk_scale = sm_scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for pid_m in range(0, tl.cdiv(G * R, BLOCK_M)):
        q, h, slot, row_c, row_ok = _probe_tile(Q, ROWS, s_qb, s_qh, s_ql, b, hk, G, R, Lq, D,
                                                pid_m, BLOCK_M, BLOCK_D)
        ridx, row_ok, lse2, u = _row_grad_stats(LSE, U, b, h, slot, Hq, R, row_ok)
        s = _dot(q, kt, PREC, UPCAST) * qk_scale
        ok = _row_visible(row_c, row_ok, offs_n, kp_ok, OFF, CAUSAL, WINDOW)
        p = tl.where(ok, tl.exp2(tl.where(ok, s - lse2[:, None], 0.0)), 0.0)
        e = tl.load(E + ridx[:, None] * Lk + offs_n[None, :],
                    mask=row_ok[:, None] & nmask[None, :], other=0.0)
        ds = e - u[:, None] * p  # [BM, BN]
        dk += _dot_ds(tl.trans(ds), q, PREC, UPCAST)
    dk_ptrs = DK + b * s_dkb + hk * s_dkh + offs_n[:, None] * s_dkl + offs_d[None, :]
    dk_mask = nmask[:, None] & dmask[None, :]
    dk = dk * sm_scale
    if ACCUMULATE:  # add into an existing gradient (the output's dk), in its dtype
        dk += tl.load(dk_ptrs, mask=dk_mask, other=0.0).to(tl.float32)
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=dk_mask)


@triton.jit
def _probe_dq_kernel(Q, K, ROWS, LSE, U, E, DQ, KPM,
                     s_qb, s_qh, s_ql, s_kb, s_kh, s_kl, s_kpm_b,
                     Hq, G, Lq, Lk, D, R, sm_scale,
                     CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)
    Hkv = Hq // G
    b = bhk // Hkv
    hk = bhk % Hkv
    OFF = Lk - Lq
    q, h, slot, row_c, row_ok = _probe_tile(Q, ROWS, s_qb, s_qh, s_ql, b, hk, G, R, Lq, D, pid_m,
                                            BLOCK_M, BLOCK_D)
    ridx, row_ok, lse2, u = _row_grad_stats(LSE, U, b, h, slot, Hq, R, row_ok)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    k_base = K + b * s_kb + hk * s_kh
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _key_range(row_c, row_ok, OFF, Lk, CAUSAL, WINDOW, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        nmask = offs_n < Lk
        kp_ok = _key_ok(KPM, s_kpm_b, b, offs_n, Lk, HAS_KPM)
        k = tl.load(k_base + offs_n[:, None] * s_kl + offs_d[None, :],
                    mask=nmask[:, None] & dmask[None, :], other=0.0)
        s = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale
        ok = _row_visible(row_c, row_ok, offs_n, kp_ok, OFF, CAUSAL, WINDOW)
        p = tl.where(ok, tl.exp2(tl.where(ok, s - lse2[:, None], 0.0)), 0.0)
        e = tl.load(E + ridx[:, None] * Lk + offs_n[None, :],
                    mask=row_ok[:, None] & nmask[None, :], other=0.0)
        ds = e - u[:, None] * p
        dq += _dot_ds(ds, k, PREC, UPCAST)
    tl.store(DQ + ridx[:, None] * D + offs_d[None, :], dq * sm_scale,
             mask=row_ok[:, None] & dmask[None, :])


# ----------------------------------------------------------------------------------------------
# launchers


def _tiles(m_rows: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): probe tiles of up to 64 rows, key blocks of 32 (16 in the interpreter).
    32-key blocks keep the 16-bit kernels free of spills at d <= 128 on sm_90 (tests/aot_compile.py
    reads it from the SASS; 64-key blocks spilled in the forward and dq kernels at d = 128)."""
    if _interpreting() or device.type != "cuda":
        return 16, 16
    return min(64, max(16, triton.next_power_of_2(m_rows))), 32


def _flags(kpm, causal, window):
    return dict(CAUSAL=bool(causal), WINDOW=int(window or 0), HAS_KPM=kpm is not None)


def _prep(q, k, kpm):
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    kpm_arg = kpm.to(torch.uint8).contiguous() if kpm is not None else q
    return q, k, kpm_arg, (kpm_arg.stride(0) if kpm is not None else 0)


def _dots(q):
    return dict(PREC="ieee" if q.dtype == torch.float32 else "tf32",
                UPCAST=_interpreting() and q.dtype == torch.bfloat16)


def accepts_dk_out(dk) -> bool:
    """Whether the dk kernel can add in place into ``dk``: unit last stride (as for q and k) and
    no two elements at one address (each dimension, by increasing stride, steps past the reach of
    the ones before it: true of dense tensors in any dimension order and of slices of them)."""
    if dk.stride(-1) != 1:
        return False
    reach = 0
    for stride, size in sorted((st, n) for st, n in zip(dk.stride(), dk.shape) if n > 1):
        if stride <= reach:
            return False
        reach += (size - 1) * stride
    return True


def probe_rows_fwd(q, k, rows, cols=None, key_padding_mask=None, *, causal=True, window=None,
                   scale=None):
    """Probabilities of the probe rows from scratch (no stored lse needed).

    q [B,Hq,Lq,D], k [B,Hkv,Lk,D]; rows [B,R] int64 (-1 unused); cols [B,C] int64 or None (all
    keys). Returns (P [B,Hq,R,C] float32, lse [B,Hq,R] float32, -inf for unused / empty rows)."""
    q, k, kpm, s_kpm = _prep(q, k, key_padding_mask)
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g, r = hq // hkv, rows.shape[1]
    c = lk if cols is None else cols.shape[1]
    scale = d ** -0.5 if scale is None else float(scale)
    p = torch.empty(b, hq, r, c, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, hq, r, dtype=torch.float32, device=q.device)
    if r == 0:
        return p, lse
    if c == 0:
        lse.fill_(float("-inf"))
        return p, lse
    rows = rows.contiguous()
    bm, bn = _tiles(g * r, q.device)
    _probe_fwd_kernel[(triton.cdiv(g * r, bm), b * hkv)](
        q, k, rows, rows if cols is None else cols.contiguous(), p, lse, kpm,
        *q.stride()[:3], *k.stride()[:3], s_kpm, hq, g, lq, lk, d, r, c, scale,
        **_flags(key_padding_mask, causal, window), FULL_ROWS=cols is None, BLOCK_M=bm,
        BLOCK_N=bn, BLOCK_D=padded_head_dim(d), **_dots(q), num_warps=4)
    return p, lse


def probe_rows_bwd(q, k, rows, lse, u, e, key_padding_mask=None, *, causal=True, window=None,
                   scale=None, dk_out=None):
    """Gradient of the probes into q (probe rows only) and k.

    lse [B,Hq,R] from probe_rows_fwd; u [B,Hq,R] = sum_c P G; e [B,Hq,R,Lk] = P G scattered to
    the probe columns (float32). Returns (dq_rows [B,Hq,R,D], dk [B,Hkv,Lk,D]), float32; dq_rows
    is 0 on unused slots and rows with no visible key. With ``dk_out`` (a [B,Hkv,Lk,D] tensor of
    any float dtype and any strides whose last is 1 and whose elements do not overlap, e.g. the
    output's dk, often a transposed view in HF models; see ``accepts_dk_out``) the probe part is
    added into it in place and dk_out is returned as dk."""
    q, k, kpm, s_kpm = _prep(q, k, key_padding_mask)
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g, r = hq // hkv, rows.shape[1]
    scale = d ** -0.5 if scale is None else float(scale)
    dq = torch.zeros(b, hq, r, d, dtype=torch.float32, device=q.device)
    if dk_out is not None:
        if tuple(dk_out.shape) != (b, hkv, lk, d) or not accepts_dk_out(dk_out):
            raise ValueError(f"dk_out must be a [{b}, {hkv}, {lk}, {d}] tensor with a unit last "
                             f"stride and no overlapping elements, got {tuple(dk_out.shape)} "
                             f"with strides {dk_out.stride()}")
        dk = dk_out
    else:
        dk = torch.empty(b, hkv, lk, d, dtype=torch.float32, device=q.device)
    if r == 0:
        return dq, dk if dk_out is not None else dk.zero_()
    rows, lse, u, e = rows.contiguous(), lse.contiguous(), u.contiguous(), e.contiguous()
    bm, bn = _tiles(g * r, q.device)
    common = (*q.stride()[:3], *k.stride()[:3], s_kpm)
    sizes = (hq, g, lq, lk, d, r, scale)
    meta = dict(**_flags(key_padding_mask, causal, window), BLOCK_M=bm, BLOCK_N=bn,
                BLOCK_D=padded_head_dim(d), **_dots(q), num_warps=4)
    _probe_dk_kernel[(triton.cdiv(lk, bn), b * hkv)](q, k, rows, lse, u, e, dk, kpm, *common,
                                                     *dk.stride()[:3], *sizes, **meta,
                                                     ACCUMULATE=dk_out is not None)
    _launch_dq(q, k, rows, lse, u, e, dq, kpm, s_kpm, scale, key_padding_mask, causal, window)
    return dq, dk


def _launch_dq(q, k, rows, lse, u, e, dq, kpm, s_kpm, scale, key_padding_mask, causal, window):
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g, r = hq // hkv, rows.shape[1]
    bm, bn = _tiles(g * r, q.device)
    _probe_dq_kernel[(triton.cdiv(g * r, bm), b * hkv)](
        q, k, rows, lse, u, e, dq, kpm, *q.stride()[:3], *k.stride()[:3], s_kpm, hq, g, lq, lk,
        d, r, scale, **_flags(key_padding_mask, causal, window), BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_D=padded_head_dim(d), **_dots(q), num_warps=4)


def probe_rows_dq(q, k, rows, lse, u, e, key_padding_mask=None, *, causal=True, window=None,
                  scale=None):
    """The probe rows' dq alone (as ``probe_rows_bwd``, without dk): [B,Hq,R,D] float32, 0 on
    unused slots and rows with no visible key. lse [B,Hq,R] is the probe rows' lse."""
    q, k, kpm, s_kpm = _prep(q, k, key_padding_mask)
    b, hq, _, d = q.shape
    scale = d ** -0.5 if scale is None else float(scale)
    dq = torch.zeros(b, hq, rows.shape[1], d, dtype=torch.float32, device=q.device)
    if rows.shape[1]:
        _launch_dq(q, k, rows.contiguous(), lse.contiguous(), u.contiguous(), e.contiguous(), dq,
                   kpm, s_kpm, scale, key_padding_mask, causal, window)
    return dq


__all__ = ["accepts_dk_out", "probe_rows_fwd", "probe_rows_bwd"]
