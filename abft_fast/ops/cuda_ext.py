"""The CUDA C++ extension (csrc/): the prebuilt ``abft_fast._cuda_ext`` when the package was
installed with ``ABFT_FAST_BUILD_CUDA=1``; otherwise JIT-compiled with ninja through
``torch.utils.cpp_extension.load`` on first use and cached (see ``build_directory``; one WARNING
log line when it builds). A leaf: the engines that run the extension import it. Importing it never
compiles anything and needs no GPU."""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from pathlib import Path

import torch

from ..util import cache_root

__all__ = ["EXTENSION_NAME", "JIT_SOURCES", "build_directory", "csrc_dir", "extension_loads",
           "is_cached", "load_extension"]

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


def extension_loads() -> bool:
    """True when ``load_extension`` succeeds (building on first use); a failed build is logged
    once (WARNING) and remembered, and then this is False without retrying."""
    if _ext is not None:
        return True
    if _build_error is not None:
        return False
    try:
        load_extension()
        return True
    except RuntimeError as e:
        _log.warning("%s", e)
        return False


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
    cached = is_cached(build, src)
    if cached:
        _log.debug("abft_fast: loading the cached CUDA extension from %s", build)
    else:
        _log.warning("abft_fast: building the CUDA extension (first use; cached afterwards) in %s",
                     build)
    t0 = time.perf_counter()
    ext = load(
        name=EXTENSION_NAME,
        sources=[str(src / n) for n in JIT_SOURCES],
        extra_include_paths=[str(src)],
        extra_cflags=["-O3", "-std=c++17"],
        extra_cuda_cflags=["-O3", "-std=c++17"],
        build_directory=str(build),
        verbose=os.environ.get("ABFT_FAST_CUDA_VERBOSE", "0") == "1",
    )
    if not cached:
        _log.info("abft_fast: CUDA extension built in %.0f s", time.perf_counter() - t0)
    return ext


def is_cached(build: Path, src: Path | None = None) -> bool:
    """True when ``build`` holds a built extension newer than every source in ``src`` (then the
    JIT load only links it in; ninja decides for itself in any case)."""
    src = src or csrc_dir()
    libs = [p for p in build.glob(f"{EXTENSION_NAME}*") if p.suffix in (".so", ".pyd")]
    if not libs:
        return False
    sources = [p for p in src.iterdir() if p.suffix in (".cu", ".cuh", ".h", ".cpp")]
    newest = max((p.stat().st_mtime for p in sources), default=0.0)
    return min(p.stat().st_mtime for p in libs) >= newest
