"""The engines behind ``backend=``: each one record, an output provider with a probe provider.

| name     | output                                              | probes                       |
|----------|-----------------------------------------------------|------------------------------|
| torch    | SDPA (query blocks with a band mask when masked)    | torch probe path             |
| sdpa     | SDPA without a mask (cuDNN / flash on a GPU)        | ``probes.choose``            |
| varlen   | PyTorch's varlen flash kernel (``ops/varlen.py``)   | ``probes.choose``            |
| triton   | the fused Triton kernel                             | inside the fused kernel      |
| cuda     | SDPA through the torch backend (GQA expanded where  | CUDA C++ probe kernels       |
|          | no fused SDPA kernel takes it masked)               |                              |

A record says what it needs of the machine (``unavailable``: '' or why not, for the device) and
of the call (``dtypes``; ``refuses``: '' or the whole error message), and runs a checked call
(``run(q, k, v, spec) -> (out, probs)``). ``zeroes_padded_queries``: its output is already 0 on
the rows of ``spec.query_mask`` that are False. ``ops/attention.py`` alone chooses among them.
"""
from __future__ import annotations

import dataclasses

import torch

from . import (
    available,
    cuda_backend,
    probes,
    sdpa_backend,
    torch_backend,
    triton_backend,
    varlen,
)
from .spec import AttentionSpec

__all__ = ["ENGINES", "Engine"]

ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclasses.dataclass(frozen=True)
class Engine:
    name: str
    output: str
    probes: str
    unavailable: object          # (device) -> '' or why it cannot run there
    dtypes: object               # (q, spec) -> the dtypes it takes
    refuses: object              # (q, spec) -> '' or the error message for this call
    run: object                  # (q, k, v, spec) -> (out, probs)
    zeroes_padded_queries: bool = False


def _always(*_):
    return ""


def _sdpa_refuses(q, spec: AttentionSpec) -> str:
    try:
        sdpa_backend.check_supported(spec)
    except ValueError as e:
        return str(e)
    return ""


def _varlen_refuses(q, spec: AttentionSpec) -> str:
    why = varlen.why_unsupported(q, spec)
    return f"backend='varlen' cannot run this call: {why}" if why else ""


def _varlen_run(q, k, v, spec: AttentionSpec):
    out = varlen.output(q, k, v, spec)
    return out, probes.probe_probs(q, k, spec) if spec.has_probes else None


def _cuda_refuses(q, spec: AttentionSpec) -> str:
    if spec.head_dim > cuda_backend.MAX_HEAD_DIM:
        return (f"backend='cuda' supports head dims up to {cuda_backend.MAX_HEAD_DIM}, got "
                f"{spec.head_dim}")
    return ""


def _varlen_dtypes(q, spec):
    kern = varlen.find_kernel()
    return kern.dtypes if kern is not None else ()


ENGINES = {e.name: e for e in (
    Engine("torch", "SDPA; query blocks with a band mask when masked, never L x L",
           "torch probe path", _always, lambda q, s: ALL_DTYPES, _always,
           torch_backend.attention),
    Engine("sdpa", "SDPA without a mask (cuDNN / flash on a GPU)", "probes.choose",
           _always, lambda q, s: ALL_DTYPES, _sdpa_refuses, sdpa_backend.attention),
    Engine("varlen", "PyTorch's varlen flash kernel, unpadded per Padding", "probes.choose",
           varlen.unavailable, _varlen_dtypes, _varlen_refuses, _varlen_run,
           zeroes_padded_queries=True),
    Engine("triton", "the fused Triton kernel", "inside the fused kernel",
           lambda d: available.triton_available(d)[1], lambda q, s: KERNEL_DTYPES, _always,
           triton_backend.attention),
    Engine("cuda", "SDPA through the torch backend", "CUDA C++ probe kernels",
           lambda d: available.cuda_ext_available(d)[1], lambda q, s: KERNEL_DTYPES,
           _cuda_refuses, cuda_backend.attention),
)}
