"""A user's install: the wheel, in a fresh virtual environment with no checkout on its path.

Builds the wheel from this checkout, checks what it holds (``abft_fast.kernels``, the CUDA sources
the JIT needs, no top-level ``kernels``), installs it with its ``abft`` extra into a new venv (pins
from constraints.txt, the CPU build of torch) and, from a directory outside the checkout, runs the
op on every CPU backend against the float64 reference, the HF integration, the CLI and an example.
Needs the package registry (it installs); about two minutes on 2 cores.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SMOKE = r'''
import os, sys
import torch
import abft_fast
from abft_fast.ops.cuda_backend import csrc_dir
from abft_fast.ops.reference import attention_reference

here = os.path.dirname(abft_fast.__file__)
assert "site-packages" in here, here
assert not os.environ.get("PYTHONPATH")
assert all(not p or not os.path.samefile(p, CHECKOUT) for p in sys.path if os.path.isdir(p))
print("installed at", here, "seed", SEED)

g = torch.Generator().manual_seed(SEED)
B, Hq, Hkv, L, D = 2, 4, 2, 24, 16
q, k, v = (torch.randn(B, h, L, D, generator=g, dtype=torch.float64) for h in (Hq, Hkv, Hkv))
rows = torch.tensor([[L - 1, 3], [L - 2, -1]])
kpm = torch.ones(B, L, dtype=torch.bool); kpm[1, :5] = False
want_o, _, want_p = attention_reference(q, k, v, causal=True, key_padding_mask=kpm, probe_rows=rows)
for backend in ("torch", "triton"):
    o, p = abft_fast.attention(q.float(), k.float(), v.float(), key_padding_mask=kpm,
                               probe_rows=rows, backend=backend)
    err = max((o.double() - want_o).abs().max().item(), (p.double() - want_p).abs().max().item())
    print(backend, "max error vs float64", err)
    assert err < 1e-4, (backend, err)

cu = sorted(x.name for x in csrc_dir().iterdir() if x.suffix in (".cu", ".cuh", ".cpp"))
print("csrc", len(cu), "files at", csrc_dir())
assert "probes_fwd.cu" in cu and "binding.cpp" in cu and str(csrc_dir()).startswith(here)

import abft_fast.hf as ah
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(MODEL, attn_implementation="abft_fast")
ids = torch.randint(3, model.config.vocab_size, (1, 12), generator=g)
with ah.probe(model, rows=torch.tensor([[11]])) as rec:
    model(input_ids=ids)
print("hf probes", tuple(rec.probs.shape), "row sums", rec.probs.sum(-1).flatten().tolist())
assert torch.allclose(rec.probs.sum(-1), torch.ones(()), atol=1e-5)
print("smoke ok")
'''


def run(cmd, cwd, env=None, timeout=900):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(out), str(ROOT)], cwd=out)
    (whl,) = out.glob("abft_fast-*.whl")
    return whl


def test_wheel_holds_kernels_and_cuda_sources(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for f in ("abft_fast/kernels/attention.py", "abft_fast/kernels/probes.py",
              "abft_fast/kernels/column_scores.py", "abft_fast/csrc/probes_fwd.cu",
              "abft_fast/csrc/probes.cuh", "abft_fast/csrc/binding.cpp",
              "abft_fast/hf/__init__.py", "abft_fast/abft/cli.py"):
        assert f in names, f
    tops = {n.split("/")[0] for n in names}
    assert "kernels" not in tops and "csrc" not in tops and "tests" not in tops, tops
    meta = next(n for n in names if n.endswith("METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    for req in ("torch>=2.11", "transformers>=5.17", "triton>=3.6"):
        assert re.search(rf"Requires-Dist: {re.escape(req)}", text), req


def test_wheel_in_a_fresh_venv_runs_op_hf_cli_and_example(wheel, tmp_path):
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    py = str(venv / "bin" / "python")
    # the pins `make install` uses; torch first, as the CPU build (an unpinned torch is CUDA's)
    pins = [l for l in (ROOT / "constraints.txt").read_text().splitlines()
            if l and not l.startswith("#")]
    (tmp_path / "constraints.txt").write_text("\n".join(pins) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    torch_pin = next(p for p in pins if p.startswith("torch=="))
    run([py, "-m", "pip", "install", "-q", torch_pin], cwd=tmp_path, env=env)
    run([py, "-m", "pip", "install", "-q", "-c", "constraints.txt", f"{wheel}[abft]"],
        cwd=tmp_path, env=env)

    work = tmp_path / "user"  # outside the checkout: nothing of it on sys.path
    work.mkdir()
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from tokenizers_offline import save_tiny_llama
    finally:
        sys.path.pop(0)
    words = ("good bad great awful fine poor nice dull movie film plot acting story the a was is "
             "very not quite").split()
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(9)) for i in range(200)]
    model = save_tiny_llama(work / "tiny-llama", texts)
    env_run = dict(env, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    script = (SMOKE.replace("CHECKOUT", repr(str(ROOT))).replace("MODEL", repr(model))
              .replace("SEED", str(int.from_bytes(os.urandom(2), "little"))))
    (work / "smoke.py").write_text(script)
    out = run([py, "smoke.py"], cwd=work, env=env_run)
    assert "smoke ok" in out, out

    cli = str(venv / "bin" / "abft-fast")
    out = run([cli, "eval", "--model", model, "--dataset", "sst2", "--eval-queries", "4",
               "--backend", "torch", "--no-progress", "--out", str(work / "ev")], cwd=work,
              env=env_run)
    assert "accuracy" in out and (work / "ev" / "eval.json").exists(), out

    shutil.copy(ROOT / "examples" / "probe_attention_rows.py", work)
    out = run([py, "probe_attention_rows.py", "--layers", "1", "--length", "12", "--cols", "3"],
              cwd=work, env=env_run)
    assert "unused slot (-1) all zero: True" in out, out
