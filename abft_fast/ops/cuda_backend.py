"""Backend "cuda": autograd over the CUDA C++ kernels of csrc/, the fallback when Triton fails.

The extension is the prebuilt ``abft_fast._cuda_ext`` when the package was installed with
``ABFT_FAST_BUILD_CUDA=1``; otherwise it is JIT-compiled with ninja through
``torch.utils.cpp_extension.load`` on first use and cached (see ``build_directory``). Importing this
module never compiles anything and needs no GPU.

Forward: the kernel writes out and lse; probe probabilities come from lse
(``probe_math.probe_probs_from_lse``). Backward: ``probe_math.probe_backward`` turns the probe
gradient into an extra delta term and direct dq / dk terms, which the kernel folds in.
"""
from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path

import torch

from ..util import cache_root
from . import fused
from .spec import AttentionSpec

MAX_HEAD_DIM = 256
EXTENSION_NAME = "abft_fast_cuda_ext"
JIT_SOURCES = ("binding.cpp", "attention_fwd.cu", "attention_bwd.cu")

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


def attention_with_extension(ext, q, k, v, spec: AttentionSpec):
    """``attention`` on an explicit extension module (``ext.fwd`` / ``ext.bwd`` as in
    csrc/binding.cpp); the tests pass the CPU-emulation build of the same kernels."""
    _check_head_dim(spec)
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
    return fused.attention(q, k, v, spec, "cuda")
