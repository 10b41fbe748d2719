"""Backend "sdpa": PyTorch's best SDPA kernel for the output (cuDNN / flash on a GPU, called
without a mask), dedicated probe kernels for the probabilities.

The loss separates: L = f(out(q, k, v)) + g(P(q, k)), so the gradients add and the probes need
none of the output's machinery. The probe rows' log-sum-exp is recomputed against all keys
(O(R * Lk * D), one pass over K) by ``abft_fast.kernels.probes``; their backward adds, for probe
row r with ds_rc = P_rc G_rc and u_r = sum_c ds_rc, the score gradient ds_rj [j in C] - u_r P_rj
into dk (every visible key) and dq (the R probe rows); dv gets nothing (docs/design.md).

Where Triton cannot run (a CPU without TRITON_INTERPRET=1, float64, a GPU without a working
Triton) the probes come from the CUDA C++ probe kernels on CUDA tensors when that extension
loads, else from the torch backend's probe path (the same maths through autograd):
``probes.choose`` decides. Unmasked attention only: no key padding, no window (causal with
Lq != Lk runs the torch backend's query-block path for the output).
"""
from __future__ import annotations

import torch

from . import probe_ops, probes, torch_backend
from .spec import AttentionSpec, probs_dtype


def check_supported(spec: AttentionSpec) -> None:
    if spec.key_padding_mask is not None or spec.window is not None:
        raise ValueError("backend='sdpa' runs unmasked attention only (PyTorch's fast SDPA "
                         "kernels take no mask): got a key_padding_mask or a window; use "
                         "backend='varlen', 'triton' (fused) or 'auto'")


def attention(q, k, v, spec: AttentionSpec):
    check_supported(spec)
    if _fused_backward(q, k, v, spec):
        return SdpaWithProbes.apply(q, k, v, spec)
    out = torch_backend.output(q, k, v, spec)
    probs = probes.probe_probs(q, k, spec) if spec.has_probes else None
    return out, probs


def _fused_backward(q, k, v, spec: AttentionSpec) -> bool:
    """Eager training calls with probes take the one-Function path (below); torch.compile, no
    grad, float64, an empty probe set, or saved-tensor hooks (non-reentrant gradient
    checkpointing, offloading: the nested backward would run the checkpointed layer a second
    time) take the composite path (SDPA + the probe op)."""
    return (spec.has_probes and spec.probe_rows.shape[1] > 0 and spec.n_cols > 0
            and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
            and not torch.compiler.is_compiling() and not _saved_tensor_hooks_active()
            and probes.choose(q, spec) is probes.TRITON)


def _saved_tensor_hooks_active() -> bool:
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None  # unknown torch: assume active (composite)


class SdpaWithProbes(torch.autograd.Function):
    """Output and probes in one autograd node, so that the probe gradient goes straight into the
    output's gradients: the probe part of dk is added by the dk kernel in place, the R probe rows
    of dq by one scatter-add; nothing dense is allocated for the probes. The SDPA output keeps
    its own autograd graph (whatever vendor kernel ran) and is differentiated inside backward."""

    @staticmethod
    def forward(ctx, q, k, v, spec: AttentionSpec):
        from ..kernels.probes import probe_rows_fwd
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(t.requires_grad) for t in (q, k, v)]
            out = torch_backend.output(*leaves, spec)
        probs, lse = probe_rows_fwd(q, k, spec.probe_rows, spec.probe_cols, None,
                                    causal=spec.causal, window=None, scale=spec.scale)
        ctx.graph = (out, leaves)
        ctx.spec = spec
        ctx.set_materialize_grads(False)  # an unused output gives None: no work for it
        ctx.save_for_backward(q, k, probs, lse)
        return out.detach(), probs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dprobs):
        from ..kernels.probes import accepts_dk_out, probe_rows_bwd
        q, k, probs, lse = ctx.saved_tensors
        spec = ctx.spec
        if ctx.graph is None:
            raise RuntimeError(
                "abft_fast backend='sdpa': this attention call was already differentiated; a "
                "second backward through it (retain_graph=True) is not supported on the "
                "one-node training path. Use backend='torch', or run the call under "
                "torch.compile (the composite path)")
        out, leaves = ctx.graph
        ctx.graph = None
        grads = [None, None, None]
        wanted = [i for i, t in enumerate(leaves) if t.requires_grad]
        if dout is not None and wanted:
            got = torch.autograd.grad(out, [leaves[i] for i in wanted], dout, allow_unused=True)
            for i, g in zip(wanted, got):
                grads[i] = g
        if dprobs is not None and (q.requires_grad or k.requires_grad):
            u, e = probe_ops.grad_inputs(probs, dprobs, spec.probe_cols, spec.k_len)
            dk = grads[1]
            # in place into SDPA's dk whatever its strides (a transposed view in HF models)
            in_place = dk is not None and accepts_dk_out(dk)
            dq_rows, dk_p = probe_rows_bwd(q, k, spec.probe_rows, lse, u, e, None,
                                           causal=spec.causal, window=None, scale=spec.scale,
                                           dk_out=dk if in_place else None)
            if k.requires_grad and not in_place:
                grads[1] = dk_p.to(k.dtype) if dk is None else dk + dk_p.to(dk.dtype)
            if q.requires_grad:
                dq = grads[0] if grads[0] is not None else torch.zeros_like(q)
                grads[0] = probe_ops.add_rows(dq, dq_rows, spec.probe_rows)
        return grads[0], grads[1], grads[2], None


__all__ = ["attention", "check_supported", "probs_dtype"]
