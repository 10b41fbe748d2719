"""Compile every Triton kernel the package ships, at its shipped configurations, ahead of time for
sm_80 / sm_90 on a machine without a GPU, and read the SASS with the cuobjdump inside Triton's
package: registers, stack bytes, spill instructions (LDL / STL), HGMMA (Hopper's asynchronous
tensor cores) vs HMMA (mma.sync), shared memory. Catches what the interpreter accepts but the
compiler rejects, and tiles that do not fit a generation's shared memory.

Beside each kernel's base specialisation (causal, key padding, probes, an aligned power-of-two head
dim), the specialisations users reach are compiled for sm_90 at d <= 128 (``VARIANTS``): a sliding
window, non-causal, a head dim padded to the next power of two (EVEN_D false, e.g. d 96 in a
128-wide tile), window and padded head dim together, and full-row probes.

Usage: python tests/aot_compile.py [90 80] [--csv PATH] [--base-only]. One line per kernel
configuration: cc dtype d kernel variant BLOCK_M BLOCK_N warps stages shared regs stack spills
hgmma hmma tma.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import abft_fast.kernels.attention as kernels
import abft_fast.kernels.column_scores as cs_kernels
import abft_fast.kernels.probes as probe_kernels

PTR = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}
FIELDS = ("cc", "dtype", "d", "kernel", "variant", "BLOCK_M", "BLOCK_N", "warps", "stages", "shared", "regs",
          "stack", "spills", "hgmma", "hmma", "tma")
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                         "cuobjdump")


def signature(fn, dtype, consts):
    sig = {}
    for n in fn.arg_names:
        if n in consts:
            sig[n] = "constexpr"
        elif n in ("DQ", "DK", "DV") and fn.__name__ == "_bwd_kernel":
            sig[n] = PTR[dtype]  # the fused backward stores its gradients in the input dtype
        elif n in ("LSE", "DELTA", "DQ", "DK", "DV", "EXTRA", "P", "U", "E", "DQP"):
            sig[n] = "*fp32"
        elif n == "OUT":
            sig[n] = "*fp32"
        elif n in ("ROWS", "COLS"):
            sig[n] = "*i64"
        elif n == "KPM":
            sig[n] = "*u8"
        elif n == "KRANGE":
            sig[n] = "*i32"
        elif n in ("Q", "K", "V", "O", "DO"):
            sig[n] = PTR[dtype]
        elif n == "sm_scale":
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    return sig


def sass_stats(compiled) -> dict:
    """Registers, stack, spill instructions and tensor-core instructions of a compiled kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
        path = f.name
    try:
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", path], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([CUOBJDUMP, "--dump-sass", path], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(path)
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return dict(regs=int(m[1]), stack=int(m[2]),
                spills=len(re.findall(r"\b(?:LDL|STL)(?:\.\w+)*\b", sass)),
                hgmma=len(re.findall(r"\bHGMMA\b", sass)), hmma=len(re.findall(r"\bHMMA\b", sass)),
                tma=len(re.findall(r"\bUTMALDG\b", sass)))


def jit_attrs(fn, sig):
    """The specialisation Triton's JIT makes at launch for the usual call (16-byte aligned tensors,
    strides that are multiples of 16 elements: any contiguous or head-transposed [B, H, L, D] with
    D a multiple of 16): tt.divisibility 16 on every pointer and stride argument (s_*). Without
    it the compiler cannot vectorise a load and the report shows spills that the kernels launched
    at run time do not have. Lengths (Lq, Lk, D, R, ...) stay unhinted."""
    return {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
            if sig[n].startswith("*") or (n.startswith("s_") and sig[n] != "constexpr")}


def _compile(fn, dtype, consts, target, warps, stages):
    sig = signature(fn, dtype, consts)
    descs = [n for n in ("QD", "DOD", "KD", "VD") if n in sig]
    if consts.get("USE_TMA"):  # loop tiles through tensor descriptors: box rows per tile
        if fn.__name__ == "_bwd_kernel":  # Q, dO in the dK/dV programs; K, V in the dQ programs
            rows = dict(QD=consts["BLOCK_M1"], DOD=consts["BLOCK_M1"], KD=consts["BLOCK_N2"],
                        VD=consts["BLOCK_N2"])
        else:
            rows = dict(QD=consts["BLOCK_M"], KD=consts["BLOCK_N"], VD=consts["BLOCK_N"])
        for n in descs:
            sig[n] = f"tensordesc<{dtype}[1,1,{rows[n]},{consts['BLOCK_D']}]>"
    elif descs:
        sig.update({n: "constexpr" for n in descs})
        consts = dict(consts, **{n: None for n in descs})
    src = ASTSource(fn, sig, consts, jit_attrs(fn, sig))
    return triton.compile(src, target=target, options=dict(num_warps=warps, num_stages=stages))


def flash_configs(cc: int, dtypes=("bf16", "fp16", "fp32"), dims=(64, 128, 256)):
    """The fused engine's forward and one-launch backward at their shipped tiles (causal, key
    padding, probes on: the variant with the most code)."""
    for dtype in dtypes:
        for d in dims:
            fp32 = dtype == "fp32"
            prec = kernels.dot_precision(fp32)
            bm, bn, warps, stages = kernels._cfg_for(d, cc // 10, "fwd", fp32)
            fwd = dict(CAUSAL=True, WINDOW=0, HAS_KPM=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=d,
                       EVEN_D=True, PREC=prec, UPCAST=False, USE_TMA=False)
            yield kernels._fwd_kernel, "_fwd_kernel", dtype, d, fwd, warps, stages
            if cc >= 90 and not fp32:  # the opt-in TMA forward (ABFT_FAST_TMA=1)
                yield (kernels._fwd_kernel, "_fwd_kernel_tma", dtype, d, dict(fwd, USE_TMA=True),
                       warps, stages)
            bm1, bn1, warps, stages = kernels._cfg_for(d, cc // 10, "dkdv", fp32)
            bm2, bn2, _, _ = kernels._cfg_for(d, cc // 10, "dq", fp32)
            bwd = dict(CAUSAL=True, WINDOW=0, HAS_KPM=True, HAS_PROBES=True, BLOCK_M1=bm1,
                       BLOCK_N1=bn1, BLOCK_M2=bm2, BLOCK_N2=bn2, BLOCK_D=d, BLOCK_R=16,
                       EVEN_D=True, PREC=prec, UPCAST=False, BLOCK_M=bm1, BLOCK_N=bn1,
                       USE_TMA=False)
            yield kernels._bwd_kernel, "_bwd_kernel", dtype, d, bwd, warps, stages
            if cc >= 90 and not fp32:  # the opt-in TMA backward
                yield (kernels._bwd_kernel, "_bwd_kernel_tma", dtype, d, dict(bwd, USE_TMA=True),
                       warps, stages)


def probe_configs(dtypes=("bf16", "fp16", "fp32"), dims=(64, 128, 256), rows=(16, 32, 64)):
    """The sdpa engine's probe kernels at their launch tiles (probes._tiles) for G x R probe rows
    of one key/value head (16, 32, 64: the row tiles the launcher picks)."""
    for dtype in dtypes:
        torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
        for d in dims:
            seen = set()
            for m_rows in rows:
                for kind in ("fwd", "dk", "dq"):
                    tile = probe_kernels._tiles(kind, m_rows, torch.device("cuda"), torch_dtype, d)
                    if (kind, tile) in seen:
                        continue
                    seen.add((kind, tile))
                    br, bn, warps, stages = tile
                    name = f"_probe_{kind}_kernel"
                    consts = dict(CAUSAL=True, WINDOW=0, HAS_KPM=False, BLOCK_R=br, BLOCK_N=bn,
                                  BLOCK_D=d, EVEN_D=True, UPCAST=False,
                                  PREC=kernels.dot_precision(dtype == "fp32"), BLOCK_M=br)
                    if kind == "fwd":
                        consts["FULL_ROWS"] = False
                    if kind == "dk":
                        consts["ACCUMULATE"] = True
                    yield getattr(probe_kernels, name), name, dtype, d, consts, warps, stages


def column_score_configs(dtypes=("bf16", "fp16", "fp32"), dims=(64, 128, 256)):
    """The column-score kernels (row lse pass, column sum pass) at their launch tiles, rows given."""
    for dtype in dtypes:
        torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
        for d in dims:
            bm, bn, warps, stages = cs_kernels._tiles(torch.device("cuda"), torch_dtype, d)
            for name in ("_row_lse_kernel", "_col_sum_kernel"):
                consts = dict(CAUSAL=True, WINDOW=0, HAS_KPM=True, HAS_ROWS=True, BLOCK_M=bm,
                              BLOCK_N=bn, BLOCK_D=d, UPCAST=False,
                              PREC=kernels.dot_precision(dtype == "fp32"))
                yield getattr(cs_kernels, name), name, dtype, d, consts, warps, stages


def small_configs(dtypes=("bf16", "fp32"), dims=(64, 128)):
    """The fused engine's probe-from-lse kernel and the backward's delta pre-pass."""
    for dtype in dtypes:
        for d in dims:
            yield (kernels._probe_kernel, "_probe_kernel", dtype, d,
                   dict(CAUSAL=True, WINDOW=0, HAS_KPM=True, FULL_ROWS=False, BLOCK_C=128,
                        BLOCK_D=d, BLOCK_M=1, BLOCK_N=128), 4, 1)
            yield (kernels._delta_kernel, "_delta_kernel", dtype, d,
                   dict(BLOCK_M=64, BLOCK_D=d, BLOCK_N=0), 4, 1)


def _strip(consts, fn):
    return {k: v for k, v in consts.items() if k in fn.arg_names}


# The specialisations users reach beyond the base one: constexpr overrides (applied where the
# kernel has the argument). WINDOW's value only enters a comparison; any positive value compiles
# the same code.
VARIANTS = {
    "window": dict(WINDOW=64),
    "noncausal": dict(CAUSAL=False, WINDOW=0),
    "odd_d": dict(EVEN_D=False),
    "window_odd_d": dict(WINDOW=64, EVEN_D=False),
}


def variant_configs(cc: int):
    """Every kernel family at d 64 / 128 in each of ``VARIANTS`` (the probe kernels at their
    widest row tile per kind), plus full-row probes (FULL_ROWS) for the kernels that have them."""
    dims, dtypes = (64, 128), ("bf16", "fp32")  # fp16 compiles bf16's code but for the casts
    base = [c for c in flash_configs(cc, dtypes, dims) if not c[1].endswith("_tma")]
    widest = {}
    for c in probe_configs(dtypes, dims):
        widest[(c[1], c[2], c[3])] = c  # the last tile per kind = the most rows
    base += list(widest.values()) + list(column_score_configs(dtypes, dims))
    base += list(small_configs(dtypes, dims))
    for fn, name, dtype, d, consts, warps, stages in base:
        for variant, over in VARIANTS.items():
            if all(k in consts for k in over) and any(consts[k] != v for k, v in over.items()):
                yield fn, name, dtype, d, dict(consts, **over), warps, stages, variant
        if "FULL_ROWS" in consts:
            yield fn, name, dtype, d, dict(consts, FULL_ROWS=True), warps, stages, "full_rows"


def compile_all(cc: int, with_probes: bool = True, variants: bool = True):
    target = GPUTarget("cuda", cc, 32)
    rows = []
    configs = [(*c, "base") for c in flash_configs(cc)]
    if with_probes:
        configs += [(*c, "base") for c in (list(probe_configs()) + list(column_score_configs())
                                           + list(small_configs()))]
    if variants and cc >= 90:
        configs += list(variant_configs(cc))
    for fn, name, dtype, d, consts, warps, stages, variant in configs:
        k = _compile(fn, dtype, _strip(consts, fn), target, warps, stages)
        st = sass_stats(k)
        rows.append(dict(cc=cc, dtype=dtype, d=d, kernel=name, variant=variant,
                         BLOCK_M=consts["BLOCK_M"], BLOCK_N=consts["BLOCK_N"], warps=warps,
                         stages=stages, shared=k.metadata.shared, **st))
        print(*(rows[-1][f] for f in FIELDS), flush=True)
    return rows


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    csv_path = sys.argv[sys.argv.index("--csv") + 1] if "--csv" in sys.argv else None
    if csv_path:
        args = [a for a in args if a != csv_path]
    limits = {80: 166912, 90: 232448}  # max dynamic shared memory per block, bytes
    worst, all_rows = 0, []
    print(*FIELDS)
    for cc in [int(a) for a in args] or [80, 90]:
        for row in compile_all(cc, variants="--base-only" not in sys.argv):
            assert row["shared"] <= limits[cc], f"shared memory over the sm_{cc} limit: {row}"
            worst = max(worst, row["shared"])
            all_rows.append(row)
    if csv_path:
        with open(csv_path, "w") as f:
            f.write(",".join(FIELDS) + "\n")
            for r in all_rows:
                f.write(",".join(str(r[k]) for k in FIELDS) + "\n")
    print("all kernels compiled; largest shared memory", worst)
