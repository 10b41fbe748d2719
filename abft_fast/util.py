"""Helpers below every layer (no torch, no abft_fast imports)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/abft_fast`` (``~/.cache/abft_fast`` when XDG_CACHE_HOME is unset): where
    the JIT-built CUDA extension and the converted packaged models live."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "abft_fast"
