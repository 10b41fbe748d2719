"""CUDA C++ backend (csrc/, abft_fast/ops/cuda_backend.py).

Without a GPU: every .cu compiles with nvcc and binding.cpp against torch's CUDA headers; the
backend imports without building anything, logs one line when it builds and reports a failed
build clearly; and the very same kernel source runs on the CPU through csrc/emu (CUDA threads as
fibers, API-level WMMA) behind the real binding, checked against the float64 reference with the
DESIGN.md section 5 rule (outputs of the kernels poisoned with NaN, fresh random inputs): route
"probes", what backend="cuda" runs for every case (PyTorch SDPA through the torch backend for the
output + the CUDA probe kernels, with key padding, windows and Lq < Lk), also through its
torch.library ops (opcheck, torch.compile) and as the sdpa engine's probes where Triton cannot run;
and route "fused" (the old fused kernels, reachable only explicitly). With a GPU
(@pytest.mark.gpu): the JIT-built extension against the reference and against the Triton backend,
forward and backward, random shapes, fp32/fp16/bf16.
"""
import dataclasses
import hashlib
import importlib
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from cases import (
    Case,
    attention_fn,
    check_rel,
    check_rule,
    fresh_generator,
    make_inputs,
    reference,
    rel_err,
    run,
    spec_of,
)
from test_torch_backend import CASES

from abft_fast.ops import cuda_backend, cuda_ext, probes
from abft_fast.ops.reference import attention_reference

CSRC = cuda_ext.csrc_dir()
NVCC = shutil.which("nvcc")
CXX = shutil.which("c++") or shutil.which("g++")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_IDS = ["fp32", "fp16", "bf16"]
# GPU runs: outputs of the extension start as NaN (csrc/binding.cpp), so unwritten elements show.
os.environ.setdefault("ABFT_FAST_CUDA_POISON", "1")


def _fresh():
    return fresh_generator()  # its seeds appear in a failure report (conftest.py)


def _floor(dtype, gpu=False):
    if dtype == torch.float32:
        return 1e-5 if gpu else 1e-6
    return 1e-3


# --------------------------------------------------------------------------------------------
# build and import (no GPU needed)


def test_import_does_not_build(tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    env.pop("ABFT_FAST_CUDA_BUILD_DIR", None)
    code = ("import abft_fast, abft_fast.ops.cuda_backend, abft_fast.ops.cuda_ext as c\n"
            "assert c._ext is None and c._build_error is None\n"
            "print(c.build_directory())")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).parent == tmp_path / "abft_fast" / "cuda_ext"
    assert not (tmp_path / "abft_fast").exists(), "importing must not create the build directory"


def test_build_directory_follows_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("ABFT_FAST_CUDA_BUILD_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    d = cuda_ext.build_directory()
    assert d.parent == tmp_path / "abft_fast" / "cuda_ext"
    assert d.name.startswith("torch") and "-cu" in d.name
    monkeypatch.delenv("XDG_CACHE_HOME")
    home = Path(os.path.expanduser("~"))
    assert cuda_ext.build_directory().parent == home / ".cache" / "abft_fast" / "cuda_ext"
    monkeypatch.setenv("ABFT_FAST_CUDA_BUILD_DIR", str(tmp_path / "mine"))
    assert cuda_ext.build_directory() == tmp_path / "mine"


def test_jit_sources_are_shipped():
    for name in cuda_ext.JIT_SOURCES:
        assert (CSRC / name).is_file(), name


def _fake_sources(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for n in cuda_ext.JIT_SOURCES:
        (src / n).write_text("// stand-in\n")
    return src


def test_jit_build_logs_one_line_then_uses_the_cache(monkeypatch, tmp_path, caplog):
    """The first build logs one WARNING line naming the build directory; later loads of the same
    build (another process, same cache) log nothing at WARNING; a changed source builds again.
    torch's JIT loader is replaced by a stand-in that writes the library file."""
    from torch.utils import cpp_extension
    build = tmp_path / "build"
    monkeypatch.setenv("ABFT_FAST_CUDA_BUILD_DIR", str(build))
    src = _fake_sources(tmp_path)
    monkeypatch.setattr(cuda_ext, "csrc_dir", lambda: src)
    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "13.0")
    loads = []

    def fake_load(name, sources, build_directory, **kw):
        loads.append(name)
        (Path(build_directory) / f"{name}.so").write_bytes(b"")
        return "module"
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    caplog.set_level("DEBUG", logger="abft_fast")

    def warnings():
        return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert cuda_ext._jit_build() == "module"
    assert warnings() == [f"abft_fast: building the CUDA extension (first use; cached "
                          f"afterwards) in {build}"]
    caplog.clear()
    assert cuda_ext.is_cached(build, src)
    cuda_ext._jit_build()
    assert warnings() == [] and any("cached" in r.getMessage() for r in caplog.records)
    lib = build / f"{cuda_ext.EXTENSION_NAME}.so"
    os.utime(lib, (1, 1))  # older than the sources: a changed source
    assert not cuda_ext.is_cached(build, src)
    cuda_ext._jit_build()
    assert len(warnings()) == 1 and len(loads) == 3


@pytest.mark.skipif(torch.version.cuda is not None, reason="failure path of a CPU-only torch")
def test_failed_build_is_a_clear_runtime_error_raised_once(monkeypatch, tmp_path):
    monkeypatch.setattr(cuda_ext, "_ext", None)
    monkeypatch.setattr(cuda_ext, "_build_error", None)
    monkeypatch.setenv("ABFT_FAST_CUDA_BUILD_DIR", str(tmp_path / "build"))
    calls = []
    real = cuda_ext._jit_build

    def counting():
        calls.append(1)
        return real()
    monkeypatch.setattr(cuda_ext, "_jit_build", counting)
    for _ in range(2):
        with pytest.raises(RuntimeError, match=r"building the CUDA extension failed.*no CUDA"):
            cuda_ext.load_extension()
    assert calls == [1], "a failed build is remembered, not retried on every call"


def test_kernel_sources_do_not_include_torch():
    files = [p for p in CSRC.iterdir() if p.suffix in (".cu", ".cuh", ".h")]
    sources = {"attention_fwd.cu", "attention_bwd.cu", "probes_fwd.cu", "probes_bwd.cu"}
    assert sources <= {p.name for p in files}
    for p in files:
        hit = re.search(r'#include\s*[<"](torch|ATen|c10|pybind11)/', p.read_text())
        assert hit is None, f"{p.name} includes {hit.group(0)}: keep torch in binding.cpp"


def _cuda_include():
    from torch.utils import cpp_extension
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                 cpp_extension.CUDA_HOME, "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_runtime_api.h").is_file():
            return Path(root) / "include"
    return None


def _binding_check_cmd(tmp_path):
    """g++ -fsyntax-only of binding.cpp in its CUDA form, against torch's and CUDA's headers."""
    from torch.utils import cpp_extension
    incs = [Path(p) for p in cpp_extension.include_paths()]
    incs += [_cuda_include(), Path(sysconfig.get_paths()["include"])]
    macros = Path("c10/cuda/impl/cuda_cmake_macros.h")
    if not any((i / macros).is_file() for i in incs):
        # CPU wheels of torch lack this generated header; a CUDA build defines just this macro.
        (tmp_path / macros).parent.mkdir(parents=True)
        (tmp_path / macros).write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        incs.append(tmp_path)
    return [CXX, "-std=c++17", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=abft_check",
            *[f"-I{i}" for i in incs], str(CSRC / "binding.cpp")]


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
def test_sources_compile(tmp_path):
    """Every .cu with nvcc alone, like `make check-cuda` but for sm_80 only, and binding.cpp in
    its CUDA form (-fsyntax-only) against torch's CUDA headers; all in parallel."""
    jobs = {s.name: [NVCC, "-std=c++17", "-O3", "-c", str(s), "-o", str(tmp_path / f"{s.stem}.o"),
                     "-gencode", "arch=compute_80,code=sm_80"]
            for s in sorted(CSRC.glob("*.cu"))}
    assert {"attention_fwd.cu", "attention_bwd.cu", "probes_fwd.cu", "probes_bwd.cu"} <= set(jobs)
    if CXX is not None and _cuda_include() is not None:
        jobs["binding.cpp"] = _binding_check_cmd(tmp_path)
    procs = {n: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n, cmd in jobs.items()}
    failed = {}
    for n, p in procs.items():
        log = p.communicate(timeout=900)[0]
        if p.returncode != 0:
            errors = [ln for ln in log.splitlines() if "error" in ln]
            failed[n] = "\n".join(errors[:30]) or log[-6000:]
    assert not failed, "\n\n".join(f"{n}:\n{log}" for n, log in failed.items())
    for n in jobs:
        if n.endswith(".cu"):
            assert (tmp_path / f"{Path(n).stem}.o").stat().st_size > 0


# --------------------------------------------------------------------------------------------
# the kernels on the CPU, through the emulation (csrc/emu)


@pytest.fixture(scope="session")
def emu():
    """The kernels of csrc/ compiled for the CPU with csrc/emu, behind the real binding.cpp
    (a CPU torch extension; built once per version of the sources into the user cache, about a
    minute on 2 cores)."""
    if CXX is None:
        pytest.skip("no C++ compiler")
    if not (CSRC / "emu" / "attention_emu.cpp").is_file():
        pytest.skip(f"{CSRC}/emu is not there (installed without the emulation sources)")
    from torch.utils.cpp_extension import load
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    digest = hashlib.sha1()
    for f in sorted([*CSRC.glob("*.[ch]*"), *(CSRC / "emu").glob("*")]):
        if f.is_file():
            digest.update(f.name.encode() + f.read_bytes())
    tag = re.sub(r"[^\w.-]", "_", f"torch{torch.__version__}-{digest.hexdigest()[:12]}")
    build = Path(cache) / "abft_fast" / "cuda_emu" / tag  # one per source version: no clashes
    build.mkdir(parents=True, exist_ok=True)
    return load(name="abft_fast_cuda_emu",
                sources=[str(CSRC / "binding.cpp"), str(CSRC / "emu" / "attention_emu.cpp")],
                extra_cflags=["-O2", "-std=c++17", "-DABFT_EMULATION", "-pthread",
                              "-Wno-unknown-pragmas"],
                extra_ldflags=["-pthread"], build_directory=str(build))


def _emu_fn(ext, route="probes"):
    """abft_fast.attention's signature over the emulated extension; route "probes" (SDPA + the
    probe kernels: what backend="cuda" runs) or "fused" (the fused kernels)."""
    def fn(q, k, v, *, causal, scale, key_padding_mask, window, probe_rows, probe_cols):
        spec = spec_of(q, k, v, causal, scale, key_padding_mask, window, probe_rows, probe_cols)
        return cuda_backend.attention_with_extension(ext, q, k, v, spec, route=route)
    return fn


EMU_EXTRA = [
    Case(2, 6, 2, 150, 150, 32, window=40, padding="left", r=3, c=5),  # several tiles, both skips
    Case(2, 2, 1, 20, 12, 32, padding="right"),                        # Lq > Lk: empty first rows
    Case(1, 4, 1, 70, 70, 256, padding="random", r=2, c=None),         # D = 256, small tiles
    Case(2, 3, 3, 65, 130, 48, causal=False, r=2, c=4),                # non-causal, Lq < Lk
]


@pytest.mark.parametrize("case", CASES + EMU_EXTRA, ids=str)
def test_emulated_fp32_matches_reference(emu, case):
    inp = make_inputs(case, _fresh())
    ref = reference(case, inp)
    tor = run(attention_fn("torch"), case, inp, torch.float32)
    # the route of backend="cuda" (SDPA + the probe kernels) for masked and unmasked cases alike
    got = run(_emu_fn(emu), case, inp, torch.float32)
    check_rel(got, ref, 2e-4)
    check_rule(got, tor, ref, floor=_floor(torch.float32))


EMU_HALF = [
    Case(2, 4, 2, 37, 37, 64, padding="left"),
    Case(2, 6, 2, 70, 70, 32, window=9, padding="right", c=None),
    Case(2, 2, 1, 20, 20, 16, causal=False, padding="random"),
    Case(1, 2, 2, 9, 40, 128, padding="left", r=3, c=6),
]

# Masked cases of the probe route in every dtype: two query blocks of the torch backend's masked
# path (L > 128) with a window and GQA, Lq < Lk over several key chunks with full rows, Lq > Lk.
EMU_MASKED = EMU_HALF + [
    Case(2, 6, 2, 150, 150, 32, window=40, padding="left", r=3, c=5),
    Case(2, 4, 1, 20, 200, 48, padding="right", r=3, c=None),
    Case(2, 4, 2, 20, 12, 16, padding="random"),
]


@pytest.mark.parametrize("case", EMU_MASKED, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_emulated_masked_probe_route_rule(emu, case, dtype):
    """Key padding, windows, Lq != Lk through what backend="cuda" runs: the torch backend's
    block-wise SDPA for the output, the CUDA probe kernels for the probes."""
    inp = make_inputs(case, _fresh())
    ref = reference(case, inp)
    tor = run(attention_fn("torch"), case, inp, dtype)
    got = run(_emu_fn(emu), case, inp, dtype)
    if dtype == torch.float32:
        check_rel(got, ref, 2e-4)
    check_rule(got, tor, ref, floor=_floor(dtype))


@pytest.mark.parametrize("case", EMU_HALF, ids=str)
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=DT_IDS[1:])
def test_emulated_fused_half_rule(emu, case, dtype):
    """The fused kernels (route "fused", reachable explicitly only) in 16 bits."""
    inp = make_inputs(case, _fresh())
    ref = reference(case, inp)
    tor = run(attention_fn("torch"), case, inp, dtype)
    got = run(_emu_fn(emu, "fused"), case, inp, dtype)
    check_rule(got, tor, ref, floor=_floor(dtype))


@pytest.mark.parametrize("d", [16, 24, 32, 48, 64, 80, 96, 128, 160, 192, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_emulated_fused_head_dims(emu, d, dtype):
    case = Case(1, 2, 1, 33, 33, d, padding="right", r=2, c=4)
    inp = make_inputs(case, _fresh())
    ref = reference(case, inp)
    tor = run(attention_fn("torch"), case, inp, dtype)
    check_rule(run(_emu_fn(emu, "fused"), case, inp, dtype), tor, ref, floor=_floor(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_emulated_lse_and_empty_rows(emu, dtype):
    """lse is -inf exactly where no key is visible (there out = 0), else the reference's."""
    case = Case(2, 4, 2, 24, 24, 32, window=4, padding="left")
    inp = make_inputs(case, _fresh())
    inp["kpm"][0] = False       # batch 0: no visible key at all
    inp["kpm"][1, :10] = False  # batch 1: with window 4, rows < 10 see nothing
    q, k, v = (inp[n].to(dtype) for n in "qkv")
    out, lse = emu.fwd(q, k, v, inp["kpm"], True, 0.3, 4)
    ref_o, ref_lse, _ = attention_reference(inp["q"], inp["k"], inp["v"], scale=0.3,
                                            key_padding_mask=inp["kpm"], window=4)
    assert lse.dtype == torch.float32 and out.dtype == dtype
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert bool(torch.isinf(lse[0]).all()) and bool(torch.isinf(lse[1, :, :10]).all())
    assert torch.all(out[0] == 0) and torch.all(out[1, :, :10] == 0)
    fin = torch.isfinite(ref_lse)
    tol = 2e-6 if dtype == torch.float32 else 1e-2
    assert rel_err(lse.double()[fin], ref_lse[fin]) <= tol
    assert rel_err(out.double(), ref_o) <= (2e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("route", ["fused", "probes"])
def test_emulated_probe_only_loss_and_noncontiguous_inputs(emu, route):
    """Gradient only through probs (out unused), q/k/v as transposed views as HF passes them."""
    case = Case(2, 4, 2, 21, 21, 32, padding="left")
    inp = make_inputs(case, _fresh())
    q, k, v = (inp[n].float().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
               for n in "qkv")
    assert not q.is_contiguous()
    _, probs = _emu_fn(emu, route)(q, k, v, causal=True, scale=None, key_padding_mask=inp["kpm"],
                            window=None, probe_rows=inp["rows"], probe_cols=inp["cols"])
    dq, dk, dv = torch.autograd.grad((probs.double() * inp["dp"]).sum(), (q, k, v),
                                     allow_unused=True)  # route "probes": v is not in the graph
    dv = torch.zeros_like(v) if dv is None else dv
    q64, k64, v64 = (inp[n].clone().requires_grad_() for n in "qkv")
    _, _, p64 = attention_reference(q64, k64, v64, key_padding_mask=inp["kpm"],
                                    probe_rows=inp["rows"], probe_cols=inp["cols"])
    rq, rk = torch.autograd.grad((p64 * inp["dp"]).sum(), (q64, k64))
    assert rel_err(dq.double(), rq) < 2e-4 and rel_err(dk.double(), rk) < 2e-4
    assert torch.all(dv == 0), "probabilities do not depend on v"


def test_emulated_binding_rejects_bad_arguments(emu):
    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(RuntimeError, match="float32, float16 and bfloat16"):
        emu.fwd(q.double(), q.double(), q.double(), None, True, 0.25, 0)
    with pytest.raises(RuntimeError, match="head dims 1..256"):
        big = torch.randn(1, 1, 4, 300)
        emu.fwd(big, big, big, None, True, 0.1, 0)
    with pytest.raises(RuntimeError, match=r"key_padding_mask must have shape \[B, Lk\]"):
        emu.fwd(q, q, q, torch.ones(1, 4, dtype=torch.bool), True, 0.25, 0)
    with pytest.raises(RuntimeError, match="multiple of k/v heads"):
        emu.fwd(torch.randn(1, 3, 5, 16), q, q, None, True, 0.25, 0)
    with pytest.raises(RuntimeError, match="dq_extra must have shape"):
        out, lse = emu.fwd(q, q, q, None, True, 0.25, 0)
        emu.bwd(out, q, q, q, out, lse, None, None, torch.zeros(1, 2, 5, 8), None, True, 0.25, 0)
    with pytest.raises(ValueError, match="head dims up to 256"):
        big = torch.randn(1, 1, 4, 300)
        cuda_backend.attention_with_extension(emu, big, big, big, spec_of(big, big, big,
                                                                           scale=0.1))
    rows = torch.tensor([[4, -1]])
    with pytest.raises(RuntimeError, match="probe_rows must be int64"):
        emu.probe_fwd(q, q, rows.int(), None, None, True, 0.25, 0)
    with pytest.raises(RuntimeError, match=r"probe_rows must have shape \[B, n\]"):
        emu.probe_fwd(q, q, rows[0], None, None, True, 0.25, 0)
    with pytest.raises(RuntimeError, match="e must have shape"):
        lse, u = torch.zeros(1, 2, 2), torch.zeros(1, 2, 2)
        emu.probe_bwd(q, q, rows, lse, u, torch.zeros(1, 2, 2, 4), None, True, 0.25, 0)
    with pytest.raises(ValueError, match="route must be one of"):
        cuda_backend.attention_with_extension(emu, q, q, q, spec_of(q, q, q), route="auto")


@pytest.mark.parametrize("i", range(6))
@pytest.mark.parametrize("route", ["probes", "fused"])
def test_emulated_random_shapes(emu, route, i):
    seed = random.randrange(2**31)
    case = _random_case(seed, max_l=100)
    dtype = DTYPES[seed % 3]
    inp = make_inputs(case, _fresh())
    ref = reference(case, inp)
    tor = run(attention_fn("torch"), case, inp, dtype)
    got = run(_emu_fn(emu, route), case, inp, dtype)
    try:
        check_rule(got, tor, ref, floor=_floor(dtype))
    except AssertionError as e:
        raise AssertionError(f"{case} {dtype} (shape seed {seed}): {e}") from None


# --------------------------------------------------------------------------------------------
# the probe kernels (csrc/probes.cuh) on the CPU: route "probes" = SDPA output + probe kernels

PROBE_CASES = [
    Case(2, 8, 2, 40, 40, 32, r=5, c=7),                  # GQA, G x R = 20 rows: two row tiles
    Case(1, 2, 1, 40, 200, 32, r=3, c=None),              # causal Lq < Lk, full rows, 4 key chunks
    Case(2, 3, 3, 33, 90, 48, causal=False, r=2, c=4),    # non-causal, Lq < Lk, D = 48
    Case(2, 4, 1, 70, 70, 64, r=4, c=None, scale=0.3),    # MQA, full rows, custom scale
    Case(1, 2, 2, 1, 1, 16, r=1, c=1, unused=False),      # L = 1
    Case(2, 2, 1, 19, 19, 16, r=0, c=2),                  # empty probe set
    Case(2, 2, 1, 21, 21, 16, r=2, c=0),                  # empty columns
    Case(1, 2, 1, 30, 30, 16, r=None),                    # no probes: SDPA alone
    Case(2, 4, 2, 50, 50, 32, window=9, padding="left", r=3, c=5),  # masks (the kernels take them)
    Case(1, 2, 1, 30, 30, 256, r=2, c=6),                 # D = 256
]


@pytest.mark.parametrize("case", PROBE_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_emulated_probe_kernels_match_reference(emu, case, dtype):
    inp = make_inputs(case, _fresh())
    ref = reference(case, inp)
    tor = run(attention_fn("torch"), case, inp, dtype)
    got = run(_emu_fn(emu, "probes"), case, inp, dtype)
    if dtype == torch.float32:
        check_rel(got, ref, 2e-4)
    check_rule(got, tor, ref, floor=_floor(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("full_rows", [False, True], ids=["cols", "full"])
def test_emulated_probe_fwd_lse_empty_rows_and_unused_slots(emu, dtype, full_rows):
    """probe_fwd straight from the binding (its outputs start as NaN in the emulation build):
    lse is -inf exactly on unused slots and rows that see no key, whose probabilities are 0."""
    case = Case(2, 4, 2, 30, 150, 32, padding="left", r=4, c=None if full_rows else 6)
    inp = make_inputs(case, _fresh())
    inp["kpm"][0] = False  # batch 0: no key visible at all
    rows, cols = inp["rows"], inp["cols"]
    assert bool((rows[:, -1] == -1).all())
    q, k = (inp[n].to(dtype) for n in "qk")
    probs, lse = emu.probe_fwd(q, k, rows, cols, inp["kpm"], True, 0.3, 0)
    _, ref_lse, ref_p = attention_reference(inp["q"], inp["k"], inp["v"], scale=0.3,
                                            key_padding_mask=inp["kpm"], probe_rows=rows,
                                            probe_cols=cols)
    b, hq = ref_lse.shape[:2]
    ref_lse = torch.gather(ref_lse, 2, rows.clamp(min=0)[:, None, :].expand(b, hq, -1))
    ref_lse = torch.where((rows >= 0)[:, None, :], ref_lse, float("-inf"))
    assert probs.dtype == lse.dtype == torch.float32
    assert probs.shape == ref_p.shape and lse.shape == ref_lse.shape
    assert not probs.isnan().any() and not lse.isnan().any()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert bool(torch.isinf(lse[0]).all()) and bool(torch.isinf(lse[:, :, -1]).all())
    assert torch.all(probs[0] == 0) and torch.all(probs[:, :, -1] == 0)
    fin = torch.isfinite(ref_lse)
    tol = 2e-6 if dtype == torch.float32 else 1e-2
    assert rel_err(lse.double()[fin], ref_lse[fin]) <= tol
    assert rel_err(probs.double(), ref_p) <= (2e-6 if dtype == torch.float32 else 1e-2)
    if full_rows:  # the rows that see a key sum to 1
        torch.testing.assert_close(probs.sum(-1)[fin].double(), torch.ones_like(ref_lse[fin]),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_emulated_probe_bwd_matches_reference(emu, dtype):
    """probe_bwd from the binding: dq of the probe rows and dk against float64 autograd of the
    probe loss alone; 0 on unused slots and rows that see no key (outputs start as NaN)."""
    case = Case(2, 6, 2, 24, 140, 32, padding="right", r=4, c=5)
    inp = make_inputs(case, _fresh())
    inp["kpm"][1] = False  # batch 1 sees nothing
    rows, cols, kpm = inp["rows"], inp["cols"], inp["kpm"]
    q, k = (inp[n].to(dtype) for n in "qk")
    probs, lse = emu.probe_fwd(q, k, rows, cols, kpm, True, 0.2, 0)
    g = inp["dp"].float()
    dq, dk = cuda_backend._probe_backward(emu, g, q, k, probs, lse, kpm, rows, cols, True, 0.2,
                                          0)
    q64, k64 = (inp[n].clone().requires_grad_() for n in "qk")
    _, _, p64 = attention_reference(q64, k64, inp["v"], scale=0.2, key_padding_mask=kpm,
                                    probe_rows=rows, probe_cols=cols)
    rq, rk = torch.autograd.grad((p64 * inp["dp"]).sum(), (q64, k64))
    assert dq.dtype == dtype and dk.dtype == dtype
    assert torch.all(dq[1] == 0) and torch.all(dk[1] == 0)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(dq.double(), rq) <= tol and rel_err(dk.double(), rk) <= tol
    ds = probs * g
    dq_rows, dk2 = emu.probe_bwd(q, k, rows, lse, ds.sum(-1), torch.zeros(*ds.shape[:3], 140),
                                 kpm, True, 0.2, 0)
    assert dq_rows.dtype == torch.float32 and dq_rows.shape == (2, 6, 4, 32)
    assert torch.all(dq_rows[:, :, -1] == 0) and torch.all(dq_rows[1] == 0)  # unused, empty rows
    assert not dk2.isnan().any()


@pytest.mark.parametrize("d", [24, 80, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_emulated_probe_kernels_head_dims(emu, d, dtype):
    case = Case(1, 4, 2, 33, 33, d, r=3, c=None)
    inp = make_inputs(case, _fresh())
    ref = reference(case, inp)
    tor = run(attention_fn("torch"), case, inp, dtype)
    check_rule(run(_emu_fn(emu, "probes"), case, inp, dtype), tor, ref, floor=_floor(dtype))


def _count_calls(monkeypatch, owner, name) -> list:
    """Wrap ``owner.name`` so that every call appends 1 to the returned list (and still runs)."""
    calls, real = [], getattr(owner, name)

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)
    monkeypatch.setattr(owner, name, spy)
    return calls


def test_emulated_backend_routes(emu, monkeypatch):
    """cuda_backend.attention (the extension swapped for the emulated one): unmasked and masked
    calls alike take the torch backend's SDPA output + the CUDA probe op, never the fused kernels;
    the same numbers as the explicit route "probes"."""
    monkeypatch.setattr(cuda_ext, "_ext", emu)
    calls = _count_calls(monkeypatch, cuda_backend.fused, "attention")
    for case in [Case(2, 4, 2, 26, 40, 32, r=3, c=4),
                 Case(2, 4, 2, 26, 26, 32, padding="left", r=3, c=4),
                 Case(2, 4, 2, 30, 30, 32, window=5, r=3, c=None),
                 Case(1, 2, 1, 10, 33, 16, padding="right", r=2, c=4)]:
        inp = make_inputs(case, _fresh())
        got = run(_spec_fn(cuda_backend.attention), case, inp, torch.float32)
        assert calls == []
        want = run(_emu_fn(emu, "probes"), case, inp, torch.float32)
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_emulated_fully_masked_rows_and_unused_slots_give_zero(emu, monkeypatch, dtype):
    """backend="cuda"'s route with rows that see no key (batch 0: every key padded; batch 1: left
    padding under a window of 4, rows < 12 see nothing) and -1 probe slots: out, probs and the
    gradients of those rows are 0, nothing is NaN, the rest matches the reference."""
    monkeypatch.setattr(cuda_ext, "_ext", emu)
    case = Case(2, 4, 2, 40, 40, 32, window=4, padding="left", r=4, c=6)
    inp = make_inputs(case, _fresh())
    inp["kpm"][0] = False
    inp["kpm"][1] = True
    inp["kpm"][1, :12] = False
    inp["rows"][1, 1] = 5  # a probe row that sees no key
    assert bool((inp["rows"][:, -1] == -1).all())
    q, k, v = (inp[n].to(dtype).requires_grad_() for n in "qkv")
    out, probs = _spec_fn(cuda_backend.attention)(
        q, k, v, causal=True, scale=None, key_padding_mask=inp["kpm"], window=4,
        probe_rows=inp["rows"], probe_cols=inp["cols"])
    ((out.double() * inp["do"]).sum() + (probs.double() * inp["dp"]).sum()).backward()
    for t in (out, probs, q.grad, k.grad, v.grad):
        assert not t.isnan().any()
    assert torch.all(out[0] == 0) and torch.all(out[1, :, :12] == 0)
    assert torch.all(probs[0] == 0) and torch.all(probs[:, :, -1] == 0)
    assert torch.all(probs[1, :, 1] == 0)
    assert torch.all(q.grad[0] == 0) and torch.all(q.grad[1, :, :12] == 0)
    assert torch.all(k.grad[0] == 0) and torch.all(v.grad[0] == 0)
    ref = reference(case, inp)
    tor = run(attention_fn("torch"), case, inp, dtype)
    got = {"out": out, "probs": probs, "dq": q.grad, "dk": k.grad, "dv": v.grad}
    check_rule({n: t.detach().double() for n, t in got.items()}, tor, ref, floor=_floor(dtype))


@pytest.mark.parametrize("case", [Case(2, 6, 2, 40, 40, 32, window=7, padding="left", r=3, c=5),
                                  Case(1, 4, 1, 12, 30, 16, r=2, c=None)], ids=str)
def test_emulated_gqa_kv_expansion(emu, monkeypatch, case):
    """Where no fused SDPA kernel takes a masked GQA call (decided on a GPU only), ``output``
    repeats k / v to the query heads: same results, gradients summed back over the group."""
    inp = make_inputs(case, _fresh())
    ref = reference(case, inp)
    tor = run(attention_fn("torch"), case, inp, torch.float32)
    seen = []
    real = cuda_backend.torch_backend.output

    def spy(q, k, v, spec):
        seen.append((k.shape[1], spec.kv_heads))
        return real(q, k, v, spec)
    monkeypatch.setattr(cuda_backend.torch_backend, "output", spy)
    plain = run(_emu_fn(emu), case, inp, torch.float32)
    assert seen == [(case.hkv, case.hkv)]
    monkeypatch.setattr(cuda_backend, "expands_kv", lambda q, k, v, spec: True)
    got = run(_emu_fn(emu), case, inp, torch.float32)
    assert seen[1] == (case.hq, case.hq)
    check_rel(got, ref, 2e-4)
    check_rule(got, tor, ref, floor=_floor(torch.float32))
    for n in got:
        torch.testing.assert_close(got[n], plain[n], rtol=1e-5, atol=1e-6)


def test_emulated_masked_route_compiles_fullgraph(emu, monkeypatch):
    """backend="cuda" on a masked GQA call (key padding + window) under
    torch.compile(fullgraph=True): the torch backend's block path and the probe op trace as one
    graph, forward and backward equal to eager."""
    monkeypatch.setattr(cuda_ext, "_ext", emu)
    case = Case(2, 4, 2, 24, 24, 16, window=6, padding="left", r=3, c=4)
    inp = make_inputs(case, _fresh())
    fn = _spec_fn(cuda_backend.attention)
    want = run(fn, case, inp, torch.float32)
    torch._dynamo.reset()
    got = run(torch.compile(fn, fullgraph=True, backend="aot_eager"), case, inp, torch.float32)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6)


def test_expands_kv_only_for_masked_gqa_on_a_gpu(monkeypatch):
    """The rule itself on CPU tensors: never on a CPU, never for MHA or unmasked calls; the
    PyTorch kernel check is not even asked (it is, on CUDA tensors, once per configuration)."""
    asked = []
    monkeypatch.setattr(cuda_backend, "_fused_sdpa_takes", lambda *a, **kw: asked.append(1))
    q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
    kpm = torch.ones(1, 8, dtype=torch.bool)
    for qq, kk, mask in [(q, k, kpm), (q, q, kpm), (q, k, None)]:
        assert not cuda_backend.expands_kv(qq, kk, kk, spec_of(qq, kk, kk, key_padding_mask=mask))
    assert asked == []
    monkeypatch.undo()
    # the PyTorch check itself runs on CPU tensors without raising (its answer is for CUDA)
    assert cuda_backend._fused_sdpa_takes(q[:, :, :1], k[:, :, :1], k[:, :, :1], gqa=True) in (
        True, False)


def _spec_fn(backend_attention):
    def fn(q, k, v, *, causal, scale, key_padding_mask, window, probe_rows, probe_cols):
        spec = spec_of(q, k, v, causal, scale, key_padding_mask, window, probe_rows, probe_cols)
        return backend_attention(q, k, v, spec)
    return fn


def test_emulated_probe_ops_opcheck_and_compile(emu, monkeypatch):
    """The torch.library probe ops: schema, fake tensors, autograd registration (opcheck), and
    torch.compile(fullgraph=True) through them, forward and backward."""
    monkeypatch.setattr(cuda_ext, "_ext", emu)
    g = _fresh()
    q = torch.randn(1, 4, 20, 16, generator=g, requires_grad=True)
    k = torch.randn(1, 2, 28, 16, generator=g, requires_grad=True)
    rows, cols = torch.tensor([[19, 3, -1]]), torch.tensor([[0, 27, -1, 5]])
    for c in (cols, None):
        torch.library.opcheck(probes.cuda_probe_rows_op, (q, k, None, rows, c, True, 0.25, 0))
    probs, lse = probes.cuda_probe_rows_op(q, k, None, rows, cols, True, 0.25, 0)
    dp = torch.randn(probs.shape, generator=g)
    torch.library.opcheck(probes.cuda_probe_rows_op.backward_op,
                          (dp, q.detach(), k.detach(), probs.detach(), lse.detach(), None, rows,
                           cols, True, 0.25, 0))

    def loss(q, k):
        p, _ = probes.cuda_probe_rows_op(q, k, None, rows, cols, True, 0.25, 0)
        return (p * dp).sum()
    want = torch.autograd.grad(loss(q, k), (q, k))
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k), (q, k))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------------
# the sdpa engine's probes where Triton cannot run


def _without_triton_probes(monkeypatch):
    monkeypatch.setattr(probes, "PROVIDERS", tuple(p for p in probes.PROVIDERS
                                                   if p.name != "triton"))


def _engine(q, spec) -> str:
    return probes.choose(q, spec).name


def test_sdpa_probe_engine_selection(monkeypatch):
    """Triton where it runs; else the CUDA probe kernels on CUDA tensors (fp16 / bf16 / fp32,
    D <= 256) when the extension loads; else the torch probe path. No build is attempted for
    CPU tensors. (The CUDA answer is checked with availability patched, not by running CUDA.)"""
    from abft_fast.ops import available
    loads = []

    def loads_ok():
        loads.append(1)
        return True
    monkeypatch.setattr(cuda_ext, "extension_loads", loads_ok)
    q = torch.randn(1, 2, 4, 16)
    spec = spec_of(q, q, q, probe_rows=torch.tensor([[3]]))
    always = dataclasses.replace(probes.TRITON, why_not=lambda q, spec: "")
    monkeypatch.setattr(probes, "PROVIDERS", (always,) + probes.PROVIDERS[1:])
    assert probes.choose(q, spec).name == "triton"
    _without_triton_probes(monkeypatch)
    assert probes.choose(q, spec).name == "torch"  # CPU tensors: real availability check
    assert loads == []
    monkeypatch.setattr(available, "cuda_ext_available", lambda dev: (True, ""))
    assert _engine(q, spec) == "cuda" and loads == [1]
    assert _engine(q.half(), spec) == "cuda"
    assert _engine(q.double(), spec) == "torch"
    big = torch.randn(1, 2, 4, 300)
    assert _engine(big, spec_of(big, big, big)) == "torch"
    monkeypatch.setattr(cuda_ext, "extension_loads", lambda: False)  # a failed build
    assert _engine(q, spec) == "torch"


@pytest.mark.skipif(torch.version.cuda is not None, reason="failure path of a CPU-only torch")
def test_extension_loads_is_false_once_a_build_failed(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(cuda_ext, "_ext", None)
    monkeypatch.setattr(cuda_ext, "_build_error", None)
    monkeypatch.setenv("ABFT_FAST_CUDA_BUILD_DIR", str(tmp_path / "build"))
    caplog.set_level("WARNING", logger="abft_fast")
    assert cuda_ext.extension_loads() is False
    assert cuda_ext.extension_loads() is False
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "building the CUDA extension failed" in msgs[0]


@pytest.mark.parametrize("case", [Case(2, 6, 2, 40, 40, 32, r=3, c=5),
                                  Case(1, 4, 1, 12, 70, 64, r=2, c=None)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_emulated_sdpa_engine_with_cuda_probe_kernels(emu, monkeypatch, case, dtype):
    """backend="sdpa" with Triton unusable and the (emulated) CUDA extension available: the
    probes come from the CUDA probe op, within the rule of the float64 reference."""
    from abft_fast.ops import available
    monkeypatch.setattr(cuda_ext, "_ext", emu)
    monkeypatch.setattr(available, "cuda_ext_available", lambda dev: (True, ""))
    calls = []

    def spy(q, k, spec):
        calls.append(1)
        return probes.CUDA.run(q, k, spec)
    monkeypatch.setattr(probes, "PROVIDERS",
                        (dataclasses.replace(probes.CUDA, run=spy), probes.TORCH))
    inp = make_inputs(case, _fresh())
    ref = reference(case, inp)
    tor = run(attention_fn("torch"), case, inp, dtype)
    got = run(attention_fn("sdpa"), case, inp, dtype)
    assert calls == [1]
    if dtype == torch.float32:
        check_rel(got, ref, 2e-4)
    check_rule(got, tor, ref, floor=_floor(dtype))


# --------------------------------------------------------------------------------------------
# GPU


def _random_case(seed, max_l=2100):
    """A random Case: key lengths 8..max_l (short, medium or long), head dims 16..256.

    Not degenerate on purpose: when every row sees a single key (L <= 2, window 1), dq and dk are
    exactly 0 in float64 and in the torch backend, while a fused backend (Triton too) keeps a
    rounding-level residual of the probe gradient (fp32 direct term minus the same term through the
    16-bit dS), which a relative error cannot judge. Fixed cases above cover L = 1 and window = 1.
    """
    rnd = random.Random(seed)
    hkv = rnd.choice([1, 2, 4])
    short, mid = max(9, max_l // 32), max(10, max_l // 3)
    lk = rnd.choice([rnd.randint(8, short), rnd.randint(short, mid), rnd.randint(mid, max_l)])
    causal = rnd.random() < 0.7
    return Case(
        b=rnd.randint(1, 3), hq=hkv * rnd.choice([1, 2, 3, 4]), hkv=hkv,
        lq=rnd.randint(1, lk) if causal and rnd.random() < 0.3 else lk, lk=lk,
        d=rnd.choice([16, 32, 48, 64, 80, 96, 128, 160, 192, 256]), causal=causal,
        window=rnd.choice([None, None, rnd.randint(4, lk)]) if causal else None,
        padding=rnd.choice([None, "left", "right", "random"]),
        r=rnd.choice([None, 0, 1, 4]), c=rnd.choice([None, 1, 16, 64]),
        unused=rnd.random() < 0.5, scale=rnd.choice([None, None, 0.1, 0.3]))


def _on_cuda(inp):
    return {n: (t.cuda() if isinstance(t, torch.Tensor) else t) for n, t in inp.items()}


@pytest.mark.gpu
@pytest.mark.parametrize("i", range(8))
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_cuda_gpu_random_shapes_match_reference(i, dtype):
    seed = random.randrange(2**31)
    case = _random_case(seed)
    inp = _on_cuda(make_inputs(case, _fresh()))
    ref = reference(case, inp)
    tor = run(attention_fn("torch"), case, inp, dtype)
    got = run(attention_fn("cuda"), case, inp, dtype)
    try:
        check_rule(got, tor, ref, floor=_floor(dtype, gpu=True))
    except AssertionError as e:
        raise AssertionError(f"{case} (shape seed {seed}): {e}") from None


@pytest.mark.gpu
@pytest.mark.parametrize("i", range(4))
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_cuda_gpu_unmasked_probe_route_matches_reference(i, dtype):
    """Unmasked random cases (SDPA + the CUDA probe kernels), long ones included."""
    seed = random.randrange(2**31)
    case = dataclasses.replace(_random_case(seed), padding=None, window=None)
    inp = _on_cuda(make_inputs(case, _fresh()))
    ref = reference(case, inp)
    tor = run(attention_fn("torch"), case, inp, dtype)
    got = run(attention_fn("cuda"), case, inp, dtype)
    try:
        check_rule(got, tor, ref, floor=_floor(dtype, gpu=True))
    except AssertionError as e:
        raise AssertionError(f"{case} (shape seed {seed}): {e}") from None


@pytest.mark.gpu
@pytest.mark.parametrize("i", range(4))
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_cuda_gpu_matches_triton(i, dtype):
    """Both fused backends within the rule of the reference, and within 4x the torch backend's
    rounding error of each other (out, probs, dq, dk, dv)."""
    seed = random.randrange(2**31)
    case = _random_case(seed)
    inp = _on_cuda(make_inputs(case, _fresh()))
    ref = reference(case, inp)
    tor = run(attention_fn("torch"), case, inp, dtype)
    cu = run(attention_fn("cuda"), case, inp, dtype)
    tri = run(attention_fn("triton"), case, inp, dtype)
    floor = _floor(dtype, gpu=True)
    for n in ref:
        e_t = rel_err(tor[n], ref[n])
        e_ct = float((cu[n] - tri[n]).norm() / ref[n].norm()) if ref[n].norm() > 0 else \
            float((cu[n] - tri[n]).norm())
        assert e_ct <= 4 * e_t + floor, (f"{case} (shape seed {seed}) {n}: cuda vs triton "
                                         f"{e_ct:.3g} > 4 x torch {e_t:.3g} + {floor}")
    check_rule(cu, tor, ref, floor)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_cuda_gpu_lse_matches_reference_and_triton(dtype):
    from abft_fast.ops import triton_backend
    case = Case(2, 8, 2, 333, 333, 64, window=100, padding="left")
    inp = _on_cuda(make_inputs(case, _fresh()))
    inp["kpm"][0, :200] = False  # rows < 200 of batch 0 see no key
    q, k, v = (inp[n].to(dtype) for n in "qkv")
    _, lse = cuda_ext.load_extension().fwd(q, k, v, inp["kpm"], True, 0.125, 100)
    _, lse_ref, _ = attention_reference(inp["q"], inp["k"], inp["v"], scale=0.125,
                                        key_padding_mask=inp["kpm"], window=100)
    _, lse_tri, _ = triton_backend.attention(
        q, k, v, spec_of(q, k, v, True, 0.125, inp["kpm"], 100), return_lse=True)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_tri))
    fin = torch.isfinite(lse_ref)
    tol = 2e-6 if dtype == torch.float32 else 1e-2
    assert rel_err(lse.double()[fin], lse_ref[fin]) <= tol
    assert rel_err(lse.double()[fin], lse_tri.double()[fin]) <= tol


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_cuda_gpu_fully_masked_rows_and_noncontiguous(dtype):
    b, h, l, d = 2, 2, 40, 64
    q, k, v = (torch.randn(b, l, h, d, device="cuda", dtype=dtype).transpose(1, 2)
               .requires_grad_() for _ in range(3))
    kpm = torch.zeros(b, l, dtype=torch.bool, device="cuda")
    kpm[1, 25:] = True
    rows = torch.tensor([[0, 39], [3, 39]], device="cuda")
    out, probs = cuda_backend.attention(q, k, v, spec_of(q, k, v, key_padding_mask=kpm,
                                                         probe_rows=rows))
    assert torch.all(out[0] == 0) and torch.all(out[1, :, :25] == 0)
    assert torch.all(probs[0] == 0) and torch.all(probs[1, :, 0] == 0)
    torch.testing.assert_close(probs[1, :, 1].sum(-1), torch.ones(h, device="cuda"))
    (out.float().sum() + probs.sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()


@pytest.mark.gpu
def test_cuda_gpu_large_logits_fp16():
    g = torch.Generator().manual_seed(11)
    q = (torch.randn(1, 2, 300, 64, generator=g) * 25).half().cuda()
    k = (torch.randn(1, 2, 300, 64, generator=g) * 25).half().cuda()
    v = torch.randn(1, 2, 300, 64, generator=g).half().cuda()
    rows = torch.tensor([[299, 3]], device="cuda")
    out, probs = cuda_backend.attention(q, k, v, spec_of(q, k, v, scale=0.125, probe_rows=rows))
    ref_o, _, ref_p = attention_reference(q.double(), k.double(), v.double(), scale=0.125,
                                          probe_rows=rows)
    assert torch.isfinite(out).all() and torch.isfinite(probs).all()
    assert rel_err(probs.double(), ref_p) < 1e-2 and rel_err(out.double(), ref_o) < 1e-2


@pytest.mark.gpu
def test_cuda_gpu_auto_skips_the_fused_cuda_kernels_when_triton_is_unusable(monkeypatch):
    """Padding with Triton unusable: auto goes to torch, not to the fused CUDA kernels (measured
    slower than the torch backend, bench/results/summary.md)."""
    import abft_fast
    api = importlib.import_module("abft_fast.ops.attention")  # the module, not the function
    monkeypatch.setattr(api, "_broken", {})
    monkeypatch.setattr(importlib.import_module("abft_fast.ops.available"), "triton_available",
                        lambda dev: (False, "Triton disabled by the test"))
    calls = _count_calls(monkeypatch, cuda_backend, "attention")
    q, k, v = (torch.randn(2, 4, 50, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    kpm = torch.ones(2, 50, dtype=torch.bool, device="cuda")
    kpm[0, :7] = False  # padding: auto's engine order is triton, torch
    with pytest.warns(RuntimeWarning, match="not using 'triton'.*disabled by the test"):
        out, _ = abft_fast.attention(q, k, v, key_padding_mask=kpm, backend="auto")
    assert calls == []
    ref, _ = abft_fast.attention(q, k, v, key_padding_mask=kpm, backend="torch")
    assert rel_err(out.double(), ref.double()) < 5e-3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_cuda_gpu_sdpa_engine_without_triton_uses_cuda_probe_kernels(monkeypatch, dtype):
    """backend="sdpa" with Triton unusable: the probes come from the CUDA probe kernels (built
    on first use), within the rule of the float64 reference."""
    _without_triton_probes(monkeypatch)
    case = Case(2, 8, 2, 300, 300, 64, r=4, c=16)
    inp = _on_cuda(make_inputs(case, _fresh()))
    q = inp["q"].to(dtype)
    assert _engine(q, spec_of(q, q, q)) == "cuda"
    ref = reference(case, inp)
    tor = run(attention_fn("torch"), case, inp, dtype)
    got = run(attention_fn("sdpa"), case, inp, dtype)
    check_rule(got, tor, ref, floor=_floor(dtype, gpu=True))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=DT_IDS[1:])
def test_cuda_gpu_masked_gqa_matches_reference_whether_or_not_kv_is_expanded(monkeypatch, dtype):
    """Masked GQA on the GPU: PyTorch's own kernel check decides the k / v expansion; both ways
    give the reference's numbers within the rule."""
    case = Case(2, 8, 2, 700, 700, 128, window=200, padding="left", r=4, c=32)
    inp = _on_cuda(make_inputs(case, _fresh()))
    ref = reference(case, inp)
    tor = run(attention_fn("torch"), case, inp, dtype)
    for forced in (None, True, False):
        if forced is not None:
            monkeypatch.setattr(cuda_backend, "expands_kv", lambda *a, f=forced: f)
        got = run(attention_fn("cuda"), case, inp, dtype)
        check_rule(got, tor, ref, floor=_floor(dtype, gpu=True))
