"""Flash-style Triton attention kernels with probe probabilities, and their launchers.

Per head (query head h reads key/value head h // G, G = Hq // Hkv):
    S = scale * Q K^T, masked; P = softmax(S) row-wise; O = P V; lse_i = log sum_j exp(S_ij).
Query i sits at absolute position i + OFF, OFF = Lk - Lq. Key j is visible to query i iff
kpm[b, j] (when given), j <= i + OFF (when causal) and j > i + OFF - WINDOW (when WINDOW > 0).
A query with no visible key gets O = 0 and lse = -inf.

Kernels (no autograd here):
  _fwd_kernel      O and lse by the online softmax, key blocks outside the causal / window band
                   are skipped.
  _probe_kernel    P[r, c] = exp(scale q_r . k_c - lse_r) for R probe rows x C probe columns:
                   R x C x D work, no L x L matrix.
  _delta_kernel    delta_i = sum_d dO_id O_id + extra_i (extra carries the probe-gradient term, see
                   abft_fast/ops/probe_math.py for the derivation).
  _bwd_dkdv_kernel dK, dV for one key block, looping over the G query heads of its group and the
                   visible query blocks (no atomics: the group sum happens in registers).
  _bwd_dq_kernel   dQ for one query block.
The backward recomputes P = exp(S - lse) from the stored lse and uses dS = P (dP - delta).
Everything accumulates in float32; 16-bit inputs feed the tensor-core dots in their own dtype,
float32 inputs use IEEE float32 dots (no TF32), so results match PyTorch's float32 matmul.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os

import torch
import triton
import triton.language as tl


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _visible(offs_m, offs_n, Lq, Lk, kp_ok, OFF, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """[BM, BN] visibility of keys offs_n to queries offs_m (kp_ok: [BN] padding, in-range)."""
    ok = (offs_m[:, None] < Lq) & kp_ok[None, :]
    if CAUSAL:
        qpos = offs_m[:, None] + OFF
        ok = ok & (offs_n[None, :] <= qpos)
        if WINDOW > 0:
            ok = ok & (offs_n[None, :] > qpos - WINDOW)
    return ok


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
def _load_tile(base, s_l, offs, L, offs_d, dmask):
    """Rows offs (< L) of a [L, D] matrix at base with row stride s_l: [len(offs), BLOCK_D];
    out-of-range entries read 0."""
    return tl.load(base + offs[:, None] * s_l + offs_d[None, :],
                   mask=(offs[:, None] < L) & dmask[None, :], other=0.0)


@triton.jit
def _load_tile_t(base, s_l, offs, L, offs_d, dmask):
    """The transpose of ``_load_tile``: [BLOCK_D, len(offs)]."""
    return tl.load(base + offs[None, :] * s_l + offs_d[:, None],
                   mask=(offs[None, :] < L) & dmask[:, None], other=0.0)


@triton.jit
def _row_stats(LSE, DELTA, bh, offs_m, Lq):
    """Base-2 lse (+inf where a row sees no key, so its P is 0) and delta of rows offs_m."""
    lse = tl.load(LSE + bh * Lq + offs_m, mask=offs_m < Lq, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
    return lse2, delta


@triton.jit
def _heads(Hq, G):
    """(bh, b, h, hk) of this program: axis 1 runs over batch x query heads; bh is int64 so base
    offsets like bh * L * D may pass 2**31."""
    bh = tl.program_id(1).to(tl.int64)
    h = bh % Hq
    return bh, bh // Hq, h, h // G


@triton.jit
def _key_range(pid_m, Lk, OFF, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) of the keys that query block pid_m can see (lo aligned to BLOCK_N); blocks outside
    the causal / window band are skipped."""
    lo = 0
    hi = Lk
    if CAUSAL:
        hi = tl.minimum(Lk, pid_m * BLOCK_M + BLOCK_M + OFF)
        if WINDOW > 0:
            lo = tl.maximum(0, pid_m * BLOCK_M + OFF - WINDOW + 1)
            lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, KPM,
                s_qb, s_qh, s_ql, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl, s_ob, s_oh, s_ol, s_kpm_b,
                Hq, G, Lq, Lk, D, sm_scale,
                CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    bh, b, h, hk = _heads(Hq, G)
    OFF = Lk - Lq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q = _load_tile(Q + b * s_qb + h * s_qh, s_ql, offs_m, Lq, offs_d, dmask)
    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _key_range(pid_m, Lk, OFF, CAUSAL, WINDOW, BLOCK_M, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kp_ok = _key_ok(KPM, s_kpm_b, b, offs_n, Lk, HAS_KPM)
        kt = _load_tile_t(k_base, s_kl, offs_n, Lk, offs_d, dmask)
        s = _dot(q, kt, PREC, UPCAST) * qk_scale
        ok = _visible(offs_m, offs_n, Lq, Lk, kp_ok, OFF, CAUSAL, WINDOW)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base, s_vl, offs_n, Lk, offs_d, dmask)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC, UPCAST)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    tl.store(O + b * s_ob + h * s_oh + offs_m[:, None] * s_ol + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=(offs_m[:, None] < Lq) & dmask[None, :])
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
def _delta_kernel(O, DO, EXTRA, DELTA, s_ob, s_oh, s_ol, s_db, s_dh, s_dl, Hq, Lq, D,
                  HAS_EXTRA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    bh, b, h, _ = _heads(Hq, 1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    o = _load_tile(O + b * s_ob + h * s_oh, s_ol, offs_m, Lq, offs_d, dmask).to(tl.float32)
    do = _load_tile(DO + b * s_db + h * s_dh, s_dl, offs_m, Lq, offs_d, dmask).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_EXTRA:
        delta += tl.load(EXTRA + bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
    tl.store(DELTA + bh * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, KPM,
                     s_qb, s_qh, s_ql, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl, s_db, s_dh, s_dl,
                     s_kpm_b, Hq, Hkv, G, Lq, Lk, D, sm_scale,
                     CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid_n = tl.program_id(0)
    bhk, b, hk, _ = _heads(Hkv, 1)  # axis 1 runs over batch x key/value heads here
    OFF = Lk - Lq
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    nmask = (offs_n[:, None] < Lk) & dmask[None, :]
    k = _load_tile(K + b * s_kb + hk * s_kh, s_kl, offs_n, Lk, offs_d, dmask)
    v = _load_tile(V + b * s_vb + hk * s_vh, s_vl, offs_n, Lk, offs_d, dmask)
    kp_ok = _key_ok(KPM, s_kpm_b, b, offs_n, Lk, HAS_KPM)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    lo = 0
    hi = Lq
    if CAUSAL:
        lo = tl.maximum(0, pid_n * BLOCK_N - OFF)
        lo = (lo // BLOCK_M) * BLOCK_M
        if WINDOW > 0:
            hi = tl.minimum(Lq, pid_n * BLOCK_N + BLOCK_N - 1 + WINDOW - OFF)
    for g in range(0, G):
        h = hk * G + g
        bh = b * Hq + h
        q_base = Q + b * s_qb + h * s_qh
        do_base = DO + b * s_db + h * s_dh
        for start_m in tl.range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = _load_tile(q_base, s_ql, offs_m, Lq, offs_d, dmask)
            do = _load_tile(do_base, s_dl, offs_m, Lq, offs_d, dmask)
            lse2, delta = _row_stats(LSE, DELTA, bh, offs_m, Lq)
            st = _dot(k, tl.trans(q), PREC, UPCAST) * qk_scale  # [BN, BM]
            ok = tl.trans(_visible(offs_m, offs_n, Lq, Lk, kp_ok, OFF, CAUSAL, WINDOW))
            pt = tl.where(ok, tl.exp2(st - lse2[None, :]), 0.0)
            dv += _dot(pt.to(do.dtype), do, PREC, UPCAST)
            dpt = _dot(v, tl.trans(do), PREC, UPCAST)
            dst = pt * (dpt - delta[None, :])
            dk += _dot(dst.to(q.dtype), q, PREC, UPCAST)
    dk = dk * sm_scale
    tl.store(DK + bhk * Lk * D + offs_n[:, None] * D + offs_d[None, :], dk, mask=nmask)
    tl.store(DV + bhk * Lk * D + offs_n[:, None] * D + offs_d[None, :], dv, mask=nmask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, KPM,
                   s_qb, s_qh, s_ql, s_kb, s_kh, s_kl, s_vb, s_vh, s_vl, s_db, s_dh, s_dl,
                   s_kpm_b, Hq, G, Lq, Lk, D, sm_scale,
                   CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    bh, b, h, hk = _heads(Hq, G)
    OFF = Lk - Lq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q = _load_tile(Q + b * s_qb + h * s_qh, s_ql, offs_m, Lq, offs_d, dmask)
    do = _load_tile(DO + b * s_db + h * s_dh, s_dl, offs_m, Lq, offs_d, dmask)
    lse2, delta = _row_stats(LSE, DELTA, bh, offs_m, Lq)
    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _key_range(pid_m, Lk, OFF, CAUSAL, WINDOW, BLOCK_M, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kp_ok = _key_ok(KPM, s_kpm_b, b, offs_n, Lk, HAS_KPM)
        kt = _load_tile_t(k_base, s_kl, offs_n, Lk, offs_d, dmask)
        vt = _load_tile_t(v_base, s_vl, offs_n, Lk, offs_d, dmask)
        s = _dot(q, kt, PREC, UPCAST) * qk_scale
        ok = _visible(offs_m, offs_n, Lq, Lk, kp_ok, OFF, CAUSAL, WINDOW)
        p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)
        dp = _dot(do, vt, PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kt.dtype), tl.trans(kt), PREC, UPCAST)
    dq = dq * sm_scale
    tl.store(DQ + bh * Lq * D + offs_m[:, None] * D + offs_d[None, :], dq,
             mask=(offs_m[:, None] < Lq) & dmask[None, :])


# ----------------------------------------------------------------------------------------------
# launchers


TILE_KINDS = ("fwd", "dkdv", "dq")
_tile_override: dict = {}


@contextlib.contextmanager
def tiles(**cfg):
    """Force tile configurations inside the ``with`` block, for tuning and tests:
    ``tiles(fwd=(128, 64, 8, 3), dkdv=(32, 128, 4, 3), dq=(128, 32, 4, 3))``; each value is
    (BLOCK_M, BLOCK_N, num_warps, num_stages), blocks powers of two >= 16. Kinds not named keep
    their defaults. Not thread-safe: one override for the whole process."""
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
    """Tiles sized so that shared memory fits sm_80 (164 KB) and sm_90 (227 KB); checked by
    tests/aot_compile.py, which compiles every configuration for both without a GPU."""
    big = d_pad > 128
    if fp32:  # twice the bytes per element: smaller tiles
        if kind == "fwd":
            return (32, 32, 4, 2) if big else (64, 64, 4, 2)
        if kind == "dkdv":
            return (16, 32, 4, 2) if big else (32, 64, 4, 2)
        return (32, 32, 4, 2) if big else (64, 32, 4, 2)
    if kind == "fwd":
        if big:
            return 64, 32, 4, 2
        if major >= 9:
            return 128, 128 if d_pad <= 64 else 64, 8, 3
        return 128, 64, 4 if d_pad <= 64 else 8, 3
    if kind == "dkdv":
        if big:
            return 32, 64, 8, 2
        return (64, 128 if d_pad <= 64 else 64, 8 if major >= 9 else 4, 2)
    return (64, 32, 8, 2) if big else (128, 64, 8, 2)


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


def _launch(q, k, kpm, causal, window) -> _Launch:
    b, hq, lq, d = q.shape
    return _Launch(
        b=b, hq=hq, hkv=k.shape[1], lq=lq, lk=k.shape[2], d=d, block_d=padded_head_dim(d),
        prec="ieee" if q.dtype == torch.float32 else "tf32",
        flags=dict(CAUSAL=bool(causal), WINDOW=int(window or 0), HAS_KPM=kpm is not None),
        kpm=kpm if kpm is not None else q,  # dummy pointer, never read
        s_kpm=kpm.stride(0) if kpm is not None else 0,
        upcast=_interpreting() and q.dtype == torch.bfloat16)


def attention_fwd(q, k, v, key_padding_mask=None, *, causal=True, window=None, scale=None):
    """q [B,Hq,Lq,D], k/v [B,Hkv,Lk,D] (fp16/bf16/fp32) -> out [B,Hq,Lq,D], lse [B,Hq,Lq] fp32.

    key_padding_mask: [B, Lk] bool/uint8 (True = real) or None. lse is -inf on empty rows."""
    q, k, v, kpm = _prep(q, k, v, key_padding_mask)
    a = _launch(q, k, kpm, causal, window)
    scale = a.d ** -0.5 if scale is None else float(scale)
    out = torch.empty(a.b, a.hq, a.lq, a.d, dtype=q.dtype, device=q.device)
    lse = torch.empty(a.b, a.hq, a.lq, dtype=torch.float32, device=q.device)
    bm, bn, warps, stages = _cfg(a.block_d, q.device, "fwd", q.dtype)
    grid = (triton.cdiv(a.lq, bm), a.b * a.hq)
    _fwd_kernel[grid](q, k, v, out, lse, a.kpm,
                      *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
                      a.s_kpm, a.hq, a.group, a.lq, a.lk, a.d, scale, **a.flags, BLOCK_M=bm,
                      BLOCK_N=bn, BLOCK_D=a.block_d, PREC=a.prec, UPCAST=a.upcast,
                      num_warps=warps, num_stages=stages)
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
                                   BLOCK_C=block_c, BLOCK_D=a.block_d)
    return p


def attention_bwd(q, k, v, out, lse, dout, key_padding_mask=None, *, causal=True, window=None,
                  scale=None, delta_extra=None):
    """Flash backward -> dq [B,Hq,Lq,D], dk, dv [B,Hkv,Lk,D], all float32.

    delta_extra: optional [B,Hq,Lq] float32 added to delta = rowsum(dout * out) (the probe term)."""
    q, k, v, kpm = _prep(q, k, v, key_padding_mask)
    out = out if out.stride(-1) == 1 else out.contiguous()
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    if dout.dtype != q.dtype:
        dout = dout.to(q.dtype)
    a = _launch(q, k, kpm, causal, window)
    scale = a.d ** -0.5 if scale is None else float(scale)
    lse = lse.contiguous()
    delta = torch.empty(a.b, a.hq, a.lq, dtype=torch.float32, device=q.device)
    bm_d = 16 if _interpreting() else 64
    extra = delta_extra.contiguous() if delta_extra is not None else delta
    _delta_kernel[(triton.cdiv(a.lq, bm_d), a.b * a.hq)](
        out, dout, extra, delta, *out.stride()[:3], *dout.stride()[:3], a.hq, a.lq, a.d,
        HAS_EXTRA=delta_extra is not None, BLOCK_M=bm_d, BLOCK_D=a.block_d)
    dq = torch.empty(a.b, a.hq, a.lq, a.d, dtype=torch.float32, device=q.device)
    dk = torch.empty(a.b, a.hkv, a.lk, a.d, dtype=torch.float32, device=q.device)
    dv = torch.empty(a.b, a.hkv, a.lk, a.d, dtype=torch.float32, device=q.device)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3], a.s_kpm)
    dots = dict(BLOCK_D=a.block_d, PREC=a.prec, UPCAST=a.upcast)
    bm, bn, warps, stages = _cfg(a.block_d, q.device, "dkdv", q.dtype)
    _bwd_dkdv_kernel[(triton.cdiv(a.lk, bn), a.b * a.hkv)](
        q, k, v, dout, lse, delta, dk, dv, a.kpm, *strides, a.hq, a.hkv, a.group, a.lq, a.lk,
        a.d, scale, **a.flags, BLOCK_M=bm, BLOCK_N=bn, **dots, num_warps=warps,
        num_stages=stages)
    bm, bn, warps, stages = _cfg(a.block_d, q.device, "dq", q.dtype)
    _bwd_dq_kernel[(triton.cdiv(a.lq, bm), a.b * a.hq)](
        q, k, v, dout, lse, delta, dq, a.kpm, *strides, a.hq, a.group, a.lq, a.lk, a.d, scale,
        **a.flags, BLOCK_M=bm, BLOCK_N=bn, **dots, num_warps=warps, num_stages=stages)
    return dq, dk, dv


__all__ = ["attention_fwd", "attention_bwd", "probe_fwd", "tiles", "TILE_KINDS"]
