"""What the installed system offers the engines: Triton (importable; CUDA tensors or the
interpreter) and the CUDA extension (CUDA tensors, a CUDA build of torch). A leaf: every module
that asks imports it, and tests patch it here."""
from __future__ import annotations

import os

import torch

__all__ = ["cuda_ext_available", "triton_available"]

_triton_import: list[str] = []  # [why Triton cannot be imported, or ""], filled on first use


def _triton_importable() -> str:
    if not _triton_import:
        try:
            import triton  # noqa: F401
            _triton_import.append("")
        except Exception as e:  # pragma: no cover - triton missing
            _triton_import.append(f"Triton cannot be imported ({e})")
    return _triton_import[0]


def triton_available(device: torch.device) -> tuple[bool, str]:
    """(usable, reason) for the Triton kernels on tensors of ``device``."""
    why = _triton_importable()
    if why:
        return False, why
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    return False, ("Triton needs CUDA tensors (or TRITON_INTERPRET=1 set before abft_fast is "
                   f"imported, to run kernels on the CPU); got tensors on {device}")


def cuda_ext_available(device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, f"the CUDA extension needs CUDA tensors; got tensors on {device}"
    if torch.version.cuda is None:  # pragma: no cover
        return False, "this torch build has no CUDA"
    return True, ""
