"""A failing test that drew random inputs shows its seeds, and the command it shows replays them."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FAILING = '''
import torch
from cases import fresh_generator


def test_random_case_fails():
    a, b = fresh_generator(), fresh_generator()
    print("VALUES", torch.rand(3, generator=a).tolist(), torch.rand(2, generator=b).tolist())
    assert False
'''


def _run(path, env_extra):
    env = {k: v for k, v in os.environ.items() if k != "ABFT_FAST_TEST_SEEDS"}
    env.update(env_extra)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


def test_failure_report_shows_seeds_that_replay_it():
    d = ROOT / "build" / f"seed-replay-{os.getpid()}"  # under the root: its conftest applies
    d.mkdir(parents=True, exist_ok=True)
    path = d / "test_random_failure.py"
    path.write_text(FAILING)
    try:
        first = _run(path, {})
        seeds = re.search(r"seeds drawn: (\d+),(\d+)", first)
        assert seeds, first[-2000:]
        assert f"replay: ABFT_FAST_TEST_SEEDS={seeds[1]},{seeds[2]} python -m pytest" in first
        values = re.search(r"VALUES .*", first)[0]
        again = _run(path, {"ABFT_FAST_TEST_SEEDS": f"{seeds[1]},{seeds[2]}"})
        assert re.search(r"VALUES .*", again)[0] == values
        assert f"seeds drawn: {seeds[1]},{seeds[2]}" in again
        other = _run(path, {})  # fresh seeds otherwise
        assert re.search(r"VALUES .*", other)[0] != values
    finally:
        path.unlink()
        d.rmdir()
