"""StaICC's own harness (evaluate.evaluate_staicc) and the paired before/after reporting of the CLI,
on a tiny random Llama with an offline-trained tokenizer (nothing is downloaded)."""
import json

import pytest
import torch
from tokenizers_offline import save_tiny_llama

from abft_fast.abft import cli, data
from abft_fast.abft import evaluate as E
from abft_fast.hf.packaged import load


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama-harness")
    task = data.load_task("sst2")
    save_tiny_llama(d, [" ".join(e.inputs) for e in task.pool] + ["negative positive"])
    return str(d)


@pytest.fixture(scope="module")
def tiny(model_dir):
    return load(model_dir, attn_implementation="abft_fast")


def _by_hand(model, tok, prompt, label_space):
    """StaICC's reference inference, written out: the whole prompt with special tokens, the last
    position's logits at the last token of each bare label word."""
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    return int(torch.argmax(logits[[tok(w).input_ids[-1] for w in label_space]]))


def test_staicc_harness_scores_its_own_prompts_and_label_tokens(tiny):
    model, tok = tiny
    ex = E.staicc_experimentor("sst2")
    res = E.evaluate_staicc(model, tok, "sst2", n_queries=3, progress=False, experimentor=ex)
    prompts = ex.prompt_set()
    idx = [0, 1, 2, 512, 513, 514]  # the first 3 queries of each of the 2 samplings
    assert all(prompts[i].endswith("sentiment: ") for i in idx)  # StaICC's trailing space kept
    space = ex.get_label_space()
    want = [_by_hand(model, tok, prompts[i], space) for i in idx]
    assert res["predictions"] == want
    gold = [ex.triplet_dataset.get_default_ground_truth_label_index(i % 512) for i in idx]
    assert res["gold"] == gold and res["n_prompts"] == 6 and not res["full_test_set"]
    assert res["accuracy"] == sum(p == g for p, g in zip(want, gold)) / 6
    assert res["label_token_ids"] == [tok(w).input_ids[-1] for w in space]
    # The same prompts, in the same order, as abft-fast's evaluator, but for the trailing space.
    ours = data.eval_prompts(data.load_task("sst2"), 3)
    assert [p.text for p in ours] == [prompts[i].rstrip() for i in idx]
    assert [p.query_label for p in ours] == gold


def test_full_test_set_goes_through_staicc_auto_run(tiny):
    """n_queries = the whole test split runs single_experimentor.auto_run itself; the subset path
    gives the same predictions on the same prompts. (A test split of 8 keeps this fast.)"""
    from StaICC.util import experimentor, hgf_dataset_loader
    model, tok = tiny

    def small():
        return experimentor.single_experimentor(
            original_dataset=hgf_dataset_loader.glue_sst2(), k=4, dividing=[1024, 4096, 8])
    calls = []
    ex = small()
    run = ex.auto_run
    ex.auto_run = lambda **kw: calls.append(kw) or run(**kw)
    full = E.evaluate_staicc(model, tok, "sst2", n_queries=None, progress=False, experimentor=ex)
    assert len(calls) == 1 and full["full_test_set"] and full["n_prompts"] == 16
    sub = E.evaluate_staicc(model, tok, "sst2", n_queries=3, progress=False, experimentor=small())
    idx = [0, 1, 2, 8, 9, 10]
    assert sub["predictions"] == [full["predictions"][i] for i in idx]
    assert sub["gold"] == [full["gold"][i] for i in idx]
    assert set(full["staicc_metrics"]) >= {"accuracy", "macro_F1"}


def test_compare_is_paired_on_the_same_prompts():
    a = {"predictions": [0, 1, 1, 0], "gold": [0, 1, 0, 0]}
    b = {"predictions": [0, 1, 0, 1], "gold": [0, 1, 0, 0]}
    s = E.compare(a, b, n_boot=100)
    assert (s["accuracy_before"], s["accuracy_after"], s["diff"]) == (0.75, 0.75, 0.0)
    assert (s["mcnemar_b"], s["mcnemar_c"], s["mcnemar_p"]) == (1, 1, 1.0)
    with pytest.raises(ValueError, match="same prompts"):
        E.compare(a, {"predictions": [0], "gold": [1]})
    assert E.correctness(a) == [1, 1, 0, 1]


def test_cli_eval_harnesses_and_baseline(model_dir, tmp_path, capsys):
    cli.main(["eval", "--model", model_dir, "--eval-queries", "3", "--harness", "staicc",
              "--out", str(tmp_path / "st"), "--no-progress", "--backend", "torch"])
    out = capsys.readouterr().out
    assert "sst2 (StaICC harness): accuracy" in out
    st = json.loads((tmp_path / "st" / "eval.json").read_text())
    assert st["harness"] == "staicc" and st["n_prompts"] == 6 and len(st["predictions"]) == 6

    cli.main(["eval", "--model", model_dir, "--eval-queries", "3", "--harness", "both",
              "--out", str(tmp_path / "both"), "--no-progress", "--backend", "torch"])
    both = json.loads((tmp_path / "both" / "eval.json").read_text())
    assert both["n_prompts"] == 6 and both["staicc"]["predictions"] == st["predictions"]
    assert len(both["predictions"]) == 6 and both["gold"] == st["gold"]

    with pytest.raises(SystemExit, match="--baseline"):
        cli.main(["eval", "--model", model_dir, "--baseline", "--no-progress"])


def test_cli_train_report_carries_paired_intervals(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    cli.main(["train", "--model", model_dir, "--train-prompts", "4", "--steps", "1", "--batch",
              "2", "--micro-batch", "2", "--lr", "1e-2", "--eval-queries", "4", "--harness",
              "both", "--backend", "torch", "--no-filter", "--no-plots", "--no-progress",
              "--out", str(out)])
    printed = capsys.readouterr().out
    assert "95% CI" in printed and "McNemar p = " in printed
    assert "accuracy after (StaICC harness):" in printed
    rep = json.loads((out / "report.json").read_text())
    ch = rep["accuracy_change"]
    assert ch == rep["paired"]["abft"] and ch["n"] == 8
    assert ch["ci_low"] <= ch["diff"] <= ch["ci_high"] and 0 < ch["mcnemar_p"] <= 1
    assert ch["diff"] == pytest.approx(rep["accuracy_after"] - rep["accuracy_before"])
    st = rep["paired"]["staicc"]
    assert st["diff"] == pytest.approx(rep["staicc_accuracy_after"] - rep["staicc_accuracy_before"])
    assert st["ci_low"] <= st["diff"] <= st["ci_high"]
    assert rep["staicc_before"]["gold"] == rep["eval_before"]["gold"]

    # eval --baseline with the trained weights: the same paired change as the report's.
    cli.main(["eval", "--model", model_dir, "--eval-queries", "4", "--weights",
              str(out / "qk.safetensors"), "--baseline", "--out", str(tmp_path / "ev"),
              "--no-progress", "--backend", "torch"])
    assert "without the weights" in capsys.readouterr().out
    ev = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert ev["paired_vs_base"] == ch
