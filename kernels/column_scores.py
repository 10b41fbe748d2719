"""Triton column-score kernels: per query head, the attention probability each key receives,
summed over a set of query rows, without an L x L matrix. No autograd here.

Per head (query head h reads key head h // G), with P = softmax(scale Q K^T) under the visibility
rule of abft_fast.kernels.attention (causal, window, key padding; query i at absolute position
i + Lk - Lq):

    col[b, h, j] = sum_{r in rows} P[rows_r, j]      (rows: [B, R] positions, -1 = unused slot;
                                                      a row listed twice counts twice)
    col[b, h, j] = sum_{i < Lq}    P[i, j]           (all rows)

Two passes, both O(N_rows * Lk * D) work and O(N_rows + Lk) memory per head:
  _row_lse_kernel   lse_r = log sum_j exp(s_rj) of each row (online max / sum over key blocks;
                    key blocks outside the rows' causal / window band are skipped).
  _col_sum_kernel   one program per (key block, b, h): loops over the row tiles that can see the
                    block, recomputes s_rj with the same dot as the lse pass and accumulates
                    sum_r exp(s_rj - lse_r) in float32. No atomics: every key block has one owner.
Rows with no visible key get lse = -inf and add 0. Unused slots add 0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention import _dot, _heads, _interpreting, _key_ok, _launch, _prep, _sees


@triton.jit
def _row_visible(row_c, row_ok, offs_n, kp_ok, OFF, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """[BM, BN] visibility of keys offs_n (kp_ok: padding, in range) to query rows row_c."""
    return _sees(row_ok[:, None], row_c[:, None] + OFF, kp_ok[None, :], offs_n[None, :], CAUSAL,
                 WINDOW)


@triton.jit
def _row_tile(ROWS, b, offs_m, R, Lq, HAS_ROWS: tl.constexpr):
    """(row position clamped to >= 0, row valid) of the row slots offs_m."""
    if HAS_ROWS:
        row = tl.load(ROWS + b * R + offs_m, mask=offs_m < R, other=-1)
        ok = (offs_m < R) & (row >= 0)
    else:
        row = offs_m
        ok = offs_m < Lq
    return tl.where(ok, row, 0), ok


@triton.jit
def _row_lse_kernel(Q, K, ROWS, LSE, KPM,
                    s_qb, s_qh, s_ql, s_kb, s_kh, s_kl, s_kpm_b,
                    Hq, G, Lq, Lk, D, NR, sm_scale,
                    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
                    HAS_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    bh, b, h, hk = _heads(Hq, G)
    OFF = Lk - Lq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_c, row_ok = _row_tile(ROWS, b, offs_m, NR, Lq, HAS_ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q = tl.load(Q + b * s_qb + h * s_qh + row_c[:, None] * s_ql + offs_d[None, :],
                mask=row_ok[:, None] & dmask[None, :], other=0.0)
    k_base = K + b * s_kb + hk * s_kh
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    lo = 0
    hi = Lk
    if CAUSAL:
        hi = tl.minimum(Lk, tl.max(tl.where(row_ok, row_c, 0)) + OFF + 1)
        if WINDOW > 0:
            lo = tl.maximum(0, tl.min(tl.where(row_ok, row_c, Lq)) + OFF - WINDOW + 1)
            lo = (lo // BLOCK_N) * BLOCK_N
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
    lse = tl.where(empty, float("-inf"),
                   (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    tl.store(LSE + bh * NR + offs_m, lse, mask=offs_m < NR)


@triton.jit
def _col_sum_kernel(Q, K, ROWS, LSE, OUT, KPM,
                    s_qb, s_qh, s_ql, s_kb, s_kh, s_kl, s_kpm_b,
                    Hq, G, Lq, Lk, D, NR, sm_scale,
                    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
                    HAS_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid_n = tl.program_id(0)
    bh, b, h, hk = _heads(Hq, G)
    OFF = Lk - Lq
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    nmask = offs_n < Lk
    kp_ok = _key_ok(KPM, s_kpm_b, b, offs_n, Lk, HAS_KPM)
    kt = tl.load(K + b * s_kb + hk * s_kh + offs_n[None, :] * s_kl + offs_d[:, None],
                 mask=nmask[None, :] & dmask[:, None], other=0.0)
    qk_scale = sm_scale * 1.4426950408889634
    acc = tl.zeros([BLOCK_N], tl.float32)
    lo = 0
    hi = NR
    if not HAS_ROWS:
        if CAUSAL:  # only queries at or after this key block's first key see it ...
            lo = tl.maximum(0, pid_n * BLOCK_N - OFF)
            lo = (lo // BLOCK_M) * BLOCK_M
            if WINDOW > 0:  # ... and, with a window, only those less than WINDOW after its last
                hi = tl.minimum(Lq, pid_n * BLOCK_N + BLOCK_N - 1 + WINDOW - OFF)
    q_base = Q + b * s_qb + h * s_qh
    for start_m in tl.range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_c, row_ok = _row_tile(ROWS, b, offs_m, NR, Lq, HAS_ROWS)
        lse = tl.load(LSE + bh * NR + offs_m, mask=offs_m < NR, other=float("-inf"))
        row_ok = row_ok & (lse != float("-inf"))
        lse2 = tl.where(row_ok, lse * 1.4426950408889634, 0.0)
        q = tl.load(q_base + row_c[:, None] * s_ql + offs_d[None, :],
                    mask=row_ok[:, None] & dmask[None, :], other=0.0)
        s = _dot(q, kt, PREC, UPCAST) * qk_scale
        ok = _row_visible(row_c, row_ok, offs_n, kp_ok, OFF, CAUSAL, WINDOW)
        p = tl.exp2(tl.where(ok, s - lse2[:, None], float("-inf")))
        acc += tl.sum(p, 0)
    tl.store(OUT + bh * Lk + offs_n, acc, mask=nmask)


# ----------------------------------------------------------------------------------------------
# launcher


def _tiles(device: torch.device, dtype: torch.dtype, d_pad: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages); 16 x 16 in the interpreter. GPU sizes are not
    timed yet, only compiled ahead of time for sm_90 (tests/aot_compile.py): no stack and no
    spill instruction in either pass at any head dim; 16-bit uses HGMMA with 3-stage key loads;
    float32 (IEEE dots on CUDA cores) 32 x 16 tiles on 8 warps, unpipelined (32 x 32 on 4 warps
    spilled in the lse pass from d = 128)."""
    if _interpreting() or device.type != "cuda":
        return 16, 16, 4, 1
    if dtype == torch.float32:
        return 32, 16, 8, 1
    if d_pad > 128:
        return 64, 32, 4, 3
    return 128, 64, 8, 3


def column_scores_fwd(q, k, rows=None, key_padding_mask=None, *, causal=True, window=None,
                      scale=None, return_lse=False, row_mask=None):
    """Column scores [B, Hq, Lk] float32: sum over query rows of P[row, key].

    q [B,Hq,Lq,D], k [B,Hkv,Lk,D] (fp16 / bf16 / fp32); rows [B,R] int64 positions in [-1, Lq)
    (-1 = unused; values are not checked here) or None for every query row; key_padding_mask
    [B, Lk] bool / uint8 (True = real) or None. With return_lse also returns lse [B,Hq,R or Lq]
    (natural log, -inf for unused slots and rows that see no key). row_mask [B, Hq, R or Lq]
    bool or None: rows where it is False count 0 (lse -inf between the passes, as a row that sees no key)."""
    q, k, _, kpm = _prep(q, k, k, key_padding_mask)
    a = _launch(q, k, kpm, causal, window)
    scale = a.d ** -0.5 if scale is None else float(scale)
    has_rows = rows is not None
    nr = rows.shape[1] if has_rows else a.lq
    rows_arg = rows.contiguous() if has_rows else q  # dummy pointer when every row counts
    out = torch.empty(a.b, a.hq, a.lk, dtype=torch.float32, device=q.device)
    lse = torch.empty(a.b, a.hq, nr, dtype=torch.float32, device=q.device)
    if nr == 0:
        out.zero_()
        return (out, lse) if return_lse else out
    bm, bn, warps, stages = _tiles(q.device, q.dtype, a.block_d)
    args = (*q.stride()[:3], *k.stride()[:3], a.s_kpm, a.hq, a.group, a.lq, a.lk, a.d, nr, scale)
    meta = dict(**a.flags, HAS_ROWS=has_rows, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=a.block_d,
                PREC=a.prec, UPCAST=a.upcast, num_warps=warps, num_stages=stages)
    _row_lse_kernel[(triton.cdiv(nr, bm), a.b * a.hq)](q, k, rows_arg, lse, a.kpm, *args, **meta)
    if row_mask is not None:
        lse.masked_fill_(~row_mask, float("-inf"))  # as a row that sees no key
    _col_sum_kernel[(triton.cdiv(a.lk, bn), a.b * a.hq)](q, k, rows_arg, lse, out, a.kpm, *args,
                                                         **meta)
    return (out, lse) if return_lse else out


__all__ = ["column_scores_fwd"]
