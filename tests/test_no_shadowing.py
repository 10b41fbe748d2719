"""Nothing in the checkout shadows an installed package (issue 25).

transformers >= 5.25 imports HuggingFace's ``kernels`` package; with the checkout root first on
sys.path (``python -m pytest``, ``python -c`` from the root, pytest's rootdir conftest) a regular
top-level ``kernels`` package of ours would be imported in its place. Each test runs a command the
way a user types it, from the checkout root, in a fresh process.

A stand-in ``kernels`` package placed on sys.path *after* the checkout root (PYTHONPATH) must be the
one ``import kernels`` finds, whether or not HuggingFace's is installed; where it is installed,
transformers' own import of it must work too.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_from_root(args, extra_path=None, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if extra_path:
        env["PYTHONPATH"] = str(extra_path)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def stand_in(tmp_path):
    pkg = tmp_path / "kernels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("STAND_IN = 'the installed kernels package'\n")
    return tmp_path


def test_top_level_kernels_is_not_a_regular_package():
    # A directory with an __init__.py found earlier on sys.path wins over any installed package;
    # one without is a namespace portion, which every regular package found later beats.
    assert (ROOT / "kernels").is_dir()
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "abft_fast" / "kernels").resolve() == (ROOT / "kernels").resolve()


def test_import_kernels_from_root_finds_the_installed_package(stand_in):
    r = run_from_root(["-c", "import kernels; print(kernels.STAND_IN, kernels.__file__)"], stand_in)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "the installed kernels package" in r.stdout and str(stand_in) in r.stdout


def test_abft_fast_kernels_is_the_checkout_kernels(stand_in):
    code = ("import abft_fast.kernels.attention as a, abft_fast.kernels.probes as p, kernels; "
            "print(a.__file__); print(p.__file__); print(kernels.__file__)")
    r = run_from_root(["-c", code], stand_in)
    assert r.returncode == 0, r.stderr[-2000:]
    a, p, k = r.stdout.split()
    assert Path(a).resolve() == (ROOT / "kernels" / "attention.py").resolve()
    assert Path(p).resolve() == (ROOT / "kernels" / "probes.py").resolve()
    assert Path(k).parent.parent == stand_in


def test_hf_integration_imports_from_root():
    r = run_from_root(["-c", "import abft_fast.hf, abft_fast.hf.packaged, abft_fast.abft.cli, "
                             "abft_fast.abft.trainer; print('ok')"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("ok")


@pytest.mark.skipif(importlib.util.find_spec("kernels") is None
                    or "site-packages" not in str(importlib.util.find_spec("kernels").origin),
                    reason="HuggingFace's kernels package is not installed")
def test_transformers_imports_the_real_kernels_from_root():
    code = ("import transformers.integrations.hub_kernels as h, kernels; "
            "print(kernels.__file__)")
    r = run_from_root(["-c", code])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "site-packages" in r.stdout and str(ROOT / "kernels") not in r.stdout


def test_pytest_collects_hf_and_abft_tests_from_root():
    # the failure of 2026-12-06: 11 collection errors under tests/hf and tests/abft
    r = run_from_root(["-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                       "tests/hf", "tests/abft"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "error" not in r.stdout.lower().split("\n")[-2], r.stdout[-1000:]


def test_import_error_names_its_real_cause(tmp_path):
    # a shadowing `kernels` earlier on sys.path: the message must not say "upgrade transformers"
    pytest.importorskip("transformers")
    bad = tmp_path / "kernels"
    bad.mkdir()
    (bad / "__init__.py").write_text("")
    r = subprocess.run([sys.executable, "-c", "import abft_fast.hf"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    if r.returncode == 0:
        pytest.skip("this transformers does not import `kernels` (no HuggingFace kernels installed)")
    last = r.stderr.strip().splitlines()[-1]
    assert "Upgrade" not in last and "not a version problem" in last, last
    assert str(bad) in last, last
