"""The scripts in examples/ run (each in its own process, small sizes, CPU) and print what they say."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name, *args, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True,
                       text=True, timeout=timeout, env=env, cwd=EXAMPLES.parent)
    assert r.returncode == 0, f"{name} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def test_probe_attention_rows_matches_eager():
    out = run_example("probe_attention_rows.py", "--layers", "1", "--length", "12", "--cols", "3")
    assert "probs shape (1, 2, 4, 2, 3)" in out
    assert "unused slot (-1) all zero: True" in out
    assert "max |abft_fast - eager|" in out


def test_custom_model_attention_matches_reference():
    out = run_example("custom_model_attention.py", "--length", "16", "--dim", "32")
    assert "probs (2, 4, 3, 4)" in out
    assert "d k_proj.weight" in out and "max relative error" in out


def test_train_abft_tiny_model():
    pytest.importorskip("StaICC")
    out = run_example("train_abft.py", "--steps", "2", "--train-prompts", "4", "--batch", "2",
                      "--micro-batch", "1", "--eval-queries", "2")
    assert "step 2: loss" in out
    assert "all q_proj / k_proj: True" in out
    assert "accuracy on 4 test prompts" in out


def test_examples_have_docstring_and_main():
    for path in sorted(EXAMPLES.glob("*.py")):
        src = path.read_text()
        assert src.startswith('"""'), path.name
        assert 'if __name__ == "__main__":' in src, path.name
