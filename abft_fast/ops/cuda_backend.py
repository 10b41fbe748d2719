"""Backend "cuda": the CUDA C++ kernels of csrc/, for machines where Triton cannot run.

Two routes, chosen per call (docs/cuda-probes.md):

- unmasked attention (no key padding mask, no window; causal with Lq < Lk included): the output
  and its gradient from PyTorch's SDPA (``torch_backend.output``: cuDNN / flash on a GPU), the
  probes from the CUDA probe kernels (csrc/probes.cuh): row lse and probabilities in the forward,
  dk and the R rows of dq in the backward, O(R * L * d) work. They run as the torch.library ops
  ``abft_fast::cuda_probe_rows`` / ``abft_fast::cuda_probe_rows_backward`` (fake implementations
  and autograd registered, so ``torch.compile`` traces them).
- key padding or a sliding window: the fused CUDA kernels (``fused.ExtensionEngine``): the
  forward writes out and lse, probe probabilities come from lse
  (``probe_math.probe_probs_from_lse``); the backward folds ``probe_math.probe_delta_extra`` and
  the direct dq / dk terms in.

The extension is the prebuilt ``abft_fast._cuda_ext`` when the package was installed with
``ABFT_FAST_BUILD_CUDA=1``; otherwise it is JIT-compiled with ninja through
``torch.utils.cpp_extension.load`` on first use and cached (see ``build_directory``). Importing this
module never compiles anything and needs no GPU.
"""
from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path

import torch

from ..util import cache_root
from . import fused, probe_ops, torch_backend
from .spec import AttentionSpec

MAX_HEAD_DIM = 256
EXTENSION_NAME = "abft_fast_cuda_ext"
JIT_SOURCES = ("binding.cpp", "attention_fwd.cu", "attention_bwd.cu", "probes_fwd.cu",
               "probes_bwd.cu")

_log = logging.getLogger("abft_fast")
_lock = threading.Lock()
_ext = None
_build_error: RuntimeError | None = None


def csrc_dir() -> Path:
    """Directory of the CUDA sources (installed as the package ``abft_fast.csrc``)."""
    try:
        from .. import csrc  # type: ignore[attr-defined]

        return Path(csrc.__file__).resolve().parent
    except ImportError:
        return Path(__file__).resolve().parents[2] / "csrc"


def build_directory() -> Path:
    """Where the JIT build lives: $ABFT_FAST_CUDA_BUILD_DIR if set, else
    ${XDG_CACHE_HOME:-~/.cache}/abft_fast/cuda_ext/torch<version>-cu<version>."""
    explicit = os.environ.get("ABFT_FAST_CUDA_BUILD_DIR")
    if explicit:
        return Path(explicit).expanduser()
    tag = re.sub(r"[^A-Za-z0-9._-]", "_", f"torch{torch.__version__}-cu{torch.version.cuda}")
    return cache_root() / "cuda_ext" / tag


def load_extension():
    """The compiled extension module (prebuilt, or JIT-built and cached on first call).

    Raises RuntimeError, naming the cause, when it cannot be built; the failure is remembered, so
    later calls raise at once instead of recompiling.
    """
    global _ext, _build_error
    if _ext is not None:
        return _ext
    with _lock:
        if _ext is not None:
            return _ext
        if _build_error is not None:
            raise _build_error
        try:
            from .. import _cuda_ext  # type: ignore[attr-defined]  # built at install time

            _ext = _cuda_ext
            return _ext
        except ImportError:
            pass
        try:
            _ext = _jit_build()
        except Exception as e:
            _build_error = RuntimeError(
                f"abft_fast: building the CUDA extension failed ({type(e).__name__}: {e}). "
                f"Sources: {csrc_dir()}; build directory: {build_directory()}. It needs a CUDA "
                "build of torch, nvcc (CUDA_HOME) and ninja; set ABFT_FAST_CUDA_VERBOSE=1 to see "
                "the compiler output.")
            raise _build_error from e
        return _ext


def _jit_build():
    if torch.version.cuda is None:
        raise RuntimeError(f"this torch build ({torch.__version__}) has no CUDA support")
    from torch.utils.cpp_extension import load

    src = csrc_dir()
    missing = [n for n in JIT_SOURCES if not (src / n).is_file()]
    if missing:
        raise FileNotFoundError(f"CUDA sources missing from {src}: {missing}")
    build = build_directory()
    build.mkdir(parents=True, exist_ok=True)
    _log.warning("abft_fast: compiling the CUDA attention extension with ninja into %s "
                 "(first use only; about 30 s on 16 cores, longer on fewer)", build)
    return load(
        name=EXTENSION_NAME,
        sources=[str(src / n) for n in JIT_SOURCES],
        extra_include_paths=[str(src)],
        extra_cflags=["-O3", "-std=c++17"],
        extra_cuda_cflags=["-O3", "-std=c++17"],
        build_directory=str(build),
        verbose=os.environ.get("ABFT_FAST_CUDA_VERBOSE", "0") == "1",
    )


ROUTES = ("auto", "probes", "fused")


def uses_probe_kernels(spec: AttentionSpec) -> bool:
    """True when ``attention`` takes the SDPA + probe-kernel route (no padding, no window)."""
    return spec.key_padding_mask is None and spec.window is None


def attention_with_extension(ext, q, k, v, spec: AttentionSpec, route: str = "auto"):
    """``attention`` on an explicit extension module (``ext.fwd`` / ``ext.bwd`` /
    ``ext.probe_fwd`` / ``ext.probe_bwd`` as in csrc/binding.cpp), eager autograd; the tests pass
    the CPU-emulation build of the same kernels. ``route``: "auto" (as ``attention``), "probes"
    (SDPA + probe kernels; any mask, which the probe kernels support too, though the torch
    backend then computes the output) or "fused" (the fused kernels, for any case)."""
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    _check_head_dim(spec)
    if route == "probes" or (route == "auto" and uses_probe_kernels(spec)):
        out = torch_backend.output(q, k, v, spec)
        probs = None
        if spec.has_probes:
            probs, _ = _ExtensionProbes.apply(ext, q, k, spec.key_padding_mask, spec.probe_rows,
                                              spec.probe_cols, spec.causal, spec.scale,
                                              spec.window or 0)
        return out, probs
    out, _, probs = fused.FusedAttention.apply(fused.ExtensionEngine(ext), spec, q, k, v)
    return out, probs


def _check_head_dim(spec: AttentionSpec):
    if spec.head_dim > MAX_HEAD_DIM:
        raise ValueError(f"backend='cuda' supports head dims up to {MAX_HEAD_DIM}, got "
                         f"{spec.head_dim}")


def attention(q, k, v, spec: AttentionSpec):
    """Same contract as ``abft_fast.attention`` (arguments already checked there):
    q [B, Hq, Lq, D], k / v [B, Hkv, Lk, D] CUDA tensors (fp32 / fp16 / bf16, D <= 256) ->
    (out [B, Hq, Lq, D], probs [B, Hq, R, C] float32 or None)."""
    _check_head_dim(spec)
    load_extension()  # build (or fail, naming why) before the op runs
    if not uses_probe_kernels(spec):
        return fused.attention(q, k, v, spec, "cuda")
    out = torch_backend.output(q, k, v, spec)
    probs = None
    if spec.has_probes:
        probs, _ = probe_rows_op(q, k, spec.key_padding_mask, spec.probe_rows, spec.probe_cols,
                                 spec.causal, spec.scale, spec.window or 0)
    return out, probs


# ------------------------------------------------------------------------------- probe kernels

def _probe_backward(ext, dprobs, q, k, probs, lse, key_padding_mask, probe_rows, probe_cols,
                    causal, scale, window):
    """-> (dq [B,Hq,Lq,D] in q's dtype, non-zero on the probe rows only; dk [B,Hkv,Lk,D] in k's
    dtype). ds = P G, u = sum_c ds, E = ds scattered to full rows; the kernels form
    dS = E - u P against every visible key (csrc/probes.cuh)."""
    u, e = probe_ops.grad_inputs(probs, dprobs, probe_cols, k.shape[2])
    dq_rows, dk = ext.probe_bwd(q, k, probe_rows, lse, u, e, key_padding_mask, causal, scale,
                                window)
    # straight into q's dtype: no float32 [B, Hq, Lq, D] pass
    return probe_ops.add_rows(torch.zeros_like(q, memory_format=torch.contiguous_format),
                              dq_rows, probe_rows), dk


class _ExtensionProbes(torch.autograd.Function):
    """The probe kernels of an explicit extension module (eager; see attention_with_extension)."""

    @staticmethod
    def forward(ctx, ext, q, k, key_padding_mask, probe_rows, probe_cols, causal, scale, window):
        probs, lse = ext.probe_fwd(q, k, probe_rows, probe_cols, key_padding_mask, causal, scale,
                                   window)
        ctx.save_for_backward(q, k, probs, lse, key_padding_mask, probe_rows, probe_cols)
        ctx.ext, ctx.cfg = ext, (causal, scale, window)
        ctx.mark_non_differentiable(lse)
        return probs, lse

    @staticmethod
    def backward(ctx, dprobs, _dlse):
        q, k, probs, lse, kpm, rows, cols = ctx.saved_tensors
        dq, dk = _probe_backward(ctx.ext, dprobs, q, k, probs, lse, kpm, rows, cols, *ctx.cfg)
        return None, dq, dk, None, None, None, None, None, None


def _ext_fwd():
    ext = load_extension()
    return lambda q, k, kpm, rows, cols, *cfg: ext.probe_fwd(q, k, rows, cols, kpm, *cfg)


probe_rows_op = probe_ops.register(
    "cuda_probe_rows", _ext_fwd, lambda: load_extension().probe_bwd,
    "-> (probs [B,Hq,R,C] float32, lse of the probe rows [B,Hq,R] float32), by the CUDA probe "
    "kernels of the JIT-built (or prebuilt) extension.")
probe_rows_backward_op = probe_rows_op.backward_op
