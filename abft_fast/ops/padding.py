"""``Padding``: a [B, L] key padding mask read once on the host, so that variable-length kernels can
use it (``abft_fast.ops.varlen``) without a host synchronisation per attention call.

Pass it as ``key_padding_mask`` of :func:`abft_fast.attention`. The HF integration builds one per
model forward (in its mask builder) and every layer shares it.
"""
from __future__ import annotations

import dataclasses

import torch

__all__ = ["Padding"]


@dataclasses.dataclass(frozen=True, eq=False)
class Padding:
    """A key padding mask with its runs of real tokens known on the host.

    mask: [B, L] bool, True = real token. ``zero_padded_queries``: a query row whose own position
    (i + Lk - Lq) is padding gives out = 0 and probabilities 0 (and no gradient), as HF's
    flash-attention path does; otherwise (the default) it attends like any row.
    starts / ends / counts: per batch row, the first real position, one past the last, and the
    number of real positions (0, 0, 0 for a row without any). ``contiguous``: every row's real
    positions form one run (left, right or both-sided padding; not holes).
    """
    mask: torch.Tensor
    zero_padded_queries: bool
    starts: tuple[int, ...]
    ends: tuple[int, ...]
    counts: tuple[int, ...]
    cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @staticmethod
    def of(mask: torch.Tensor, *, zero_padded_queries: bool = False) -> Padding:
        """Read ``mask`` ([B, L] bool or 0/1 integer) on the host: one synchronisation."""
        if isinstance(mask, Padding):
            return mask
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise ValueError("Padding.of: mask must be a [B, L] tensor, got "
                             f"{type(mask).__name__} {tuple(getattr(mask, 'shape', ()))}")
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise TypeError(f"Padding.of: mask must be bool or 0/1 integer, got {mask.dtype}")
        if mask.dtype != torch.bool:
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError("Padding.of: integer mask values must be 0 or 1")
            mask = mask != 0
        length = mask.shape[1]
        m = mask.to(torch.int32)
        counts = m.sum(1)
        starts = torch.where(counts > 0, m.argmax(1), 0)
        ends = torch.where(counts > 0, length - m.flip(1).argmax(1), 0)
        s, e, n = torch.stack([starts, ends, counts]).tolist()  # the one host read
        return Padding(mask, bool(zero_padded_queries), tuple(s), tuple(e), tuple(n))

    @property
    def contiguous(self) -> bool:
        return all(e - s == n for s, e, n in zip(self.starts, self.ends, self.counts))

    def query_mask(self, q_len: int) -> torch.Tensor:
        """[B, Lq] bool: query i is real iff key position i + (L - Lq) is (False before key 0)."""
        off = self.mask.shape[1] - q_len
        if off >= 0:
            return self.mask[:, off:]
        pad = self.mask.new_zeros(self.mask.shape[0], -off)
        return torch.cat([pad, self.mask], dim=1)
