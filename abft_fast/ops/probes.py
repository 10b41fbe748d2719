"""Probe providers: what computes the probe probabilities P[probe rows, probe cols] apart from the
output, for the engines that split them (sdpa, varlen, cuda), and the one place that chooses.

  triton  the Triton probe kernels (kernels/probes.py) as ``abft_fast::probe_rows``: CUDA tensors
          or the interpreter; float16 / bfloat16 / float32.
  cuda    the CUDA C++ probe kernels (csrc/probes.cuh) as ``abft_fast::cuda_probe_rows``: CUDA
          tensors of 16 / 32 bits with D <= 256, when the extension loads (prebuilt, cached, or
          built now on first use: one log line).
  torch   the torch backend's probe path: any device and dtype, through autograd.

Every provider takes the whole spec (key padding, window, Lq < Lk) and returns [B, Hq, R, C]
probabilities differentiable into q and k (docs/design.md, "the split used by the sdpa engine").
"""
from __future__ import annotations

import dataclasses

import torch

from . import available, cuda_ext, probe_ops, torch_backend
from .spec import AttentionSpec

__all__ = ["PROVIDERS", "ProbeProvider", "choose", "cuda_probe_rows_op", "probe_probs",
           "probe_rows_op"]

CUDA_MAX_HEAD_DIM = 256


@dataclasses.dataclass(frozen=True)
class ProbeProvider:
    """name; ``why_not(q, spec)``: '' when it runs this call, else why not; ``run(q, k, spec)``
    -> probs [B, Hq, R, C]."""
    name: str
    why_not: object
    run: object


# ------------------------------------------------------------------------------------ triton

def _triton_fwd():
    from ..kernels.probes import probe_rows_fwd

    def fwd(q, k, kpm, rows, cols, causal, scale, window):
        return probe_rows_fwd(q, k, rows, cols, kpm, causal=causal, window=window or None,
                              scale=scale)
    return fwd


def _triton_rows_bwd():
    from ..kernels.probes import probe_rows_bwd

    def rows_bwd(q, k, rows, lse, u, e, kpm, causal, scale, window):
        return probe_rows_bwd(q, k, rows, lse, u, e, kpm, causal=causal, window=window or None,
                              scale=scale)
    return rows_bwd


probe_rows_op = probe_ops.register(
    "probe_rows", _triton_fwd, _triton_rows_bwd,
    "-> (probs [B,Hq,R,C] float32, lse of the probe rows [B,Hq,R] float32), by the Triton "
    "probe kernels (abft_fast.kernels.probes).")


def _triton_why_not(q, spec: AttentionSpec) -> str:
    if q.dtype == torch.float64:
        return "the Triton probe kernels take float16 / bfloat16 / float32"
    return available.triton_available(q.device)[1]


# -------------------------------------------------------------------------------------- cuda

def _ext_fwd():
    ext = cuda_ext.load_extension()
    return lambda q, k, kpm, rows, cols, *cfg: ext.probe_fwd(q, k, rows, cols, kpm, *cfg)


cuda_probe_rows_op = probe_ops.register(
    "cuda_probe_rows", _ext_fwd, lambda: cuda_ext.load_extension().probe_bwd,
    "-> (probs [B,Hq,R,C] float32, lse of the probe rows [B,Hq,R] float32), by the CUDA probe "
    "kernels of the JIT-built (or prebuilt) extension.")


def _cuda_why_not(q, spec: AttentionSpec) -> str:
    if q.dtype == torch.float64:
        return "the CUDA probe kernels take float16 / bfloat16 / float32"
    if spec.head_dim > CUDA_MAX_HEAD_DIM:
        return f"the CUDA probe kernels take head dims up to {CUDA_MAX_HEAD_DIM}"
    ok, why = available.cuda_ext_available(q.device)
    if not ok:
        return why
    if not cuda_ext.extension_loads():
        return "the CUDA extension did not build"
    return ""


# ----------------------------------------------------------------------------------- records

def _run_op(op):
    def run(q, k, spec: AttentionSpec):
        probs, _ = op(q, k, spec.key_padding_mask, spec.probe_rows, spec.probe_cols, spec.causal,
                      spec.scale, spec.window or 0)
        return probs
    return run


TRITON = ProbeProvider("triton", _triton_why_not, _run_op(probe_rows_op))
CUDA = ProbeProvider("cuda", _cuda_why_not, _run_op(cuda_probe_rows_op))
TORCH = ProbeProvider("torch", lambda q, spec: "", torch_backend.probe_probs)
PROVIDERS = (TRITON, CUDA, TORCH)  # the order ``choose`` tries


def choose(q, spec: AttentionSpec) -> ProbeProvider:
    """The first provider of ``PROVIDERS`` that runs this call (torch always does)."""
    for p in PROVIDERS:
        if not p.why_not(q, spec):
            return p
    return TORCH  # pragma: no cover - torch runs everything


def probe_probs(q, k, spec: AttentionSpec):
    """[B, Hq, R, C] probe probabilities, differentiable into q and k, by ``choose``'s provider."""
    return choose(q, spec).run(q, k, spec)
