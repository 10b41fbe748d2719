"""The Triton kernels compile for real GPU targets (no GPU needed), and the sm_90 build report
holds: the interpreter accepts some programs the compiler rejects, tile sizes must fit each
generation's shared memory, and on Hopper every 16-bit flash, probe and column-score kernel must
use HGMMA. Runs tests/aot_compile.py in a subprocess without TRITON_INTERPRET (kernels must be
real JIT functions there). The report (registers, stack, spills) is written to
build/aot_report_triton<version>.csv and printed."""
import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROBE_KERNELS = ("_probe_fwd_kernel", "_probe_dk_kernel", "_probe_dq_kernel", "_row_lse_kernel",
                 "_col_sum_kernel")


def test_kernels_compile_for_sm80_and_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    import triton  # one report per Triton version: two CI legs compile side by side
    report = ROOT / "build" / f"aot_report_triton{triton.__version__}.csv"
    report.parent.mkdir(exist_ok=True)
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "aot_compile.py"), "80", "90",
                        "--csv", str(report)], env=env, capture_output=True, text=True,
                       timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    print(r.stdout)
    assert "all kernels compiled" in r.stdout
    every = list(csv.DictReader(report.open()))
    rows = [x for x in every if x["variant"] == "base"]
    flash = [x for x in rows if x["kernel"] in ("_fwd_kernel", "_bwd_kernel")]
    assert len(flash) == 2 * 3 * 3 * 2  # 2 targets x 3 dtypes x 3 head dims x (fwd, one bwd)
    tma = [x for x in rows if x["kernel"] in ("_fwd_kernel_tma", "_bwd_kernel_tma")]
    assert len(tma) == 2 * 2 * 3  # sm_90: (fwd, bwd) x fp16 / bf16 x 3 head dims
    for x in tma:  # the opt-in TMA kernels: their loop loads are TMA loads, and they do not spill
        assert int(x["tma"]) > 0 and int(x["spills"]) == 0 and int(x["stack"]) == 0, x
    probe = [x for x in rows if x["kernel"] in PROBE_KERNELS]
    assert {x["kernel"] for x in probe} == set(PROBE_KERNELS)
    assert {(x["cc"], x["dtype"], x["d"]) for x in probe} == {
        (cc, t, d) for cc in ("80", "90") for t in ("bf16", "fp16", "fp32")
        for d in ("64", "128", "256")}
    for x in probe:  # the sdpa engine's probe kernels and the column-score kernels
        if x["dtype"] in ("bf16", "fp16"):  # keys as the dots' M: wgmma however few the rows
            assert int(x["hgmma" if x["cc"] == "90" else "hmma"]) > 0, f"no MMA in {x}"
        if int(x["d"]) > 128 and (x["kernel"], x["dtype"] == "fp32") in (
                ("_probe_dk_kernel", False), ("_probe_fwd_kernel", True)):  # the fewest tried
            assert int(x["spills"]) <= 100, f"more spills than shipped in {x}"
        else:
            assert int(x["spills"]) == 0 and int(x["stack"]) == 0, f"spills in {x}"
    small = [x for x in rows if x["kernel"] in ("_probe_kernel", "_delta_kernel")]
    assert len(small) == 2 * 2 * 2 * 2  # 2 targets x 2 dtypes x 2 dims x (probe-from-lse, delta)
    for x in small:
        assert int(x["spills"]) == 0 and int(x["stack"]) == 0, f"spills in {x}"
    assert len(rows) == len(flash) + len(tma) + len(probe) + len(small)
    check_variants([x for x in every if x["variant"] != "base"])
    for x in flash:
        sixteen = x["dtype"] in ("bf16", "fp16")
        if x["cc"] == "90" and sixteen and int(x["d"]) <= 128:  # d = 256 takes mma.sync tiles
            assert int(x["hgmma"]) > 0, f"no HGMMA in {x}"
        if sixteen:
            assert int(x["hgmma"]) + int(x["hmma"]) > 0, f"no tensor-core instruction in {x}"
        # the fused engine: no stack and no spill instruction in any dtype, head dim or target,
        # at the specialisation the JIT makes for aligned inputs (issue 16)
        assert int(x["spills"]) == 0 and int(x["stack"]) == 0, f"spills in {x}"


def check_variants(rows):
    """The specialisations users reach (sm_90, d 64 / 128): a window, non-causal, a head dim padded
    to the next power of two, both, full-row probes: every kernel family in each, no stack and no
    spill anywhere, HGMMA in every 16-bit flash and probe kernel."""
    assert rows and {x["cc"] for x in rows} == {"90"}
    assert {x["variant"] for x in rows} == {"window", "noncausal", "odd_d", "window_odd_d",
                                            "full_rows"}
    kernels = {x["kernel"] for x in rows}
    assert {"_fwd_kernel", "_bwd_kernel", "_row_lse_kernel", "_col_sum_kernel",
            "_probe_kernel"} | set(PROBE_KERNELS[:3]) <= kernels, kernels
    for x in rows:
        assert int(x["d"]) <= 128
        assert int(x["spills"]) == 0 and int(x["stack"]) == 0, f"spills in {x}"
        if x["dtype"] != "fp32" and x["kernel"] not in ("_probe_kernel", "_delta_kernel"):
            assert int(x["hgmma"]) > 0, f"no HGMMA in {x}"
