"""The probe part of the op: scores of the probe rows (all backends) and, for the fused backends
(triton, cuda), probabilities from the stored lse and their backward.

Given the row log-sum-exp ``lse`` that the flash forward stores, a probe probability is
    P[r, c] = exp(scale * q_r . k_c - lse_r)            (0 when (r, c) is masked or a slot is -1)
which costs R x C x D work, no L x L matrix.

Backward. With G = dLoss/dP (R x C) and treating lse as a function of the scores
(d lse_r / d s_rj = P_rj), the probe outputs add to the score gradient of row r:
    dS_rj += P_rc G_rc [j = c]                 (direct term)
    dS_rj -= P_rj * sum_c P_rc G_rc            (through lse)
The flash backward already forms dS_rj = P_rj (dP_rj - delta_r) with delta_r = sum_d dO_rd O_rd, so
the lse part is absorbed by ``delta'_r = delta_r + sum_c P_rc G_rc`` (``delta_extra`` below), and
the direct term adds scale * P G to dq_r (times k_c) and dk_c (times q_r). dv gets nothing from the
probes. Duplicate probe rows / columns simply accumulate.
"""
from __future__ import annotations

import torch

from .masks import visible
from .spec import probs_dtype


def gather_slots(x: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` gathered along ``dim`` at the positions ``idx`` (-1 = unused slot, read as 0 and then
    zeroed). ``idx`` is [B, n]; x is [B, H, ..., L, ...] with the batch first; the result has n
    along ``dim`` and x's other sizes."""
    b = x.shape[0]
    shape = [1] * x.dim()
    shape[0], shape[dim] = b, idx.shape[1]
    i = idx.clamp(min=0).reshape(shape)
    size = list(x.shape)
    size[dim] = idx.shape[1]
    out = torch.gather(x, dim, i.expand(size))
    return out * (idx >= 0).reshape(shape).to(out.dtype)


def row_scores(q, kc, rows, dt):
    """Unscaled scores of the probe rows: q [B,Hq,Lq,D], kc [B,Hkv,C,D], rows [B,R] (-1 read as 0)
    -> q_r . k_c as [B,Hq,R,C] in dtype dt; query head h uses key head h // (Hq / Hkv)."""
    b, hq, _, d = q.shape
    hkv, r = kc.shape[1], rows.shape[1]
    qr = torch.gather(q, 2, rows.clamp(min=0)[:, None, :, None].expand(b, hq, r, d)).to(dt)
    # grouped: [B, Hkv, G*R, D] @ [B, Hkv, D, C] -> [B, Hq, R, C]
    s = torch.matmul(qr.reshape(b, hkv, (hq // hkv) * r, d), kc.to(dt).transpose(-1, -2))
    return s.reshape(b, hq, r, kc.shape[2])


def probe_probs_from_lse(q, k, lse, spec):
    """q [B,Hq,Lq,D], k [B,Hkv,Lk,D], lse [B,Hq,Lq] fp32 (-inf on empty rows) -> P [B,Hq,R,C]
    (C = Lk for full rows) in ``probs_dtype(q.dtype)``, for ``spec``'s probe rows / columns."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    rows, cols = spec.probe_rows, spec.probe_cols
    r = rows.shape[1]
    dt = probs_dtype(q.dtype)
    c_n = spec.n_cols
    if r == 0 or c_n == 0:
        return torch.zeros(b, hq, r, c_n, dtype=dt, device=q.device)
    rr = rows.clamp(min=0)
    if cols is None:
        kc = k
        cc = torch.arange(lk, device=q.device).unsqueeze(0).expand(b, -1)
    else:
        cc = cols.clamp(min=0)
        kc = torch.gather(k, 2, cc[:, None, :, None].expand(b, hkv, cc.shape[1], d))
    s = row_scores(q, kc, rows, dt)
    lr = torch.gather(lse.to(dt), 2, rr[:, None, :].expand(b, hq, r)).unsqueeze(-1)
    vis = visible(rr, cc, lq=lq, lk=lk, causal=spec.causal, window=spec.window,
                  key_padding_mask=spec.key_padding_mask)
    vis = vis & (rows >= 0).unsqueeze(-1)
    if cols is not None:
        vis = vis & (cols >= 0).unsqueeze(1)
    vis = vis.unsqueeze(1) & torch.isfinite(lr)
    return torch.where(vis, torch.exp(s * spec.scale - torch.where(vis, lr, 0.0)), 0.0)


def probe_delta_extra(probs, grad_probs, rows, lq):
    """-> (ds = P * G [B,Hq,R,C], delta_extra [B,Hq,Lq] = sum_c ds scattered to the probe rows)."""
    b, hq, r, _ = probs.shape
    ds = probs * grad_probs.to(probs.dtype)  # 0 where P = 0 (masked or unused slots)
    extra = torch.zeros(b, hq, lq, dtype=probs.dtype, device=probs.device)
    extra.scatter_add_(2, rows.clamp(min=0)[:, None, :].expand(b, hq, r), ds.sum(-1))
    return ds, extra


def _probe_cols(k, spec):
    """(column positions [B,C] with -1 read as 0, the keys there [B,Hkv,C,D])."""
    b, hkv, lk, d = k.shape
    cc = (torch.arange(lk, device=k.device).unsqueeze(0).expand(b, -1)
          if spec.probe_cols is None else spec.probe_cols.clamp(min=0))
    if spec.probe_cols is None:
        return cc, k
    return cc, torch.gather(k, 2, cc[:, None, :, None].expand(b, hkv, cc.shape[1], d))


def probe_dq_rows(ds, k, spec):
    """scale * sum_c ds[b,h,r,c] k[b,h//G,cols[c]] -> [B,Hq,R,D] in ds's dtype: the direct term of
    the probe gradient into dq row rows[r]. ds [B,Hq,R,C] (C = Lk for full rows)."""
    b, hq, r, c = ds.shape
    hkv, d = k.shape[1], k.shape[3]
    _, kc = _probe_cols(k, spec)
    out = torch.matmul(ds.reshape(b, hkv, (hq // hkv) * r, c), kc.to(ds.dtype))
    return out.reshape(b, hq, r, d) * spec.scale


def add_probe_direct(dq, dk, q, k, ds, spec):
    """In place: dq[b,h,rows[r]] += scale * sum_c ds[r,c] k_c; dk[b,h//G,cols[c]] += scale *
    sum_{h in group, r} ds[r,c] q_r. dq [B,Hq,Lq,D], dk [B,Hkv,Lk,D] accumulators."""
    b, hq, lq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    rr = spec.probe_rows.clamp(min=0)
    r = rr.shape[1]
    dt = ds.dtype
    cc, _ = _probe_cols(k, spec)
    c = cc.shape[1]
    dq.scatter_add_(2, rr[:, None, :, None].expand(b, hq, r, d),
                    probe_dq_rows(ds, k, spec).to(dq.dtype))
    qr = torch.gather(q, 2, rr[:, None, :, None].expand(b, hq, r, d)).to(dt)  # [B,Hq,R,D]
    dk_cols = torch.matmul(ds.transpose(-1, -2), qr).reshape(b, hkv, g, c, d).sum(2) * spec.scale
    dk.scatter_add_(2, cc[:, None, :, None].expand(b, hkv, c, d), dk_cols.to(dk.dtype))


def probe_backward(q, k, probs, grad_probs, spec):
    """-> (delta_extra [B,Hq,Lq], dq_direct [B,Hq,Lq,D], dk_direct [B,Hkv,Lk,D]), float32.

    delta_extra is added to the flash backward's delta; dq_direct / dk_direct are added to its dq /
    dk (dense, mostly zeros: prefer add_probe_direct into the kernel's own accumulators)."""
    b, hq, lq, d = q.shape
    ds, extra = probe_delta_extra(probs, grad_probs, spec.probe_rows, lq)
    dq = torch.zeros(b, hq, lq, d, dtype=ds.dtype, device=q.device)
    dk = torch.zeros(b, k.shape[1], k.shape[2], d, dtype=ds.dtype, device=q.device)
    add_probe_direct(dq, dk, q, k, ds, spec)
    return extra, dq, dk
