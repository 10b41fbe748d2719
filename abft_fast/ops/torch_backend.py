"""Backend "torch": PyTorch only, every device and dtype (float64 too); autograd does the backward.

Output. Unmasked attention (no padding, no window; causal only with Lq == Lk) is one
``scaled_dot_product_attention`` call without a mask. Anything else (key padding, a window, causal
with Lq != Lk) runs over blocks of query rows: each block sees only the keys of its causal /
window band and gets a [B, 1, block, band] bool mask, never [L, L]: blocks of at most
``BLOCK_ROWS`` rows, fewer when B x block x Lk would pass ``MASK_BUDGET`` elements. (SDPA's
lower-right ``CausalBias`` is not used: without a fused kernel PyTorch materialises it as an
Lq x Lk mask, and it gives NaN rows when Lq > Lk.)

Probes: the R probe rows' scores against all keys, their log-sum-exp, then the C gathered columns:
O(R * Lk) memory per head.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .masks import visible
from .probe_math import gather_slots, row_scores
from .spec import AttentionSpec, probs_dtype

BLOCK_ROWS = 128       # query rows per masked SDPA call
MASK_BUDGET = 1 << 22  # elements of one query block's bool mask [B, block, band]


def attention(q, k, v, spec: AttentionSpec):
    out = output(q, k, v, spec)
    probs = probe_probs(q, k, spec) if spec.has_probes else None
    return out, probs


def output(q, k, v, spec: AttentionSpec):
    """[B, Hq, Lq, D]; rows with no visible key give 0."""
    gqa = spec.q_heads != spec.kv_heads
    if (spec.key_padding_mask is None and spec.window is None
            and (not spec.causal or spec.q_len == spec.k_len)):
        return F.scaled_dot_product_attention(q, k, v, is_causal=spec.causal, scale=spec.scale,
                                              enable_gqa=gqa)
    block = max(16, min(BLOCK_ROWS, MASK_BUDGET // max(1, spec.batch * spec.k_len)))
    parts = [_masked_block(q, k, v, spec, s, min(spec.q_len, s + block), gqa)
             for s in range(0, spec.q_len, block)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _band(spec: AttentionSpec, q0: int, q1: int) -> tuple[int, int]:
    """[lo, hi) of the keys that queries [q0, q1) can see under the causal / window rule."""
    lo, hi = 0, spec.k_len
    if spec.causal:
        hi = min(spec.k_len, q1 + spec.offset)
        if spec.window is not None:
            lo = max(0, q0 + spec.offset - spec.window + 1)
    return lo, hi  # hi <= lo only when Lq > Lk and the block lies before the first key


def _masked_block(q, k, v, spec: AttentionSpec, q0: int, q1: int, gqa: bool):
    b = spec.batch
    lo, hi = _band(spec, q0, q1)
    if hi <= lo:  # Lq > Lk: these query rows come before every key and see none
        return q.new_zeros(b, spec.q_heads, q1 - q0, spec.head_dim)
    rows = torch.arange(q0, q1, device=q.device).unsqueeze(0).expand(b, -1)
    cols = torch.arange(lo, hi, device=q.device)
    kpm = spec.key_padding_mask
    vis = visible(rows, cols, lq=spec.q_len, lk=spec.k_len, causal=spec.causal,
                  window=spec.window, key_padding_mask=kpm)  # [B, block, band]
    has = vis.any(-1, keepdim=True)  # [B, block, 1]
    # A row with no visible key would make SDPA return NaN (and NaN gradients): let it see every
    # key of its band, then zero its output; its zero output gradient adds nothing to k and v.
    out = F.scaled_dot_product_attention(q[:, :, q0:q1], k[:, :, lo:hi], v[:, :, lo:hi],
                                         attn_mask=(vis | ~has).unsqueeze(1), scale=spec.scale,
                                         enable_gqa=gqa)
    return out.masked_fill(~has.unsqueeze(1), 0.0)


def probe_probs(q, k, spec: AttentionSpec):
    """Probabilities of probe rows x probe cols, [B, Hq, R, C] (or [B, Hq, R, Lk])."""
    rows = spec.probe_rows
    s = row_scores(q, k, rows, probs_dtype(q.dtype)) * spec.scale  # [B, Hq, R, Lk]
    vis = visible(rows.clamp(min=0), torch.arange(spec.k_len, device=q.device), lq=spec.q_len,
                  lk=spec.k_len, causal=spec.causal, window=spec.window,
                  key_padding_mask=spec.key_padding_mask)
    vis = (vis & (rows >= 0).unsqueeze(-1)).unsqueeze(1)  # [B, 1, R, Lk]
    # masked keys get -inf; a row with no visible key keeps finite scores so that logsumexp and its
    # gradient stay finite, and is zeroed by the final where.
    has = vis.any(-1, keepdim=True)
    s = torch.where(vis, s, torch.where(has, float("-inf"), 0.0).to(s.dtype))
    p = torch.where(vis, torch.exp(s - torch.logsumexp(s, dim=-1, keepdim=True)), 0.0)
    return p if spec.probe_cols is None else gather_slots(p, spec.probe_cols, 3)
