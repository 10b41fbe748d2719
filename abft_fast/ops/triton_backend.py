"""Backend "triton": the fused Triton kernels (abft_fast.kernels.attention) through the
``abft_fast::fused_attention`` op (abft_fast/ops/fused.py).

Forward: the flash kernel writes out and lse; the probe kernel writes P[r, c] from lse.
Backward: the probe gradient folds into the flash backward through delta, plus the R x C direct
term into dq and dk (docs/design.md).
"""
from __future__ import annotations

from . import fused
from .spec import AttentionSpec


def attention(q, k, v, spec: AttentionSpec, return_lse: bool = False):
    """Same contract as abft_fast.attention (arguments already checked). With return_lse, also
    returns lse [B, Hq, Lq] float32 (-inf on rows with no visible key)."""
    return fused.attention(q, k, v, spec, "triton", return_lse=return_lse)
