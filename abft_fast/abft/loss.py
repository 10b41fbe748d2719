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


@dataclass
class MultiQueryLossOut(LossOut):
    """``multi_query_loss``'s result. ``passing`` is the mean over the sample's active rows of the
    heads passing at that row (the PID's input, on the single-query scale); ``mass_correct`` /
    ``mass_wrong`` are the QUERY row's (comparable with single-query runs); ``head_mask`` is
    [layers, B, H, R]."""
    row_passing: torch.Tensor = None      # [B, R] heads passing per row (0 for inactive rows)
    row_loss: torch.Tensor = None         # [B, R] summed counted-head loss per row (detached)
    row_mass_correct: torch.Tensor = None  # [layers, B, H, R] (detached)
    row_mass_wrong: torch.Tensor = None    # [layers, B, H, R] (detached)


def multi_query_loss(probs, correct, valid, lengths, active, A=0.5, B=1.0,
                     use_filter=True) -> MultiQueryLossOut:
    """Multi-query ABFT loss: the paper's loss at every prediction row with that row's own sets.

    Args:
      probs: [layers, B, H, R, C] probe probabilities of the R prediction rows on the C
        demonstration label positions.
      correct: [B, R, C] bool, I+ of each row (an earlier label equal to the row's label).
      valid: [B, R, C] bool, I+ and I- of each row (labels before the row); k_r = valid[b, r].sum().
      lengths: [B, R] the row's prompt length n_r (its position + 1).
      active: [B, R] bool, the slot is a prediction row (inactive rows add nothing).
      A, B, use_filter: as in ``abft_loss``; the filter threshold of row r is k_r / (k_r + ln n_r).
    Per row: the counted heads' ``A * wrong + B * (1 - correct)`` summed over layers and heads
    (``abft_loss``'s per-sample value); per sample: the mean over its active rows; ``loss``: the
    mean over samples. A sample whose only active row is the query's gets exactly ``abft_loss``.
    """
    if probs.dim() != 5:
        raise ValueError(f"probs must be [layers, B, H, R, C]; got shape {tuple(probs.shape)}")
    nl, nb, nh, nr, nc = probs.shape
    for name, t in (("correct", correct), ("valid", valid)):
        if t.shape != (nb, nr, nc):
            raise ValueError(f"{name} must have shape {(nb, nr, nc)}; got {tuple(t.shape)}")
    for name, t in (("lengths", lengths), ("active", active)):
        if t.shape != (nb, nr):
            raise ValueError(f"{name} must have shape {(nb, nr)}; got {tuple(t.shape)}")
    valid = valid & active[:, :, None]
    pos = (correct & valid).to(probs.dtype)[None, :, None]   # [1, B, 1, R, C]
    neg = (~correct & valid).to(probs.dtype)[None, :, None]
    m_pos = (probs * pos).sum(-1)                             # [layers, B, H, R]
    m_neg = (probs * neg).sum(-1)
    head_loss = A * m_neg + B * (1.0 - m_pos)
    act = active[None, :, None, :].expand_as(head_loss)
    if use_filter:
        k = valid.sum(-1)                                     # [B, R]
        thr = threshold(k, lengths.clamp(min=2)).to(probs.dtype)
        mask = ((m_pos + m_neg).detach() > thr[None, :, None, :]) & act
    else:
        mask = act
    per_row = (head_loss * mask).sum((0, 2))                  # [B, R]
    n_rows = active.sum(1).clamp(min=1).to(probs.dtype)       # [B]
    per_sample = per_row.sum(1) / n_rows
    row_passing = mask.sum((0, 2))
    return MultiQueryLossOut(
        per_sample.mean(), row_passing.sum(1).to(probs.dtype) / n_rows,
        m_pos[..., -1].detach(), m_neg[..., -1].detach(), mask,
        row_passing, per_row.detach(), m_pos.detach(), m_neg.detach())
