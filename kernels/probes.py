"""Triton probe kernels: attention probabilities of a few query rows, and their backward, for the
"sdpa" engine (the output and its gradient come from PyTorch's SDPA; these give only the probes).

Per key/value head, the probe rows of its G query heads form one tile of G x R rows
(row m: query head hk * G + m // R, probe slot m % R). Every dot is taken transposed, keys (or the
head dim) as its M and the few probe rows as its N, so that a 64-key block fills Hopper's wgmma
(M = 64 per warpgroup) however few the rows. With scale s and visibility as in
abft_fast.kernels.attention (causal, window, key padding; query i at absolute position i + Lk - Lq):

  _probe_fwd_kernel   lse_r = log sum_j exp(s q_r . k_j) over the visible keys (online, one pass
                      over the tile's key range: from the earliest row's first window key,
                      rounded down to a key block, to the latest row's causal limit), then
                      P[r, c] = exp(s q_r . k_c - lse_r) at the probe columns (or
                      every key: full rows). Writes P [B, Hq, R, C] and lse [B, Hq, R].
  _probe_dk_kernel    dK_j = s * sum_r dS_rj q_r for one key block (dS in the input dtype for the
                      tensor-core dot; in 16 bits as two parts, see _add_dot_f32), with
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

from .attention import _add_dot_f32, _dot, _interpreting, _key_ok, _sees, padded_head_dim


@triton.jit
def _gather(base, s_l, idx, ok, offs_d, D, EVEN_D: tl.constexpr):
    """Rows idx of a [*, D] matrix at base (row stride s_l, unit column stride) as
    [len(idx), BLOCK_D]; rows where not ok and columns >= D read 0. The mask is constant along a
    row, so the loads vectorise."""
    m = ok[:, None]
    if not EVEN_D:
        m = m & (offs_d[None, :] < D)
    return tl.load(base + idx[:, None] * s_l + offs_d[None, :], mask=m, other=0.0)


@triton.jit
def _probe_tile(Q, ROWS, s_qb, s_qh, s_ql, b, hk, G, R, Lq, D, pid_r,
                BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    """Rows of probe tile pid_r: (q [BR, BD], head index, slot, row position, row valid)."""
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    in_tile = offs_r < G * R
    g = offs_r // R
    slot = offs_r % R
    h = hk * G + g
    row = tl.load(ROWS + b * R + slot, mask=in_tile, other=-1)
    ok = in_tile & (row >= 0) & (row < Lq)
    row_c = tl.where(ok, row, 0)
    q = _gather(Q + b * s_qb + h[:, None] * s_qh, s_ql, row_c, ok, tl.arange(0, BLOCK_D), D,
                EVEN_D)
    return q, h, slot, row_c, ok


@triton.jit
def _key_visible(offs_n, kp_ok, row_c, row_ok, OFF, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """[BN, BR] visibility of keys offs_n (kp_ok: padding, in range) to probe rows row_c."""
    return _sees(row_ok[None, :], row_c[None, :] + OFF, kp_ok[:, None], offs_n[:, None], CAUSAL,
                 WINDOW)


@triton.jit
def _real_keys(KRANGE, b, Lk, HAS_KPM: tl.constexpr):
    """[first, last + 1) of batch row b's real keys (KRANGE [B, 2] int32; Lk, 0 when it has
    none); [0, Lk) without padding."""
    if HAS_KPM:
        return tl.load(KRANGE + 2 * b), tl.load(KRANGE + 2 * b + 1)
    return 0, Lk


@triton.jit
def _key_range(row_c, row_ok, OFF, Lk, KRANGE, b, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
               HAS_KPM: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) of the keys a probe tile scans: from the first key the earliest row's window
    shows and the row's first real key (rounded down to a key block) to the latest row's causal
    limit and the last real key; lo >= hi when no row of the tile is valid or no key real."""
    lo, hi = _real_keys(KRANGE, b, Lk, HAS_KPM)
    if CAUSAL:
        hi = tl.minimum(hi, tl.max(tl.where(row_ok, row_c, 0)).to(tl.int32) + OFF + 1)
        if WINDOW > 0:
            first = tl.min(tl.where(row_ok, row_c, Lk)).to(tl.int32) + OFF - WINDOW + 1
            lo = tl.maximum(lo, first)
    return tl.maximum(lo, 0) // BLOCK_N * BLOCK_N, hi


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
def _scores_t(k, q, qk_scale, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """S^T [BN, BR] = (q . k) * qk_scale for keys k [BN, BD] and probe rows q [BR, BD]. 16 bits:
    keys as the dot's M (64 on a GPU: Hopper's wgmma), rows as its N. float32 (no tensor cores
    to fill): q @ k^T as the flash forward takes it, then transposed, so that P recomputed here
    equals exactly the P of an lse the flash forward made (a row with one visible key gets
    p = 1 and a probe gradient of exactly 0, as PyTorch's)."""
    if q.dtype == tl.float32:
        return tl.trans(_dot(q, tl.trans(k), PREC, UPCAST)) * qk_scale
    return _dot(k, tl.trans(q), PREC, UPCAST) * qk_scale


@triton.jit
def _probe_p(k, q, offs_n, kp_ok, row_c, row_ok, lse2, OFF, qk_scale, CAUSAL: tl.constexpr,
             WINDOW: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """P^T [BN, BR] of keys k [BN, BD] for probe rows q [BR, BD] (base-2 lse2), 0 where hidden."""
    s = _scores_t(k, q, qk_scale, PREC, UPCAST)
    ok = _key_visible(offs_n, kp_ok, row_c, row_ok, OFF, CAUSAL, WINDOW)
    return tl.where(ok, tl.exp2(tl.where(ok, s - lse2[None, :], 0.0)), 0.0)


@triton.jit
def _probe_fwd_kernel(Q, K, ROWS, COLS, P, LSE, KPM, KRANGE,
                      s_qb, s_qh, s_ql, s_kb, s_kh, s_kl, s_kpm_b,
                      Hq, G, Lq, Lk, D, R, C, sm_scale,
                      CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
                      FULL_ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr,
                      UPCAST: tl.constexpr):
    pid_r = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)
    Hkv = Hq // G
    b = bhk // Hkv
    hk = bhk % Hkv
    OFF = Lk - Lq
    q, h, slot, row_c, row_ok = _probe_tile(Q, ROWS, s_qb, s_qh, s_ql, b, hk, G, R, Lq, D, pid_r,
                                            BLOCK_R, BLOCK_D, EVEN_D)
    offs_d = tl.arange(0, BLOCK_D)
    k_base = K + b * s_kb + hk * s_kh
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    lo, hi = _key_range(row_c, row_ok, OFF, Lk, KRANGE, b, CAUSAL, WINDOW, HAS_KPM, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kp_ok = _key_ok(KPM, s_kpm_b, b, offs_n, Lk, HAS_KPM)
        k = _gather(k_base, s_kl, offs_n, offs_n < Lk, offs_d, D, EVEN_D)
        s = _scores_t(k, q, qk_scale, PREC, UPCAST)  # [BN, BR]
        s = tl.where(_key_visible(offs_n, kp_ok, row_c, row_ok, OFF, CAUSAL, WINDOW), s,
                     float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[None, :]), 0)
        m_i = m_new
    empty = l_i == 0.0
    lse2 = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    out_row = (b * Hq + h) * R + slot  # [BR] index of (b, h, slot)
    in_tile = pid_r * BLOCK_R + tl.arange(0, BLOCK_R) < G * R
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
        k = _gather(k_base, s_kl, col_c, col_ok, offs_d, D, EVEN_D)
        p = _probe_p(k, q, col_c, kp_ok, row_c, row_ok, lse2, OFF, qk_scale, CAUSAL, WINDOW,
                     PREC, UPCAST)
        tl.store(P + out_row[None, :] * n_out + offs_c[:, None], p,
                 mask=in_tile[None, :] & cmask[:, None])


@triton.jit
def _probe_dk_kernel(Q, K, ROWS, LSE, U, E, DK, KPM, KRANGE,
                     s_qb, s_qh, s_ql, s_kb, s_kh, s_kl, s_kpm_b, s_dkb, s_dkh, s_dkl,
                     Hq, G, Lq, Lk, D, R, sm_scale,
                     CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     EVEN_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                     ACCUMULATE: tl.constexpr):
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)
    Hkv = Hq // G
    b = bhk // Hkv
    hk = bhk % Hkv
    OFF = Lk - Lq
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    nmask = offs_n < Lk
    kp_ok = _key_ok(KPM, s_kpm_b, b, offs_n, Lk, HAS_KPM)
    k = _gather(K + b * s_kb + hk * s_kh, s_kl, offs_n, nmask, offs_d, D, EVEN_D)
    qk_scale = sm_scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    first, last = _real_keys(KRANGE, b, Lk, HAS_KPM)
    dead = (pid_n * BLOCK_N >= last) | ((pid_n + 1) * BLOCK_N <= first)  # only padding here
    for pid_r in range(0, tl.where(dead, 0, tl.cdiv(G * R, BLOCK_R))):
        q, h, slot, row_c, row_ok = _probe_tile(Q, ROWS, s_qb, s_qh, s_ql, b, hk, G, R, Lq, D,
                                                pid_r, BLOCK_R, BLOCK_D, EVEN_D)
        ridx, row_ok, lse2, u = _row_grad_stats(LSE, U, b, h, slot, Hq, R, row_ok)
        p = _probe_p(k, q, offs_n, kp_ok, row_c, row_ok, lse2, OFF, qk_scale, CAUSAL, WINDOW,
                     PREC, UPCAST)
        e = tl.load(E + ridx[None, :] * Lk + offs_n[:, None],
                    mask=row_ok[None, :] & nmask[:, None], other=0.0)
        dk = _add_dot_f32(dk, e - u[None, :] * p, q, PREC, UPCAST)  # dS^T [BN, BR] @ q
    dk_ptrs = DK + b * s_dkb + hk * s_dkh + offs_n[:, None] * s_dkl + offs_d[None, :]
    dk_mask = nmask[:, None] & (offs_d[None, :] < D)
    dk = dk * sm_scale
    if ACCUMULATE:  # add into an existing gradient (the output's dk), in its dtype
        dk += tl.load(dk_ptrs, mask=dk_mask, other=0.0).to(tl.float32)
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=dk_mask)


@triton.jit
def _probe_dq_kernel(Q, K, ROWS, LSE, U, E, DQ, KPM, KRANGE,
                     s_qb, s_qh, s_ql, s_kb, s_kh, s_kl, s_kpm_b,
                     Hq, G, Lq, Lk, D, R, sm_scale,
                     CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     EVEN_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid_r = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)
    Hkv = Hq // G
    b = bhk // Hkv
    hk = bhk % Hkv
    OFF = Lk - Lq
    q, h, slot, row_c, row_ok = _probe_tile(Q, ROWS, s_qb, s_qh, s_ql, b, hk, G, R, Lq, D, pid_r,
                                            BLOCK_R, BLOCK_D, EVEN_D)
    ridx, row_ok, lse2, u = _row_grad_stats(LSE, U, b, h, slot, Hq, R, row_ok)
    offs_d = tl.arange(0, BLOCK_D)
    k_base = K + b * s_kb + hk * s_kh
    qk_scale = sm_scale * 1.4426950408889634
    dqt = tl.zeros([BLOCK_D, BLOCK_R], tl.float32)  # dq^T: the head dim is the dots' M
    lo, hi = _key_range(row_c, row_ok, OFF, Lk, KRANGE, b, CAUSAL, WINDOW, HAS_KPM, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        nmask = offs_n < Lk
        kp_ok = _key_ok(KPM, s_kpm_b, b, offs_n, Lk, HAS_KPM)
        k = _gather(k_base, s_kl, offs_n, nmask, offs_d, D, EVEN_D)
        p = _probe_p(k, q, offs_n, kp_ok, row_c, row_ok, lse2, OFF, qk_scale, CAUSAL, WINDOW,
                     PREC, UPCAST)
        e = tl.load(E + ridx[None, :] * Lk + offs_n[:, None],
                    mask=row_ok[None, :] & nmask[:, None], other=0.0)
        dqt = _add_dot_f32(dqt, tl.trans(k), e - u[None, :] * p, PREC, UPCAST)  # k^T @ dS^T
    tl.store(DQ + ridx[None, :] * D + offs_d[:, None], dqt * sm_scale,
             mask=row_ok[None, :] & (offs_d[:, None] < D))


# ----------------------------------------------------------------------------------------------
# launchers


def _tiles(kind: str, m_rows: int, device: torch.device, dtype: torch.dtype,
           d: int) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_N, num_warps, num_stages) of probe kernel kind ("fwd", "dk", "dq") for
    m_rows = G x R probe rows per key/value head and head dim d; 16 x 16 in the interpreter.

    16 bits: key blocks of 64 (the dots' M, one Hopper warpgroup's wgmma: HGMMA in every kernel),
    row tiles of 16-64 (the dots' N; dk loops over 16-row tiles, dq takes at most 32 rows), key
    loads pipelined in 3 stages. float32 (IEEE dots on CUDA cores, scores taken as q @ k^T and
    transposed, see _scores_t): 16 rows x 16 or 32 keys, 8 warps, unpipelined (2 or 3 stages spill
    at d 128). Chosen by compiling for sm_80 and sm_90 with triton 3.6 and 3.9
    (tests/aot_compile.py, with the window / non-causal / padded-head-dim specialisations): no
    stack and no spill instruction at d <= 128 in any dtype; at d = 256 the 16-bit dk kernel and
    the float32 forward spill (docs/build-report.md), the fewest of the tiles tried. Not timed.
    """
    if _interpreting() or device.type != "cuda":
        return 16, 16, 4, 1
    dp = padded_head_dim(d)
    if dtype == torch.float32:  # no spill with triton 3.6 or 3.9 in any report specialisation
        if kind == "fwd":
            bn = 16
        elif kind == "dk":
            bn = 16 if 64 < dp <= 128 else 32
        else:
            bn = 32 if 64 < dp <= 128 else 16
        return 16, bn, 8, 1
    br = min(64, max(16, triton.next_power_of_2(m_rows)))
    if kind == "dk":
        br = 16
    elif kind == "dq":
        br = min(br, 32 if dp <= 128 else 16)
    wide = br > (16 if kind == "dq" else 32) or dp > 128
    bn = 32 if kind == "dq" and dp > 128 else 64  # dq d 256: 64-key blocks spill (triton 3.6)
    return br, bn, 8 if wide else 4, 2 if kind == "dk" and dp > 128 else 3


def _flags(kpm, causal, window):
    return dict(CAUSAL=bool(causal), WINDOW=int(window or 0), HAS_KPM=kpm is not None)


def _prep(q, k, kpm):
    """(q, k with unit last strides, the mask as uint8 (or a dummy), its batch stride, the
    [B, 2] int32 range of real keys per row (or a dummy)); no host synchronisation."""
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    if kpm is None:
        return q, k, q, 0, q
    kpm_arg = kpm.to(torch.uint8).contiguous()
    return q, k, kpm_arg, kpm_arg.stride(0), key_range(kpm_arg)


def key_range(kpm) -> torch.Tensor:
    """[B, 2] int32: (first real key, last real key + 1) per row of a [B, Lk] 0/1 mask, (Lk, 0)
    for a row without one: the keys the probe kernels scan at most."""
    lk = kpm.shape[1]
    j = torch.arange(1, lk + 1, device=kpm.device, dtype=torch.int32)
    m = kpm.to(torch.int32)
    last = (m * j).amax(1)                   # last real index + 1, 0 if none
    first = lk - (m * j.flip(0)).amax(1)     # first real index, Lk if none
    return torch.stack([first, last], 1).to(torch.int32).contiguous()


def _dots(q):
    d = q.shape[-1]
    return dict(PREC="ieee" if q.dtype == torch.float32 else "tf32",
                UPCAST=_interpreting() and q.dtype == torch.bfloat16,
                BLOCK_D=padded_head_dim(d), EVEN_D=d == padded_head_dim(d))


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
    q, k, kpm, s_kpm, krange = _prep(q, k, key_padding_mask)
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
    br, bn, warps, stages = _tiles("fwd", g * r, q.device, q.dtype, d)
    _probe_fwd_kernel[(triton.cdiv(g * r, br), b * hkv)](
        q, k, rows, rows if cols is None else cols.contiguous(), p, lse, kpm, krange,
        *q.stride()[:3], *k.stride()[:3], s_kpm, hq, g, lq, lk, d, r, c, scale,
        **_flags(key_padding_mask, causal, window), FULL_ROWS=cols is None, BLOCK_R=br,
        BLOCK_N=bn, **_dots(q), num_warps=warps, num_stages=stages)
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
    q, k, kpm, s_kpm, krange = _prep(q, k, key_padding_mask)
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
    br, bn, warps, stages = _tiles("dk", g * r, q.device, q.dtype, d)
    common = (*q.stride()[:3], *k.stride()[:3], s_kpm)
    sizes = (hq, g, lq, lk, d, r, scale)
    meta = dict(**_flags(key_padding_mask, causal, window), BLOCK_R=br, BLOCK_N=bn, **_dots(q),
                num_warps=warps, num_stages=stages)
    _probe_dk_kernel[(triton.cdiv(lk, bn), b * hkv)](q, k, rows, lse, u, e, dk, kpm, krange,
                                                     *common,
                                                     *dk.stride()[:3], *sizes, **meta,
                                                     ACCUMULATE=dk_out is not None)
    _launch_dq(q, k, rows, lse, u, e, dq, kpm, s_kpm, krange, scale, key_padding_mask, causal,
               window)
    return dq, dk


def _launch_dq(q, k, rows, lse, u, e, dq, kpm, s_kpm, krange, scale, key_padding_mask, causal,
               window):
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g, r = hq // hkv, rows.shape[1]
    br, bn, warps, stages = _tiles("dq", g * r, q.device, q.dtype, d)
    _probe_dq_kernel[(triton.cdiv(g * r, br), b * hkv)](
        q, k, rows, lse, u, e, dq, kpm, krange, *q.stride()[:3], *k.stride()[:3], s_kpm, hq, g,
        lq, lk,
        d, r, scale, **_flags(key_padding_mask, causal, window), BLOCK_R=br, BLOCK_N=bn,
        **_dots(q), num_warps=warps, num_stages=stages)


def probe_rows_dq(q, k, rows, lse, u, e, key_padding_mask=None, *, causal=True, window=None,
                  scale=None):
    """The probe rows' dq alone (as ``probe_rows_bwd``, without dk): [B,Hq,R,D] float32, 0 on
    unused slots and rows with no visible key. lse [B,Hq,R] is the probe rows' lse."""
    q, k, kpm, s_kpm, krange = _prep(q, k, key_padding_mask)
    b, hq, _, d = q.shape
    scale = d ** -0.5 if scale is None else float(scale)
    dq = torch.zeros(b, hq, rows.shape[1], d, dtype=torch.float32, device=q.device)
    if rows.shape[1]:
        _launch_dq(q, k, rows.contiguous(), lse.contiguous(), u.contiguous(), e.contiguous(), dq,
                   kpm, s_kpm, krange, scale, key_padding_mask, causal, window)
    return dq


__all__ = ["accepts_dk_out", "probe_rows_fwd", "probe_rows_bwd"]
