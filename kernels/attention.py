"""Flash-style Triton attention kernels with probe probabilities, and their launchers.

Per head (query head h reads key/value head h // G, G = Hq // Hkv):
    S = scale * Q K^T, masked; P = softmax(S) row-wise; O = P V; lse_i = log sum_j exp(S_ij).
Query i sits at absolute position i + OFF, OFF = Lk - Lq. Key j is visible to query i iff
kpm[b, j] (when given), j <= i + OFF (when causal) and j > i + OFF - WINDOW (when WINDOW > 0).
A query with no visible key gets O = 0 and lse = -inf.

Kernels (no autograd here):
  _fwd_kernel      O and lse by the online softmax. Key blocks outside the causal / window band
                   are skipped; whole blocks that every row of the query block sees run without
                   causal / window / bounds masks, boundary blocks with them; the heaviest causal
                   query blocks start first. Opt-in TMA loads (``use_tma``).
  _probe_kernel    P[r, c] = exp(scale q_r . k_c - lse_r) for R probe rows x C probe columns:
                   R x C x D work, no L x L matrix.
  _delta_kernel    delta_i = sum_d dO_id O_id.
  _bwd_kernel      the whole backward in one launch: dK / dV programs (one key block each,
                   looping over the G query heads of its group and the visible query blocks; no
                   atomics: the group sum happens in registers) and dQ programs (one (group head,
                   query block) each), plus the probe gradient kept out of the 16-bit flash dots
                   (docs/design.md, "fused probes"). Gradients are stored in the input dtype.
The backward recomputes P = exp(S - lse) from the stored lse and uses dS = P (dP - delta).
Everything accumulates in float32; 16-bit inputs feed the tensor-core dots in their own dtype,
float32 inputs use IEEE float32 dots (no TF32), so results match PyTorch's float32 matmul.
Tiles: ``_cfg_for`` (no register spills in any shipped configuration: docs/build-report.md).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os

import torch
import triton
import triton.language as tl

from . import autotune


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _sees(row_ok, qpos, key_ok, kpos, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """The visibility rule, once for every kernel, on operands that broadcast to a tile: a valid
    query row at absolute position qpos sees a valid key (in range, not padding) at kpos when
    kpos <= qpos (causal) and kpos > qpos - WINDOW (window)."""
    ok = row_ok & key_ok
    if CAUSAL:
        ok = ok & (kpos <= qpos)
        if WINDOW > 0:
            ok = ok & (kpos > qpos - WINDOW)
    return ok


@triton.jit
def _visible(offs_m, offs_n, Lq, Lk, kp_ok, OFF, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """[BM, BN] visibility of keys offs_n to queries offs_m (kp_ok: [BN] padding, in-range)."""
    return _sees((offs_m < Lq)[:, None], offs_m[:, None] + OFF, kp_ok[None, :], offs_n[None, :],
                 CAUSAL, WINDOW)


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with float32 accumulation. UPCAST feeds float32 operands (after rounding to the input
    dtype): Triton's CPU interpreter multiplies bfloat16 operands as raw bits."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _key_ok(kpm_ptr, s_kpm_b, b, offs_n, Lk, HAS_KPM: tl.constexpr):
    ok = offs_n < Lk
    if HAS_KPM:
        kp = tl.load(kpm_ptr + b * s_kpm_b + offs_n, mask=ok, other=0)
        ok = ok & (kp != 0)
    return ok


@triton.jit
def _heads(Hq, G):
    """(bh, b, h, hk) of this program: axis 1 runs over batch x query heads; bh is int64 so base
    offsets like bh * L * D may pass 2**31."""
    bh = tl.program_id(1).to(tl.int64)
    h = bh % Hq
    return bh, bh // Hq, h, h // G


@triton.jit
def _tile(base, s_l, offs, L, offs_d, D, BOUND: tl.constexpr, EVEN_D: tl.constexpr):
    """Rows offs of a [L, D] matrix at base (row stride s_l, unit column stride) as
    [len(offs), BLOCK_D]; rows >= L (checked only when BOUND) and columns >= D read 0. With EVEN_D
    (D == BLOCK_D) and no BOUND the load has no mask, so it vectorises and pipelines."""
    ptrs = base + offs[:, None] * s_l + offs_d[None, :]
    if EVEN_D:
        if BOUND:
            return tl.load(ptrs, mask=offs[:, None] < L, other=0.0)
        return tl.load(ptrs)
    m = offs_d[None, :] < D
    if BOUND:
        m = m & (offs[:, None] < L)
    return tl.load(ptrs, mask=m, other=0.0)


@triton.jit
def _rows(desc, base, s_l, b32, h32, start, offs, L, offs_d, D, BOUND: tl.constexpr,
          EVEN_D: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows offs (= start + arange) of the [L, D] matrix of batch b32, head h32: through the
    tensor descriptor desc ([B, H, L, D], boxes zero-filled out of bounds) with USE_TMA, else the
    pointer load of _tile from base (that matrix's first element)."""
    if USE_TMA:
        return desc.load([b32, h32, start, 0]).reshape(offs.shape[0], offs_d.shape[0])
    return _tile(base, s_l, offs, L, offs_d, D, BOUND, EVEN_D)


@triton.jit
def _store_tile(base, s_l, offs, L, offs_d, D, x, EVEN_D: tl.constexpr, UPCAST: tl.constexpr):
    """Store float32 x in base's dtype. UPCAST (bfloat16 in Triton's CPU interpreter, which casts
    float32 to bfloat16 by truncation, twice the error of the GPU's round-to-nearest-even):
    round to nearest even on the bits first, so the interpreter's results are the GPU's."""
    if UPCAST:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    ptrs = base + offs[:, None] * s_l + offs_d[None, :]
    m = offs[:, None] < L
    if not EVEN_D:
        m = m & (offs_d[None, :] < D)
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=m)


@triton.jit
def _key_split(m0, Lk, OFF, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """Key ranges of query block [m0, m0 + BLOCK_M): (lo, fl, fh, hi) with [lo, hi) the keys the
    block can see (lo aligned to BLOCK_N; blocks outside the causal / window band skipped) and
    [fl, fh) the whole key blocks that every row of the block sees (no causal / window / bounds
    mask needed there); [lo, fl) and [fh, hi) are the boundary blocks."""
    lo = 0
    hi = Lk
    fh = (Lk // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.maximum(0, tl.minimum(Lk, m0 + BLOCK_M + OFF))
        fh = tl.minimum(fh, (tl.maximum(m0 + OFF + 1, 0) // BLOCK_N) * BLOCK_N)
        if WINDOW > 0:
            lo = tl.maximum(0, m0 + OFF - WINDOW + 1)
            lo = (lo // BLOCK_N) * BLOCK_N
    fl = lo
    if CAUSAL and WINDOW > 0:
        fl = tl.maximum(lo, tl.cdiv(tl.maximum(m0 + BLOCK_M + OFF - WINDOW, 0), BLOCK_N) * BLOCK_N)
    fl = tl.minimum(fl, hi)
    fh = tl.minimum(tl.maximum(fh, fl), hi)
    return lo, fl, fh, hi


@triton.jit
def _query_range(n0, Lq, OFF, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """[lo, hi) of the queries that key block [n0, n0 + BLOCK_N) is visible to (lo aligned to
    BLOCK_M)."""
    lo = 0
    hi = Lq
    if CAUSAL:
        lo = (tl.maximum(0, n0 - OFF) // BLOCK_M) * BLOCK_M
        if WINDOW > 0:
            hi = tl.maximum(0, tl.minimum(Lq, n0 + BLOCK_N - 1 + WINDOW - OFF))
    return lo, hi


@triton.jit
def _add_dot_f32(acc, a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b on tensor cores where one operand is float32 (a probe gradient term) and the
    other is in the input dtype. In 16 bits the float32 operand goes in as two parts of the other's
    dtype (rounded, then its remainder), so the probe terms keep about float32 accuracy for one
    more small dot (one rounding of a bfloat16 ds doubles the probe gradients' error against
    PyTorch's, which keeps ds in float32). Each dot accumulates into acc (no temporary tile: one
    would spill on sm_90). Both float32: one dot."""
    if a.dtype == b.dtype:
        return acc + _dot(a, b, PREC, UPCAST)
    if a.dtype == tl.float32:
        hi = a.to(b.dtype)
        lo = (a - hi.to(tl.float32)).to(b.dtype)
        acc = acc + _dot(hi, b, PREC, UPCAST)
        return acc + _dot(lo, b, PREC, UPCAST)
    hi = b.to(a.dtype)
    lo = (b - hi.to(tl.float32)).to(a.dtype)
    acc = acc + _dot(a, hi, PREC, UPCAST)
    return acc + _dot(a, lo, PREC, UPCAST)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, s_kl, s_vl, KD, VD, hk, KPM, s_kpm_b, b, offs_m,
               offs_d, lo, hi, Lq, Lk, D, OFF, qk_scale,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
               HAS_KPM: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr,
               PREC: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr):
    """Online softmax over key blocks [lo, hi); MASKED applies causal / window / bounds (boundary
    blocks), else only the padding mask (whole visible blocks). USE_TMA: K and V tiles come
    through the tensor descriptors KD / VD ([B, Hkv, Lk, D], zero-filled out of bounds)."""
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _rows(KD, k_base, s_kl, b, hk, start_n, offs_n, Lk, offs_d, D, MASKED, EVEN_D, USE_TMA)
        s = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale
        if MASKED:
            kp_ok = _key_ok(KPM, s_kpm_b, b, offs_n, Lk, HAS_KPM)
            s = tl.where(_visible(offs_m, offs_n, Lq, Lk, kp_ok, OFF, CAUSAL, WINDOW), s,
                         float("-inf"))
        elif HAS_KPM:
            kp_ok = _key_ok(KPM, s_kpm_b, b, offs_n, Lk, HAS_KPM)
            s = tl.where(kp_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED or HAS_KPM:  # a row may still have seen no key: keep exp2 away from -inf - -inf
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _rows(VD, v_base, s_vl, b, hk, start_n, offs_n, Lk, offs_d, D, MASKED, EVEN_D, USE_TMA)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC, UPCAST)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, KPM, QD, KD, VD,
                s_qb, s_qh, s_ql, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl, s_ob, s_oh, s_ol, s_kpm_b,
                Hq, G, Lq, Lk, D, sm_scale,
                CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                EVEN_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                USE_TMA: tl.constexpr):
    """O and lse of one query block (axis 0) of one (batch, query head) (axis 1). USE_TMA (opt-in,
    sm_90): Q, K and V tiles through tensor descriptors QD / KD / VD (Hopper's TMA engine),
    else pointer loads; the maths is the same."""
    # causal: the heaviest query blocks (the last ones, which see the most keys) start first
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh, b, h, hk = _heads(Hq, G)
    OFF = Lk - Lq
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _rows(QD, Q + b * s_qb + h * s_qh, s_ql, b.to(tl.int32), h.to(tl.int32), m0, offs_m, Lq,
              offs_d, D, True, EVEN_D, USE_TMA)
    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh
    b32, hk32 = b.to(tl.int32), hk.to(tl.int32)
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, fl, fh, hi = _key_split(m0, Lk, OFF, CAUSAL, WINDOW, BLOCK_M, BLOCK_N)
    if WINDOW > 0:  # the window's lower edge
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, s_kl, s_vl, KD, VD, hk32, KPM,
                                   s_kpm_b, b32, offs_m, offs_d, lo, fl, Lq, Lk, D, OFF, qk_scale,
                                   True, CAUSAL, WINDOW, HAS_KPM, EVEN_D, BLOCK_N, PREC,
                                   UPCAST, USE_TMA)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, s_kl, s_vl, KD, VD, hk32, KPM,
                               s_kpm_b, b32, offs_m, offs_d, fl, fh, Lq, Lk, D, OFF, qk_scale,
                               False, CAUSAL, WINDOW, HAS_KPM, EVEN_D, BLOCK_N, PREC,
                               UPCAST, USE_TMA)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, s_kl, s_vl, KD, VD, hk32, KPM,
                               s_kpm_b, b32, offs_m, offs_d, fh, hi, Lq, Lk, D, OFF, qk_scale,
                               True, CAUSAL, WINDOW, HAS_KPM, EVEN_D, BLOCK_N, PREC,
                               UPCAST, USE_TMA)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"),
                   (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    _store_tile(O + b * s_ob + h * s_oh, s_ol, offs_m, Lq, offs_d, D, out, EVEN_D, UPCAST)
    tl.store(LSE + bh * Lq + offs_m, lse, mask=offs_m < Lq)


@triton.jit
def _probe_kernel(Q, K, LSE, ROWS, COLS, P, KPM,
                  s_qb, s_qh, s_ql, s_kb, s_kh, s_kl, s_kpm_b,
                  Hq, G, Lq, Lk, D, R, C, sm_scale,
                  CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
                  FULL_ROWS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per (b, h, probe slot r); loops over the C probe columns in blocks."""
    slot = tl.program_id(0)
    bh, b, h, hk = _heads(Hq, G)
    OFF = Lk - Lq
    row = tl.load(ROWS + b * R + slot)
    row_ok = row >= 0
    row_c = tl.maximum(row, 0)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q = tl.load(Q + b * s_qb + h * s_qh + row_c * s_ql + offs_d, mask=dmask, other=0.0)
    q = q.to(tl.float32)
    lse = tl.load(LSE + bh * Lq + row_c)
    row_ok = row_ok & (lse != float("-inf"))
    lse = tl.where(row_ok, lse, 0.0)
    for start_c in tl.range(0, C, BLOCK_C):
        offs_c = start_c + tl.arange(0, BLOCK_C)
        cmask = offs_c < C
        if FULL_ROWS:
            col = offs_c
        else:
            col = tl.load(COLS + b * C + offs_c, mask=cmask, other=-1)
        ok = cmask & (col >= 0) & row_ok
        col_c = tl.maximum(col, 0)
        if HAS_KPM:
            kp = tl.load(KPM + b * s_kpm_b + col_c, mask=cmask, other=0)
            ok = ok & (kp != 0)
        if CAUSAL:
            ok = ok & (col_c <= row_c + OFF)
            if WINDOW > 0:
                ok = ok & (col_c > row_c + OFF - WINDOW)
        k = tl.load(K + b * s_kb + hk * s_kh + col_c[:, None] * s_kl + offs_d[None, :],
                    mask=cmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], 1) * sm_scale
        p = tl.where(ok, tl.exp(tl.where(ok, s - lse, 0.0)), 0.0)
        tl.store(P + (bh * R + slot) * C + offs_c, p, mask=cmask)


@triton.jit
def _delta_kernel(O, DO, DELTA, s_ob, s_oh, s_ol, s_db, s_dh, s_dl, Hq, Lq, D,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta_i = sum_d dO_id O_id."""
    pid_m = tl.program_id(0)
    bh, b, h, _ = _heads(Hq, 1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _tile(O + b * s_ob + h * s_oh, s_ol, offs_m, Lq, offs_d, D, True, False).to(tl.float32)
    do = _tile(DO + b * s_db + h * s_dh, s_dl, offs_m, Lq, offs_d, D, True, False).to(tl.float32)
    tl.store(DELTA + bh * Lq + offs_m, tl.sum(o * do, 1), mask=offs_m < Lq)


@triton.jit
def _bwd_kv_inner(dk, dv, k, v, q_base, do_base, s_ql, s_dl, QD, DOD, h32, LSE, DELTA, bh, KPM,
                  s_kpm_b, b, offs_n, offs_d, lo, hi, Lq, Lk, D, OFF, qk_scale,
                  CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
                  EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, PREC: tl.constexpr,
                  UPCAST: tl.constexpr, USE_TMA: tl.constexpr):
    """dK, dV of one key block over query blocks [lo, hi) of one query head (transposed tiles:
    [BN, BM]). Every tile is masked: split into boundary and whole blocks as the forward is, this
    loop spills on sm_90 at every tile tried (tests/aot_compile.py), one loop does not. USE_TMA:
    Q and dO tiles through the descriptors QD / DOD ([B, Hq, Lq, D], zero-filled out of bounds)."""
    kp_ok = _key_ok(KPM, s_kpm_b, b, offs_n, Lk, HAS_KPM)
    for start_m in tl.range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        b32 = b.to(tl.int32)
        q = _rows(QD, q_base, s_ql, b32, h32, start_m, offs_m, Lq, offs_d, D, True, EVEN_D, USE_TMA)
        do = _rows(DOD, do_base, s_dl, b32, h32, start_m, offs_m, Lq, offs_d, D, True, EVEN_D,
                   USE_TMA)
        lse = tl.load(LSE + bh * Lq + offs_m, mask=offs_m < Lq, other=float("inf"))
        delta = tl.load(DELTA + bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        st = _dot(k, tl.trans(q), PREC, UPCAST) * qk_scale  # [BN, BM]
        ok = tl.trans(_visible(offs_m, offs_n, Lq, Lk, kp_ok, OFF, CAUSAL, WINDOW))
        pt = tl.where(ok, tl.exp2(st - lse2[None, :]), 0.0)
        dv += _dot(pt.to(do.dtype), do, PREC, UPCAST)
        dpt = _dot(v, tl.trans(do), PREC, UPCAST)
        dst = pt * (dpt - delta[None, :])
        dk += _dot(dst.to(q.dtype), q, PREC, UPCAST)
    return dk, dv


@triton.jit
def _bwd_q_inner(dq, q, do, lse2, delta, k_base, v_base, s_kl, s_vl, KD, VD, hk32, KPM, s_kpm_b,
                 b, offs_m, offs_d, lo, hi, Lq, Lk, D, OFF, qk_scale,
                 MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                 HAS_KPM: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr,
                 PREC: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr):
    """dQ of one query block over key blocks [lo, hi); MASKED as in _fwd_inner; USE_TMA: K and V
    tiles through the descriptors KD / VD."""
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        b32 = b.to(tl.int32)
        k = _rows(KD, k_base, s_kl, b32, hk32, start_n, offs_n, Lk, offs_d, D, MASKED, EVEN_D,
                  USE_TMA)
        v = _rows(VD, v_base, s_vl, b32, hk32, start_n, offs_n, Lk, offs_d, D, MASKED, EVEN_D,
                  USE_TMA)
        s = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        if MASKED:
            kp_ok = _key_ok(KPM, s_kpm_b, b, offs_n, Lk, HAS_KPM)
            p = tl.where(_visible(offs_m, offs_n, Lq, Lk, kp_ok, OFF, CAUSAL, WINDOW), p, 0.0)
        elif HAS_KPM:
            kp_ok = _key_ok(KPM, s_kpm_b, b, offs_n, Lk, HAS_KPM)
            p = tl.where(kp_ok[None, :], p, 0.0)
        dp = _dot(do, tl.trans(v), PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PREC, UPCAST)
    return dq


@triton.jit
def _bwd_kernel(Q, K, V, DO, LSE, DELTA, DQ, DK, DV, KPM, ROWS, U, E, DQP, QD, DOD, KD, VD,
                s_qb, s_qh, s_ql, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl, s_db, s_dh, s_dl,
                s_dqb, s_dqh, s_dql, s_dkb, s_dkh, s_dkl, s_dvb, s_dvh, s_dvl,
                s_kpm_b, Hq, Hkv, G, Lq, Lk, D, R, sm_scale, N_KV_BLOCKS,
                CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
                HAS_PROBES: tl.constexpr, BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr,
                BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_R: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr,
                UPCAST: tl.constexpr, USE_TMA: tl.constexpr):
    """The whole flash backward in one launch. Axis 1: batch x key/value heads. Axis 0: the first
    N_KV_BLOCKS programs each own one key block (dK, dV summed over the G query heads of the group
    in registers, no atomics), the rest one (query head of the group, query block) each (dQ),
    heaviest blocks first under a causal mask. Gradients are stored in the input dtype.

    The probe gradient (docs/design.md), kept out of the flash loops: dS_rj = E_rj - u_r P_rj on
    probe row r (E = P G scattered to full rows, u_r = sum_c P_rc G_rc). A dK/dV program adds
    s * sum_{h, r} dS[h, r, j] q_{h, rows[r]} for its keys j, recomputing P of the R probe rows
    against its key block (an R x BLOCK_N tile) and taking dS in two parts of the input dtype, so
    the probe part keeps float32 accuracy; a dQ program adds DQP[r] (= s * sum_j dS_rj k_j, the
    probe kernels' dq rows) to the rows of its block that are probe rows. USE_TMA (opt-in, sm_90):
    the loops' tiles (Q and dO in the dK/dV programs, K and V in the dQ programs) through tensor
    descriptors."""
    pid = tl.program_id(0)
    bhk, b, hk, _ = _heads(Hkv, 1)
    OFF = Lk - Lq
    offs_d = tl.arange(0, BLOCK_D)
    qk_scale = sm_scale * 1.4426950408889634
    if pid < N_KV_BLOCKS:
        n0 = pid * BLOCK_N1
        offs_n = n0 + tl.arange(0, BLOCK_N1)
        k = _tile(K + b * s_kb + hk * s_kh, s_kl, offs_n, Lk, offs_d, D, True, EVEN_D)
        v = _tile(V + b * s_vb + hk * s_vh, s_vl, offs_n, Lk, offs_d, D, True, EVEN_D)
        dk = tl.zeros([BLOCK_N1, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N1, BLOCK_D], tl.float32)
        lo, hi = _query_range(n0, Lq, OFF, CAUSAL, WINDOW, BLOCK_M1, BLOCK_N1)
        for g in range(0, G):
            h = hk * G + g
            bh = b * Hq + h
            q_base = Q + b * s_qb + h * s_qh
            do_base = DO + b * s_db + h * s_dh
            dk, dv = _bwd_kv_inner(dk, dv, k, v, q_base, do_base, s_ql, s_dl, QD, DOD,
                                   h.to(tl.int32), LSE, DELTA, bh, KPM, s_kpm_b, b, offs_n, offs_d,
                                   lo, hi, Lq, Lk, D, OFF, qk_scale, CAUSAL, WINDOW, HAS_KPM,
                                   EVEN_D, BLOCK_M1, PREC, UPCAST, USE_TMA)
        _store_tile(DV + b * s_dvb + hk * s_dvh, s_dvl, offs_n, Lk, offs_d, D, dv, EVEN_D,
                    UPCAST)
        if HAS_PROBES:  # after dv is stored (fewer live registers)
            kp_ok = _key_ok(KPM, s_kpm_b, b, offs_n, Lk, HAS_KPM)
            for g in range(0, G):
                h = hk * G + g
                bh = b * Hq + h
                q_base = Q + b * s_qb + h * s_qh
                for r0 in range(0, R, BLOCK_R):
                    offs_r = r0 + tl.arange(0, BLOCK_R)
                    rows = tl.load(ROWS + b * R + offs_r, mask=offs_r < R, other=-1)
                    row_ok = (rows >= 0) & (rows < Lq)
                    rows_c = tl.where(row_ok, rows, 0)
                    qr = tl.load(q_base + rows_c[:, None] * s_ql + offs_d[None, :],
                                 mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
                    lse = tl.load(LSE + bh * Lq + rows_c, mask=row_ok, other=float("-inf"))
                    row_ok = row_ok & (lse != float("-inf"))
                    lse2 = tl.where(row_ok, lse * 1.4426950408889634, 0.0)
                    u = tl.load(U + bh * R + offs_r, mask=row_ok, other=0.0)
                    # transposed tiles [BN, BR], as in the main loop (k stays the A operand)
                    st = _dot(k, tl.trans(qr), PREC, UPCAST) * qk_scale
                    ok = tl.trans(_visible(rows_c, offs_n, Lq, Lk, kp_ok, OFF, CAUSAL, WINDOW))
                    ok = ok & row_ok[None, :]
                    pt = tl.where(ok, tl.exp2(tl.where(ok, st - lse2[None, :], 0.0)), 0.0)
                    et = tl.load(E + (bh * R + offs_r[None, :]) * Lk + offs_n[:, None],
                                 mask=row_ok[None, :] & (offs_n[:, None] < Lk), other=0.0)
                    dk = _add_dot_f32(dk, et - u[None, :] * pt, qr, PREC, UPCAST)
        _store_tile(DK + b * s_dkb + hk * s_dkh, s_dkl, offs_n, Lk, offs_d, D, dk * sm_scale,
                    EVEN_D, UPCAST)
    else:
        pid = pid - N_KV_BLOCKS
        n_m = tl.cdiv(Lq, BLOCK_M2)
        g = pid // n_m
        pid_m = pid % n_m
        if CAUSAL:
            pid_m = n_m - 1 - pid_m
        h = hk * G + g
        bh = b * Hq + h
        m0 = pid_m * BLOCK_M2
        offs_m = m0 + tl.arange(0, BLOCK_M2)
        q = _tile(Q + b * s_qb + h * s_qh, s_ql, offs_m, Lq, offs_d, D, True, EVEN_D)
        do = _tile(DO + b * s_db + h * s_dh, s_dl, offs_m, Lq, offs_d, D, True, EVEN_D)
        lse = tl.load(LSE + bh * Lq + offs_m, mask=offs_m < Lq, other=float("inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        delta = tl.load(DELTA + bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
        k_base = K + b * s_kb + hk * s_kh
        v_base = V + b * s_vb + hk * s_vh
        dq = tl.zeros([BLOCK_M2, BLOCK_D], tl.float32)
        lo, fl, fh, hi = _key_split(m0, Lk, OFF, CAUSAL, WINDOW, BLOCK_M2, BLOCK_N2)
        hk32 = hk.to(tl.int32)
        if WINDOW > 0:
            dq = _bwd_q_inner(dq, q, do, lse2, delta, k_base, v_base, s_kl, s_vl, KD, VD, hk32,
                              KPM, s_kpm_b, b, offs_m, offs_d, lo, fl, Lq, Lk, D, OFF, qk_scale,
                              True, CAUSAL, WINDOW, HAS_KPM, EVEN_D, BLOCK_N2, PREC,
                              UPCAST, USE_TMA)
        dq = _bwd_q_inner(dq, q, do, lse2, delta, k_base, v_base, s_kl, s_vl, KD, VD, hk32, KPM,
                          s_kpm_b, b, offs_m, offs_d, fl, fh, Lq, Lk, D, OFF, qk_scale, False,
                          CAUSAL, WINDOW, HAS_KPM, EVEN_D, BLOCK_N2, PREC, UPCAST,
                          USE_TMA)
        dq = _bwd_q_inner(dq, q, do, lse2, delta, k_base, v_base, s_kl, s_vl, KD, VD, hk32, KPM,
                          s_kpm_b, b, offs_m, offs_d, fh, hi, Lq, Lk, D, OFF, qk_scale, True,
                          CAUSAL, WINDOW, HAS_KPM, EVEN_D, BLOCK_N2, PREC, UPCAST,
                          USE_TMA)
        dq = dq * sm_scale
        if HAS_PROBES:  # + DQP[r] on the rows of this block that are probe rows (already scaled)
            for r0 in range(0, R, BLOCK_R):
                offs_r = r0 + tl.arange(0, BLOCK_R)
                rows = tl.load(ROWS + b * R + offs_r, mask=offs_r < R, other=-1)
                hit = tl.where(offs_m[:, None] == rows[None, :], 1.0, 0.0)  # [BM, BR]
                dqp = tl.load(DQP + (bh * R + offs_r[:, None]) * D + offs_d[None, :],
                              mask=(offs_r[:, None] < R) & (offs_d[None, :] < D), other=0.0)
                dq = _add_dot_f32(dq, hit.to(q.dtype), dqp, PREC, UPCAST)  # hit is exact
        _store_tile(DQ + b * s_dqb + h * s_dqh, s_dql, offs_m, Lq, offs_d, D, dq, EVEN_D, UPCAST)


# ----------------------------------------------------------------------------------------------
# launchers


TILE_KINDS = ("fwd", "dkdv", "dq")
_tile_override: dict = {}


@contextlib.contextmanager
def tiles(**cfg):
    """Force tile configurations inside the ``with`` block, for tuning and tests:
    ``tiles(fwd=(128, 64, 8, 3), dkdv=(32, 128, 4, 3), dq=(128, 32, 4, 3))``; each value is
    (BLOCK_M, BLOCK_N, num_warps, num_stages), blocks powers of two >= 16. The backward is one
    launch: dkdv's warps and stages apply to it, dq's only give the dQ programs' blocks. Kinds not
    named keep their defaults. Not thread-safe: one override for the whole process."""
    for kind, c in cfg.items():
        if kind not in TILE_KINDS:
            raise ValueError(f"tiles: unknown kind {kind!r}; expected one of {TILE_KINDS}")
        if not (isinstance(c, tuple) and len(c) == 4 and all(isinstance(x, int) for x in c)):
            raise ValueError(f"tiles: {kind} must be a tuple of 4 ints (BLOCK_M, BLOCK_N, "
                             f"num_warps, num_stages), got {c!r}")
        for name, x in zip(("BLOCK_M", "BLOCK_N"), c[:2]):
            if x < 16 or x & (x - 1):
                raise ValueError(f"tiles: {kind} {name} must be a power of two >= 16, got {x}")
        if c[2] not in (1, 2, 4, 8, 16):
            raise ValueError(f"tiles: {kind} num_warps must be 1, 2, 4, 8 or 16, got {c[2]}")
        if c[3] < 1:
            raise ValueError(f"tiles: {kind} num_stages must be >= 1, got {c[3]}")
    saved = dict(_tile_override)
    _tile_override.update(cfg)
    try:
        yield
    finally:
        _tile_override.clear()
        _tile_override.update(saved)


def _cfg(d_pad: int, device: torch.device, kind: str, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) by head dim, pass, dtype and GPU generation,
    unless ``tiles`` overrides it."""
    if kind in _tile_override:
        return _tile_override[kind]
    if _interpreting() or device.type != "cuda":
        return 16, 16, 4, 1
    return _cfg_for(d_pad, _major(device.index if device.index is not None
                                  else torch.cuda.current_device()), kind, dtype == torch.float32)


@functools.cache
def _major(index: int) -> int:
    """Compute-capability major of CUDA device ``index`` (asked once per device)."""
    return torch.cuda.get_device_capability(index)[0]


def _cfg_for(d_pad: int, major: int, kind: str, fp32: bool = False):
    """Shipped tiles: (BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward ("fwd") and of the
    backward's dK/dV ("dkdv") and dQ ("dq") programs; the backward is one launch, so its warps and
    stages are dkdv's. Chosen by compiling candidates ahead of time (tests/aot_compile.py, the
    JIT's specialisation) for no stack and no spill in any of them (3 dtypes x d 64 / 128 / 256
    x sm_80 / sm_90). Not yet timed on a GPU (bench/tune_tiles.py)."""
    big = d_pad > 128
    if fp32:  # IEEE dots on CUDA cores: small tiles, mostly 8 warps (4 spill on sm_90)
        if kind == "fwd":  # no spill with triton 3.6 or 3.9 in any specialisation of the report
            if big:
                return 16, 16, 8, 2
            return (32, 16, 8, 2) if d_pad > 64 else (16, 16, 8, 1)
        warps = 4 if major < 9 and 64 < d_pad <= 128 else 8  # sm_80 d 128 spills with 8
        # sm_90 d 128: 16 x 32 dK/dV tiles spill with triton 3.6 when the head dim is padded
        bn1 = 16 if major >= 9 and 64 < d_pad <= 128 else 32
        return (16, bn1, warps, 2) if kind == "dkdv" else (32, 16, warps, 2)
    if kind == "fwd":
        if big:
            return (64, 64, 8, 2) if major >= 9 else (64, 32, 8, 2)
        if major >= 9 or d_pad <= 64:
            return 128, 64, 8, 3
        return 64, 64, 4, 3
    if big:  # wgmma's 64-row tiles spill at d = 256 (measured); these take mma.sync
        return (16, 32, 8, 2) if kind == "dkdv" else (32, 16, 8, 2)
    if major >= 9:  # d 128: 32 x 128 dK/dV tiles spill non-causal with triton 3.9
        return ((32, 64 if d_pad > 64 else 128, 8, 2) if kind == "dkdv" else (128, 64, 8, 2))
    # sm_80 d 64: 32 x 64 dK/dV tiles spill with triton 3.6
    return (32, 64 if d_pad > 64 else 32, 8, 2) if kind == "dkdv" else (64, 32, 8, 2)


def _tune_key(kind: str, a, q, extra) -> tuple:
    """What a tuned tile is chosen for: pass, generation, dtype, head dim, masks, GQA group, and
    Lq / Lk rounded up to powers of two (plus TMA for the forward, probes for the backward)."""
    major = _major(q.device.index if q.device.index is not None
                   else torch.cuda.current_device()) if q.device.type == "cuda" else 0
    return (kind, major, str(q.dtype), a.block_d, tuple(sorted(a.flags.items())), a.group,
            triton.next_power_of_2(a.lq), triton.next_power_of_2(a.lk), bool(extra))


def _prep(q, k, v, kpm):
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if kpm is not None:
        kpm = kpm.to(torch.uint8).contiguous()
    return q, k, v, kpm


def padded_head_dim(d: int) -> int:
    """The head dim padded for the dots: the next power of two, at least 16."""
    return max(16, triton.next_power_of_2(d))


@dataclasses.dataclass(frozen=True)
class _Launch:
    """What every launcher derives from its inputs once: sizes, padded head dim, dot precision,
    the mask constexprs and the padding-mask pointer (a dummy when there is none)."""
    b: int
    hq: int
    hkv: int
    lq: int
    lk: int
    d: int
    block_d: int
    prec: str
    flags: dict
    kpm: torch.Tensor
    s_kpm: int
    upcast: bool

    @property
    def group(self) -> int:
        return self.hq // self.hkv


def dot_precision(fp32: bool) -> str:
    """input_precision of the flash kernels' dots: 16-bit inputs use the tensor cores in their own
    dtype ("tf32" is then ignored); float32 inputs use IEEE float32 dots."""
    return "ieee" if fp32 else "tf32"


def _launch(q, k, kpm, causal, window) -> _Launch:
    b, hq, lq, d = q.shape
    return _Launch(
        b=b, hq=hq, hkv=k.shape[1], lq=lq, lk=k.shape[2], d=d, block_d=padded_head_dim(d),
        prec=dot_precision(q.dtype == torch.float32),
        flags=dict(CAUSAL=bool(causal), WINDOW=int(window or 0), HAS_KPM=kpm is not None),
        kpm=kpm if kpm is not None else q,  # dummy pointer, never read
        s_kpm=kpm.stride(0) if kpm is not None else 0,
        upcast=_interpreting() and q.dtype == torch.bfloat16)


_TMA_FORCE: list = []  # tests: [True] runs the descriptor path in the interpreter too


def use_tma(*tensors) -> bool:
    """Whether the fused forward and backward load their loop tiles through tensor descriptors
    (TMA): opt-in with ABFT_FAST_TMA=1, on sm_90 or newer (or in the interpreter when a test
    forces it), 16-bit inputs whose base addresses and non-unit strides are 16-byte aligned
    (TMA's rule) with a unit last stride. Off by default until timed against the pointer path on
    a GPU."""
    if _TMA_FORCE:
        on = _TMA_FORCE[-1]
    else:
        on = os.environ.get("ABFT_FAST_TMA") == "1" and not _interpreting()
        on = on and tensors[0].device.type == "cuda" and _major(
            tensors[0].device.index if tensors[0].device.index is not None
            else torch.cuda.current_device()) >= 9
    if not on:
        return False
    for t in tensors:
        if t.dtype not in (torch.float16, torch.bfloat16) or t.stride(-1) != 1:
            return False
        size = t.element_size()
        if t.data_ptr() % 16 or any((st * size) % 16 for st in t.stride()[:-1]):
            return False
    return True


def _descriptor(t, rows: int, block_d: int):
    """A host-side tensor descriptor of a [B, H, L, D] tensor with [1, 1, rows, block_d] boxes
    (out-of-bounds reads give 0)."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, block_d])


def attention_fwd(q, k, v, key_padding_mask=None, *, causal=True, window=None, scale=None):
    """q [B,Hq,Lq,D], k/v [B,Hkv,Lk,D] (fp16/bf16/fp32) -> out [B,Hq,Lq,D], lse [B,Hq,Lq] fp32.

    key_padding_mask: [B, Lk] bool/uint8 (True = real) or None. lse is -inf on empty rows."""
    q, k, v, kpm = _prep(q, k, v, key_padding_mask)
    a = _launch(q, k, kpm, causal, window)
    scale = a.d ** -0.5 if scale is None else float(scale)
    out = torch.empty(a.b, a.hq, a.lq, a.d, dtype=q.dtype, device=q.device)
    lse = torch.empty(a.b, a.hq, a.lq, dtype=torch.float32, device=q.device)
    tma = use_tma(q, k, v)

    def launch(cfg):
        bm, bn, warps, stages = cfg
        descs = ((_descriptor(q, bm, a.block_d), _descriptor(k, bn, a.block_d),
                  _descriptor(v, bn, a.block_d)) if tma else (None, None, None))
        return _fwd_kernel[(triton.cdiv(a.lq, bm), a.b * a.hq)](
            q, k, v, out, lse, a.kpm, *descs, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *out.stride()[:3], a.s_kpm, a.hq, a.group, a.lq, a.lk, a.d, scale, **a.flags,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=a.block_d, EVEN_D=a.d == a.block_d, PREC=a.prec,
            UPCAST=a.upcast, USE_TMA=tma, num_warps=warps, num_stages=stages)

    cfg = _cfg(a.block_d, q.device, "fwd", q.dtype)
    if "fwd" not in _tile_override and autotune.enabled(q.device):
        cfg = autotune.pick(_tune_key("fwd", a, q, tma), autotune.candidates(
            "fwd", q.dtype, a.block_d, cfg), launch)
    launch(cfg)
    return out, lse


def probe_fwd(q, k, lse, rows, cols=None, key_padding_mask=None, *, causal=True, window=None,
              scale=None):
    """P[b, h, r, c] = exp(scale q[b,h,rows[b,r]] . k[b,h//G,cols[b,c]] - lse[b,h,rows[b,r]]).

    rows [B,R] int64, cols [B,C] int64 or None (all Lk keys); -1 slots, masked pairs and empty rows
    give 0. Returns [B,Hq,R,C] float32."""
    q, k, _, kpm = _prep(q, k, k, key_padding_mask)
    a = _launch(q, k, kpm, causal, window)
    scale = a.d ** -0.5 if scale is None else float(scale)
    rows = rows.contiguous()
    r = rows.shape[1]
    c = a.lk if cols is None else cols.shape[1]
    p = torch.empty(a.b, a.hq, r, c, dtype=torch.float32, device=q.device)
    if r == 0 or c == 0:
        return p
    cols_arg = rows if cols is None else cols.contiguous()
    block_c = 16 if _interpreting() else min(128, max(16, triton.next_power_of_2(c)))
    _probe_kernel[(r, a.b * a.hq)](q, k, lse.contiguous(), rows, cols_arg, p, a.kpm,
                                   *q.stride()[:3], *k.stride()[:3], a.s_kpm, a.hq, a.group, a.lq,
                                   a.lk, a.d, r, c, scale, **a.flags, FULL_ROWS=cols is None,
                                   BLOCK_C=block_c, BLOCK_D=a.block_d, num_warps=4, num_stages=1)
    return p


def attention_bwd(q, k, v, out, lse, dout, key_padding_mask=None, *, causal=True, window=None,
                  scale=None, probe_rows=None, probe_u=None, probe_e=None, probe_dq=None):
    """Flash backward: the delta pre-pass, then dK / dV and dQ programs in ONE launch ->
    dq [B,Hq,Lq,D], dk, dv [B,Hkv,Lk,D] in the input dtype (float32 accumulation inside).

    The probe gradient, all four or none: probe_rows [B,R] int64 (-1 = unused slot); probe_u
    [B,Hq,R] float32 = sum_c P_rc G_rc; probe_e [B,Hq,R,Lk] float32 = P G scattered to full rows;
    probe_dq [B,Hq,R,D] float32 = the probe rows' dq, s * sum_j (E_rj - u_r P_rj) k_j
    (``kernels.probes.probe_rows_dq``). The dK / dV programs add the probe part of dk; the dQ
    programs add probe_dq[r] to row rows[r] (duplicate rows add)."""
    q, k, v, kpm = _prep(q, k, v, key_padding_mask)
    out = out if out.stride(-1) == 1 else out.contiguous()
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    if dout.dtype != q.dtype:
        dout = dout.to(q.dtype)
    a = _launch(q, k, kpm, causal, window)
    scale = a.d ** -0.5 if scale is None else float(scale)
    lse = lse.contiguous()
    probes = probe_rows is not None and probe_rows.shape[1] > 0
    r = probe_rows.shape[1] if probes else 0
    if probes:
        rows, u, e, dqp = (t.contiguous() for t in (probe_rows, probe_u, probe_e, probe_dq))
    else:
        rows = u = e = dqp = lse  # dummy pointers, never read
    delta = torch.empty(a.b, a.hq, a.lq, dtype=torch.float32, device=q.device)
    bm_d = 16 if _interpreting() else 64
    _delta_kernel[(triton.cdiv(a.lq, bm_d), a.b * a.hq)](
        out, dout, delta, *out.stride()[:3], *dout.stride()[:3], a.hq, a.lq, a.d,
        BLOCK_M=bm_d, BLOCK_D=a.block_d, num_warps=4, num_stages=1)
    dq = torch.empty(a.b, a.hq, a.lq, a.d, dtype=q.dtype, device=q.device)
    dk = torch.empty(a.b, a.hkv, a.lk, a.d, dtype=k.dtype, device=q.device)
    dv = torch.empty(a.b, a.hkv, a.lk, a.d, dtype=v.dtype, device=q.device)

    tma = use_tma(q, k, v, dout)

    def launch(cfg):
        bm1, bn1, warps, stages, bm2, bn2 = cfg
        n_kv = triton.cdiv(a.lk, bn1)
        descs = ((_descriptor(q, bm1, a.block_d), _descriptor(dout, bm1, a.block_d),
                  _descriptor(k, bn2, a.block_d), _descriptor(v, bn2, a.block_d)) if tma
                 else (None,) * 4)
        return _bwd_kernel[(n_kv + a.group * triton.cdiv(a.lq, bm2), a.b * a.hkv)](
            q, k, v, dout, lse, delta, dq, dk, dv, a.kpm, rows, u, e, dqp, *descs,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3],
            *dq.stride()[:3], *dk.stride()[:3], *dv.stride()[:3], a.s_kpm, a.hq, a.hkv, a.group,
            a.lq, a.lk, a.d, r, scale, n_kv, **a.flags, HAS_PROBES=probes, BLOCK_M1=bm1,
            BLOCK_N1=bn1, BLOCK_M2=bm2, BLOCK_N2=bn2, BLOCK_D=a.block_d, BLOCK_R=16,
            EVEN_D=a.d == a.block_d, PREC=a.prec, UPCAST=a.upcast, USE_TMA=tma,
            num_warps=warps, num_stages=stages)

    dkdv = _cfg(a.block_d, q.device, "dkdv", q.dtype)
    dqb = _cfg(a.block_d, q.device, "dq", q.dtype)[:2]
    cfg = (*dkdv, *dqb)
    if autotune.enabled(q.device):  # dK/dV tile first (shipped dQ blocks), then the dQ blocks
        key = _tune_key("bwd", a, q, probes) + (tma,)
        if "dkdv" not in _tile_override:
            cfg = autotune.pick(key + ("dkdv",), [(*c, *dqb) for c in autotune.candidates(
                "dkdv", q.dtype, a.block_d, dkdv)], launch)
        if "dq" not in _tile_override:
            cfg = autotune.pick(key + ("dq",) + cfg[:4], [(*cfg[:4], *c[:2]) for c in
                                autotune.candidates("dq", q.dtype, a.block_d, (*dqb, 0, 0))],
                                launch)
    launch(cfg)
    return dq, dk, dv


__all__ = ["attention_fwd", "attention_bwd", "probe_fwd", "tiles", "TILE_KINDS"]
