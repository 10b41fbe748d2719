"""Compile the Triton kernels ahead of time for a GPU target (sm_80 / sm_90) on a machine without a
GPU: catches constructs that the interpreter accepts but the compiler rejects, and reports register
and shared-memory use. Usage: python tests/aot_compile.py [90 80]"""
from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import abft_fast.kernels.attention as kernels

PTR = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


def signature(fn, dtype, consts):
    sig = {}
    for n in fn.arg_names:
        if n in consts:
            sig[n] = "constexpr"
        elif n in ("LSE", "DELTA", "DQ", "DK", "DV", "EXTRA", "P"):
            sig[n] = "*fp32"
        elif n in ("ROWS", "COLS"):
            sig[n] = "*i64"
        elif n == "KPM":
            sig[n] = "*u8"
        elif n in ("Q", "K", "V", "O", "DO"):
            sig[n] = PTR[dtype]
        elif n == "sm_scale":
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    return sig


def compile_all(cc: int, dtypes=("bf16", "fp16", "fp32"), dims=(64, 128, 256)):
    target = GPUTarget("cuda", cc, 32)
    rows = []
    for dtype in dtypes:
        for d in dims:
            for name, kind in (("_fwd_kernel", "fwd"), ("_bwd_dkdv_kernel", "dkdv"),
                               ("_bwd_dq_kernel", "dq")):
                fn = getattr(kernels, name)
                bm, bn, warps, stages = kernels._cfg_for(d, cc // 10, kind, dtype == "fp32")
                consts = dict(CAUSAL=True, WINDOW=0, HAS_KPM=True, BLOCK_M=bm, BLOCK_N=bn,
                              BLOCK_D=d, PREC="ieee" if dtype == "fp32" else "tf32", UPCAST=False)
                src = ASTSource(fn, signature(fn, dtype, consts), consts)
                k = triton.compile(src, target=target,
                                   options=dict(num_warps=warps, num_stages=stages))
                md = k.metadata
                rows.append((cc, dtype, d, name, bm, bn, warps, stages, md.shared,
                             getattr(k, "n_regs", None), getattr(k, "n_spills", None)))
                print(*rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    limits = {80: 166912, 90: 232448}  # max dynamic shared memory per block, bytes
    worst = 0
    for cc in [int(a) for a in sys.argv[1:]] or [80, 90]:
        for row in compile_all(cc):
            assert row[8] <= limits[cc], f"shared memory {row[8]} over the sm_{cc} limit: {row}"
            worst = max(worst, row[8])
    print("all kernels compiled; largest shared memory", worst)
