"""scripts/dynamics.py on a tiny random Llama, offline: the JSON has its fields, all finite, and
the script's training loop reproduces ``trainer.train`` (loss, A, passing heads, weights)."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from tokenizers_offline import save_tiny_llama

from abft_fast.abft import data, trainer
from abft_fast.hf import packaged

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dyn():
    spec = importlib.util.spec_from_file_location("dynamics", ROOT / "scripts" / "dynamics.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def task():
    return data.load_task("sst2")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, task):
    d = tmp_path_factory.mktemp("tiny-llama-dyn")
    return save_tiny_llama(d, [" ".join(e.inputs) for e in task.pool])


def _finite(x, path="$"):
    if isinstance(x, dict):
        for k, v in x.items():
            _finite(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            _finite(v, f"{path}[{i}]")
    elif isinstance(x, float):
        assert math.isfinite(x), path


def test_script_writes_finite_json(dyn, model_dir, tmp_path):
    out = tmp_path / "dyn"
    args = ["--model", model_dir, "--dataset", "sst2", "--k", "4", "--runs", "full",
            "a2:lr=1e-3", "sep", "--train-prompts", "4", "--steps", "2", "--batch", "2",
            "--micro-batch", "1", "--lr", "1e-3", "--eval-queries", "3", "--eval-at", "1",
            "--grad-samples", "2", "--grad-after", "--out", str(out), "--tag", "t", "--quiet"]
    assert dyn.main(args) == 0
    res = json.loads((out / "t.json").read_text())
    for key in ("baseline", "runs", "gradient_before", "command", "baseline_passing_set"):
        assert key in res
    b = res["baseline"]
    assert b["n_prompts"] == 6 and len(b["correct"]) == 6
    assert set(b["heads"]) == {"-1", "0", "1"} and len(b["heads"]["0"]["correct"]) == 2
    g = res["gradient_before"]
    assert {"cos_gc_gw", "a_star_gd", "per_A", "per_layer"} <= set(g)
    assert set(res["runs"]) == {"full", "a2:lr=1e-3", "sep"}
    run = res["runs"]["a2:lr=1e-3"]
    assert run["config"]["a0"] == 2.0 and run["config"]["use_pid"] is False
    assert run["config"]["lr"] == 1e-3 and res["runs"]["sep"]["label_offset"] == 1
    for r in res["runs"].values():
        assert set(r["evals"]) == {"1", "2"} and set(r["paired"]) == {"1", "2"}
        assert [h["step"] for h in r["history"]] == [1, 2]
        for h in r["history"]:
            assert {"loss", "a_part", "b_part", "A", "passing_heads", "passing_share"} <= set(h)
            # the loss is its two parts (filter off or on, both are over the passing heads)
            assert h["loss"] == pytest.approx(h["a_part"] + h["b_part"], rel=1e-5, abs=1e-6)
        assert "gradient_after" in r
    _finite(res)  # every number finite; undefined shares (no passing head) are null
    assert b["shares"]["0"]["share_all_heads"] is not None
    assert (out / "t-training.png").stat().st_size > 0
    assert (out / "t-full-heads.png").stat().st_size > 0
    # the baseline evaluation is cached and reused
    assert list(out.glob("baseline-*.json"))
    assert "| t |" in dyn.summary(out)


def test_loop_matches_trainer(dyn, model_dir, task):
    cfg = dict(k=4, train_prompts=6, steps=3, batch=4, micro_batch=2, lr=1e-3, seed=1)
    m1, tok = packaged.load(model_dir, attn_implementation="abft_fast")
    ref = trainer.train(m1, tok, task, trainer.TrainConfig(**cfg), progress=False)
    m2, tok = packaged.load(model_dir, attn_implementation="abft_fast")
    hist = dyn.train_run(m2, tok, task, trainer.TrainConfig(**cfg), progress=False)
    for a, b in zip(ref.history, hist):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["A"] == pytest.approx(a["A"], rel=1e-6)
        assert b["passing_heads"] == pytest.approx(a["passing_heads"])
    for (n, p), q in zip(ref.model.named_parameters(), m2.parameters()):
        assert torch.allclose(p, q, atol=1e-6), n
