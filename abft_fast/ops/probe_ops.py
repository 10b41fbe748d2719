"""The probe-row op pair shared by the engines that compute probes apart from the output (sdpa with
Triton kernels, cuda with CUDA C++ kernels): registration as torch.library ops (fake and autograd
included) and the torch glue around the kernels' backward.

A kernel pair is ``fwd(q, k, kpm, rows, cols, causal, scale, window) -> (P [B,Hq,R,C] float32,
lse [B,Hq,R] float32)`` and ``rows_bwd(q, k, rows, lse, u, e, kpm, causal, scale, window) ->
(dq_rows [B,Hq,R,D], dk [B,Hkv,Lk,D])`` with u = sum_c P G and e = P G scattered to full rows
(docs/design.md, "the split used by the sdpa engine").
"""
from __future__ import annotations

import torch


def grad_inputs(probs, dprobs, cols, k_len: int):
    """(u [B,Hq,R], e [B,Hq,R,Lk]) of the probe backward: ds = P G (0 where P is 0: masked
    entries, unused slots), its row sums, and ds scattered to full rows (duplicate columns add;
    full-row probes are already that)."""
    ds = probs * dprobs.to(probs.dtype)
    if cols is None:
        return ds.sum(-1), ds
    e = ds.new_zeros(*ds.shape[:3], k_len)
    e.scatter_add_(3, cols.clamp(min=0)[:, None, None, :].expand_as(ds), ds)
    return ds.sum(-1), e


def add_rows(dq, dq_rows, rows):
    """In place: dq[b, h, rows[b, r]] += dq_rows[b, h, r] (duplicate rows add; dq_rows is 0 on
    unused slots). Returns dq."""
    idx = rows.clamp(min=0)[:, None, :, None].expand_as(dq_rows)
    return dq.scatter_add_(2, idx, dq_rows.to(dq.dtype))


def register(name: str, fwd, rows_bwd, doc: str):
    """Register ``abft_fast::<name>`` and ``abft_fast::<name>_backward`` for a kernel pair
    (looked up when called, so that a JIT build happens on first use). Returns the forward op:
    op(q, k, kpm, rows, cols, causal, scale, window) -> (probs, lse), differentiable into q, k."""

    def forward(q: torch.Tensor, k: torch.Tensor, key_padding_mask: torch.Tensor | None,
                probe_rows: torch.Tensor, probe_cols: torch.Tensor | None, causal: bool,
                scale: float, window: int) -> tuple[torch.Tensor, torch.Tensor]:
        return fwd()(q, k, key_padding_mask, probe_rows, probe_cols, causal, scale, window)

    forward.__doc__ = doc
    op = torch.library.custom_op(f"abft_fast::{name}", forward, mutates_args=())

    @op.register_fake
    def _(q, k, key_padding_mask, probe_rows, probe_cols, causal, scale, window):
        b, hq = q.shape[:2]
        c = k.shape[2] if probe_cols is None else probe_cols.shape[1]
        return (q.new_empty((b, hq, probe_rows.shape[1], c), dtype=torch.float32),
                q.new_empty((b, hq, probe_rows.shape[1]), dtype=torch.float32))

    def backward(dprobs: torch.Tensor, q: torch.Tensor, k: torch.Tensor, probs: torch.Tensor,
                 lse: torch.Tensor, key_padding_mask: torch.Tensor | None,
                 probe_rows: torch.Tensor, probe_cols: torch.Tensor | None, causal: bool,
                 scale: float, window: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (dq [B,Hq,Lq,D] in q's dtype, non-zero on the probe rows only; dk in k's dtype)."""
        u, e = grad_inputs(probs, dprobs, probe_cols, k.shape[2])
        dq_rows, dk = rows_bwd()(q, k, probe_rows, lse, u, e, key_padding_mask, causal, scale,
                                 window)
        return add_rows(torch.zeros_like(q, memory_format=torch.contiguous_format), dq_rows,
                        probe_rows), dk.to(k.dtype)

    backward_op = torch.library.custom_op(f"abft_fast::{name}_backward", backward,
                                          mutates_args=())

    @backward_op.register_fake
    def _(dprobs, q, k, probs, lse, key_padding_mask, probe_rows, probe_cols, causal, scale,
          window):
        return q.new_empty(q.shape), k.new_empty(k.shape)  # contiguous, as the op returns them

    def setup_context(ctx, inputs, output):
        q, k, kpm, rows, cols, causal, scale, window = inputs
        ctx.save_for_backward(q, k, *output, kpm, rows, cols)
        ctx.cfg = (causal, scale, window)

    def autograd_backward(ctx, dprobs, _dlse):
        q, k, probs, lse, kpm, rows, cols = ctx.saved_tensors
        if dprobs is None:
            return (None,) * 8
        dq, dk = backward_op(dprobs, q, k, probs, lse, kpm, rows, cols, *ctx.cfg)
        return (dq, dk) + (None,) * 6

    op.register_autograd(autograd_backward, setup_context=setup_context)
    op.backward_op = backward_op
    return op
