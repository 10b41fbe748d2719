"""FSDP2 with default resharding and a loss on probes alone: the same q/k gradients and weights as
one process (torchrun, 2 gloo processes on the CPU; tests/hf/fsdp_worker.py), for full forward and
early stop, with and without gradient checkpointing, for 4-layer and 1-layer models, with every
decoder layer's weights sharded between forward and backward. Without the integration's FSDP
handling the same runs fail (freed weights met in backward, or no gradient at all)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

WORKER = Path(__file__).with_name("fsdp_worker.py")
ROOT = Path(__file__).resolve().parents[2]
CASES = [(layers, stop, ckpt) for layers in (4, 1) for stop in (False, True)
         for ckpt in (False, True)]
IDS = [f"L{layers}-{'stop' if stop else 'full'}-{'ckpt' if ckpt else 'nockpt'}"
       for layers, stop, ckpt in CASES]


def _run(out, *flags, procs=2):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if "--cuda" not in flags:
        env["TRITON_INTERPRET"] = "1"
    if procs:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(procs), str(WORKER), str(out), *flags]  # --standalone: a free port
    else:
        cmd = [sys.executable, str(WORKER), str(out), "--reference", *flags]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if procs and r.returncode != 0 and "terminate called without an active exception" in r.stderr:
        # Seen once in CI under load (2 cores, two test legs): a gloo process aborted in C++
        # with no Python error and no result written. One retry; a second abort, any Python
        # error and every result mismatch still fail.
        print(f"fsdp worker aborted in gloo (exit {r.returncode}); retrying once:\n"
              f"{r.stderr[-1500:]}")
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp")
    return {"one": _run(d / "one.pt", procs=0), "fsdp": _run(d / "fsdp.pt"),
            "off": _run(d / "off.pt", "--off")}


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fsdp2_equals_one_process(runs, case):
    one, got = runs["one"][case], runs["fsdp"][case]
    assert "error" not in got, got["error"]
    assert got["missing"] == [], f"no gradient for {got['missing']}"
    assert set(got["grads"]) == set(one["grads"]) and len(one["grads"]) == 2 * case[0]
    for n, g in one["grads"].items():
        assert _rel(got["grads"][n], g) < 1e-5, n
    for n, w in one["weights"].items():  # after 2 Adam steps
        assert (got["weights"][n] - w).abs().max() < 1e-4, n
    assert got["sharded_between"], "a decoder layer kept full weights between forward and backward"
    assert got["all_dtensor_after"]


def test_without_the_integration_fsdp_fails(runs):
    off = runs["off"]
    full_4 = off[(4, False, False)]  # freed weights met in backward
    assert "error" in full_4 and "setStorage" in full_4["error"], full_4
    one_layer = off[(1, False, False)]  # one unit: never reduce-scattered, silently
    assert "error" not in one_layer and one_layer["missing"], one_layer


@pytest.mark.gpu
def test_fsdp2_world_size_one_on_a_gpu(tmp_path):
    """One GPU, NCCL, world size 1 (the issue's GPU check): every case trains (all q/k gradients
    present) and equals the unsharded run on the same GPU (TF32-free fp32; tolerance as above)."""
    if not dist.is_nccl_available():
        pytest.skip("NCCL is not available")
    one = _run(tmp_path / "one.pt", "--cuda", procs=0)
    got_all = _run(tmp_path / "fsdp.pt", "--cuda", procs=1)
    for case in CASES:
        got = got_all[case]
        assert "error" not in got, (case, got["error"])
        assert got["missing"] == [], (case, got["missing"])
        for n, g in one[case]["grads"].items():
            assert _rel(got["grads"][n], g) < 1e-5, (case, n)
        assert got["sharded_between"] and got["all_dtensor_after"], case
