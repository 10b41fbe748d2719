"""Time tile configurations of the Triton kernels on a GPU, one pass at a time.

    python bench/tune_tiles.py [--dtype bf16] [--B 4] [--hq 16] [--hkv 4] [--L 4096] [--d 128]
                               [--out tiles.csv] [--smoke]

Causal attention at one shape (default: the `quick` benchmark shape). For each pass (fwd, dkdv,
dq) the default configuration and every candidate of CANDIDATES run with the other passes at
their defaults (``abft_fast.kernels.attention.tiles``). A fwd candidate is timed on
``attention_fwd``; a dkdv or dq candidate on the whole ``attention_bwd`` (delta + dkdv + dq), so
its gain shows against the default's backward time. Before it is timed, every candidate's outputs
(out and lse, or dq, dk and dv) are checked against the float32 reference
(``abft_fast.ops.reference``): error <= 2x the default configuration's error + 1e-4, else it is
listed as wrong. A candidate the compiler rejects (shared memory, registers) is listed with the
error's name. Times are medians of ``triton.testing.do_bench``.

--smoke runs a tiny float32 shape with two candidates per pass and a single wall-clock call per
timing, in Triton's interpreter on a CPU (the CI check of this script); its times mean nothing.
Writes one CSV row per configuration as it is measured (--out) and prints a table sorted by time
for each pass.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # before any kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from abft_fast.kernels import attention as K  # noqa: E402
from abft_fast.kernels import autotune  # noqa: E402
from abft_fast.ops.reference import attention_reference  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# (BLOCK_M, BLOCK_N, num_warps, num_stages) for 16-bit inputs and head dims up to 128: the set
# ABFT_FAST_AUTOTUNE=1 times at run time (abft_fast.kernels.autotune), so that an offline sweep and
# the run-time choice look at the same tiles. dq candidates set only the dQ programs' blocks.
CANDIDATES = autotune.CANDIDATES["16"]
SMOKE_CANDIDATES = {"fwd": [(32, 16, 4, 1), (16, 32, 4, 1)], "dkdv": [(32, 16, 4, 1), (16, 32, 4, 1)],
                    "dq": [(32, 16, 4, 1), (16, 32, 4, 1)]}
FIELDS = ["pass", "BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "default", "status", "ms",
          "vs_default", "rel_err", "device", "dtype", "B", "Hq", "Hkv", "L", "D"]


def rel_err(x, ref):
    if not torch.isfinite(x).all():
        return float("inf")
    return float((x.double() - ref.double()).norm() / ref.double().norm())


def reference(q, k, v, dout):
    """abft_fast.ops.reference in float32 (causal, GQA): out, lse and the gradients."""
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    out, lse, _ = attention_reference(qf, kf, vf, causal=True)
    dq, dk, dv = torch.autograd.grad(out, (qf, kf, vf), dout.float())
    return dict(out=out.detach(), lse=lse.detach(), dq=dq, dk=dk, dv=dv)


def timer(smoke):
    if smoke:
        def wall(fn):
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        return wall
    import triton.testing
    return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--hq", type=int, default=16)
    ap.add_argument("--hkv", type=int, default=4)
    ap.add_argument("--L", type=int, default=4096)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--out", type=Path, default=None, help="CSV file (one row per configuration)")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU check of the script itself")
    a = ap.parse_args(argv)
    if a.smoke:
        a.dtype, a.B, a.hq, a.hkv, a.L, a.d = "fp32", 1, 2, 1, 40, 32
    elif not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (or --smoke)")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[a.dtype]
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(a.B, a.hq, a.L, a.d, device=dev, dtype=dtype, generator=gen)
    k = torch.randn(a.B, a.hkv, a.L, a.d, device=dev, dtype=dtype, generator=gen)
    v = torch.randn(a.B, a.hkv, a.L, a.d, device=dev, dtype=dtype, generator=gen)
    dout = torch.randn(a.B, a.hq, a.L, a.d, device=dev, dtype=dtype, generator=gen)
    ref = reference(q, k, v, dout)
    out0, lse0 = K.attention_fwd(q, k, v, causal=True)  # default tiles: the backward's inputs
    bench = timer(a.smoke)
    cands = SMOKE_CANDIDATES if a.smoke else CANDIDATES
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (interpreter)"
    rows = []
    sink = None
    if a.out:  # rows are written as they come, so a run cut short keeps what it measured
        a.out.parent.mkdir(parents=True, exist_ok=True)
        sink = open(a.out, "w", newline="")
        writer = csv.DictWriter(sink, FIELDS)
        writer.writeheader()
    for kind in K.TILE_KINDS:
        if kind == "fwd":
            run = lambda: K.attention_fwd(q, k, v, causal=True)  # noqa: E731
            names = ("out", "lse")
        else:
            run = lambda: K.attention_bwd(q, k, v, out0, lse0, dout, causal=True)  # noqa: E731
            names = ("dq", "dk", "dv")
        base_ms = base_err = None
        for cfg in [None] + cands[kind]:
            row = dict(zip(FIELDS[1:5], cfg or K._cfg(K.padded_head_dim(a.d), dev, kind, dtype)))
            row.update({"pass": kind, "default": int(cfg is None), "device": device_name,
                        "dtype": a.dtype, "B": a.B, "Hq": a.hq, "Hkv": a.hkv, "L": a.L, "D": a.d})
            try:
                with K.tiles(**({kind: cfg} if cfg else {})):
                    got = dict(zip(names, run()))
                    # causal with Lq = Lk: no row is empty, so lse is finite everywhere
                    err = max(rel_err(got[n], ref[n]) for n in names)
                    row["rel_err"] = f"{err:.3g}"
                    if cfg is None:
                        base_err = err
                    if err > 2 * base_err + 1e-4:
                        row["status"] = "wrong"
                    else:
                        ms = bench(run)
                        base_ms = ms if cfg is None else base_ms
                        row.update(status="ok", ms=f"{ms:.4g}", vs_default=f"{base_ms / ms:.3f}")
            except Exception as e:  # noqa: BLE001 - a rejected configuration is a result here
                if cfg is None:
                    raise
                row["status"] = f"rejected: {type(e).__name__}"
            rows.append(row)
            if sink:
                writer.writerow(row)
                sink.flush()
            print(f"{kind:5s} {str(cfg or 'default'):22s} {row['status']:28s} "
                  f"{row.get('ms', ''):>9s} ms  err {row.get('rel_err', '')}", flush=True)
    if sink:
        sink.close()
    print(f"\n{device_name}, {a.dtype}, causal, B {a.B}, Hq {a.hq}, Hkv {a.hkv}, L {a.L}, d {a.d}")
    print("| pass | BLOCK_M x BLOCK_N, warps, stages | ms | default / this |")
    print("|---|---|---|---|")
    for kind in K.TILE_KINDS:
        ok = sorted((r for r in rows if r["pass"] == kind and r["status"] == "ok"),
                    key=lambda r: float(r["ms"]))
        for r in ok[:4] + [r for r in ok[4:] if r["default"]]:
            tag = " (default)" if r["default"] else ""
            print(f"| {kind} | {r['BLOCK_M']}x{r['BLOCK_N']}, {r['num_warps']}, "
                  f"{r['num_stages']}{tag} | {r['ms']} | {r['vs_default']} |")
    return rows


if __name__ == "__main__":
    main()
