"""CLI smoke runs on a tiny random Llama saved with its tokenizer to a local directory."""
import json

import pytest
from tokenizers_offline import save_tiny_llama

from abft_fast.abft import cli, data, trainer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    task = data.load_task("sst2")
    save_tiny_llama(d, [" ".join(e.inputs) for e in task.pool])
    return str(d)


def test_train_then_eval_smoke(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    cli.main(["train", "--model", model_dir, "--dataset", "sst2", "--k", "4",
              "--train-prompts", "8", "--steps", "3", "--batch", "4", "--micro-batch", "2",
              "--lr", "1e-3", "--eval-queries", "6", "--robustness-queries", "2", "--seed", "1",
              "--backend", "torch", "--no-filter", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert "accuracy before:" in printed and "accuracy after:" in printed
    rep = json.loads((out / "report.json").read_text())
    for key in ("accuracy_before", "accuracy_after", "dataset", "model", "train_seconds",
                "settings", "history"):
        assert key in rep
    assert rep["dataset"] == "sst2" and rep["model"] == model_dir
    assert rep["command"].startswith(f"abft-fast train --model {model_dir} --dataset sst2 --k 4")
    assert rep["command"].endswith(f"--out {out} --no-progress") and "argv" not in rep["settings"]
    assert rep["settings"]["use_filter"] is False and rep["settings"]["use_pid"] is True
    assert rep["settings"]["steps"] == 3 and rep["settings"]["micro_batch"] == 2
    assert [h["step"] for h in rep["history"]] == [1, 2, 3]
    assert all({"loss", "A", "passing_heads"} <= set(h) for h in rep["history"])
    ev = rep["eval_after"]
    assert ev["n_prompts"] == 12 and 0 <= ev["accuracy"] <= 1
    assert len(ev["attention_mass"]["correct"]) == 2
    assert 0 < ev["template_consistency"] <= 1 and 0 < ev["demo_consistency"] <= 1
    for f in ("attention_mass.png", "training.png", "qk.safetensors"):
        assert (out / f).stat().st_size > 0
    # eval with the saved weights reproduces the after-training accuracy.
    cli.main(["eval", "--model", model_dir, "--eval-queries", "6", "--weights",
              str(out / "qk.safetensors"), "--out", str(tmp_path / "ev"), "--no-progress"])
    ev2 = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert ev2["accuracy"] == rep["accuracy_after"]
    assert ev2["prediction_counts"] == ev["prediction_counts"]


def test_bad_flags_are_rejected(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--model", model_dir, "--backend", "gpu"])
    assert "--backend" in capsys.readouterr().err
    with pytest.raises(ValueError, match="dataset must be one of"):
        cli.main(["eval", "--model", model_dir, "--dataset", "imdb", "--no-progress"])
    with pytest.raises(ValueError, match="multiple of micro_batch"):
        cli.main(["train", "--model", model_dir, "--batch", "5", "--micro-batch", "2",
                  "--out", str(tmp_path / "x"), "--no-progress"])
    assert not (tmp_path / "x").exists()


def test_demo_trains_on_each_of_its_prompts_once():
    # the setting measured to gain on SmolLM2-135M + SST-2 (docs/results/demo-512x1): 512 distinct
    # prompts, one permutation of them over 64 steps x 8 at the paper's lr
    args = cli.parse_args(["demo"])
    assert args.train_prompts == 512 and args.steps * args.batch == args.train_prompts
    assert args.lr == 2e-5 and args.eval_queries == 100 and args.dataset == "sst2"
    order = trainer._Order(args.train_prompts, args.seed)
    seen = [i for _ in range(args.steps) for i in order.take(args.batch)]
    assert sorted(seen) == list(range(args.train_prompts))
