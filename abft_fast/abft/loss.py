"""The ABFT loss with the induction-head filter (DESIGN.md section 1)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


def threshold(k, n_t):
    """Induction-head threshold T = k / (k + ln n_t); works on numbers and tensors."""
    n_t = torch.as_tensor(n_t, dtype=torch.float64)
    k = torch.as_tensor(k, dtype=torch.float64)
    return k / (k + torch.log(n_t))


@dataclass
class LossOut:
    loss: torch.Tensor          # scalar: mean over samples of the summed counted-head losses
    passing: torch.Tensor       # [B] number of heads passing the filter per sample
    mass_correct: torch.Tensor  # [layers, B, H] last-row mass on correct-label positions (detached)
    mass_wrong: torch.Tensor    # [layers, B, H] same on wrong-label positions (detached)
    head_mask: torch.Tensor     # [layers, B, H] bool: the head counts


def abft_loss(probs, correct, valid, lengths, A=0.5, B=1.0, use_filter=True) -> LossOut:
    """ABFT loss from probe probabilities.

    Args:
      probs: [layers, B, H, R, C] attention probabilities of the query row(s) (R = 1: the prompt's
        last token; R > 1 rows are summed) on the demonstration label positions.
      correct: [B, C] bool, the demonstration's label equals the query's gold label (I+).
      valid: [B, C] bool, the column is a real label position (k_b = valid[b].sum()).
      lengths: [B] real prompt lengths n_t (tokens).
      A, B: weights of the wrong-label mass and of the missing correct-label mass.
      use_filter: count only heads with S = mass on all labels > k / (k + ln n_t); else all heads.
    Returns a ``LossOut``; ``loss`` sums counted heads over layers and heads and averages samples.
    """
    if probs.dim() != 5:
        raise ValueError(f"probs must be [layers, B, H, R, C]; got shape {tuple(probs.shape)}")
    nl, nb, nh, nr, nc = probs.shape
    if correct.shape != (nb, nc) or valid.shape != (nb, nc):
        raise ValueError(f"correct and valid must have shape {(nb, nc)}; got "
                         f"{tuple(correct.shape)} and {tuple(valid.shape)}")
    if lengths.shape != (nb,):
        raise ValueError(f"lengths must have shape ({nb},); got {tuple(lengths.shape)}")
    p = probs.sum(3)  # [layers, B, H, C]
    pos = (correct & valid).to(p.dtype)[None, :, None, :]
    neg = (~correct & valid).to(p.dtype)[None, :, None, :]
    m_pos = (p * pos).sum(-1)
    m_neg = (p * neg).sum(-1)
    head_loss = A * m_neg + B * (1.0 - m_pos)
    if use_filter:
        k = valid.sum(1)
        thr = threshold(k, lengths.clamp(min=2)).to(p.dtype)  # ln 1 = 0 would give T = 1
        mask = (m_pos + m_neg).detach() > thr[None, :, None]
    else:
        mask = torch.ones_like(head_loss, dtype=torch.bool)
    per_sample = (head_loss * mask).sum((0, 2))
    return LossOut(per_sample.mean(), mask.sum((0, 2)), m_pos.detach(), m_neg.detach(), mask)
