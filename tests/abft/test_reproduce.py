"""scripts/reproduce.py: resumability and table aggregation, with a mocked per-cell runner, plus
one real cell on a tiny random Llama (the runner the script uses)."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("reproduce", ROOT / "scripts" / "reproduce.py")
R = importlib.util.module_from_spec(spec)
sys.modules["reproduce"] = R
spec.loader.exec_module(R)

# Deterministic fake accuracies: ICL per data set; ABFT per (variant, data set, seed).
ICL = {"sst2": 0.50, "mr": 0.60}
ABFT = {("full", "sst2", 0): 0.70, ("full", "sst2", 1): 0.80,
        ("full", "mr", 0): 0.62, ("full", "mr", 1): 0.66,
        ("no_pid", "sst2", 0): 0.55, ("no_pid", "sst2", 1): 0.65,
        ("no_pid", "mr", 0): 0.60, ("no_pid", "mr", 1): 0.64}


class FakeRunner:
    def __init__(self):
        self.calls = []

    def __call__(self, model, ds, variant, seed, args):
        self.calls.append((model, ds, variant, seed))
        acc = ICL[ds] if variant == "icl" else ABFT[(variant, ds, seed)]
        return {"model": R.model_key(model), "dataset": ds, "variant": variant, "seed": seed,
                "eval": {"accuracy": acc, "unseen_label_accuracy": acc / 2,
                         "template_consistency": 0.9, "demo_consistency": 0.8,
                         "majority_class_accuracy": 0.5, "unseen_label_prompts": 3,
                         "attention_mass": {"correct": [acc / 2, acc / 2], "wrong": [0.25, 0.25]}}}


ARGS = ["--models", "fake-model", "--datasets", "sst2", "mr", "--seeds", "0", "1",
        "--ablations", "full", "no_pid", "--eval-queries", "4", "--no-progress"]


def test_resume_and_table(tmp_path):
    out = str(tmp_path / "res")
    run = FakeRunner()
    R.main(ARGS + ["--out", out], runner=run, log=lambda s: None)
    # 2 ICL cells (no seed) + 2 data sets x 2 seeds x (full, no_pid).
    assert len(run.calls) == 2 + 8
    assert len(set(run.calls)) == len(run.calls)
    assert sum(c[2] == "icl" for c in run.calls) == 2
    files = sorted(p.relative_to(out).as_posix() for p in Path(out).glob("cells/*/*/*.json"))
    assert "cells/fake-model/sst2/icl.json" in files and "cells/fake-model/mr/full-s1.json" in files
    assert len(files) == 10

    # Second run: nothing recomputed.
    run2 = FakeRunner()
    R.main(ARGS + ["--out", out], runner=run2, log=lambda s: None)
    assert run2.calls == []

    # Remove one cell: only that one is recomputed; a third seed adds only its own cells.
    (Path(out) / "cells/fake-model/mr/no_pid-s0.json").unlink()
    run3 = FakeRunner()
    R.main(ARGS + ["--out", out], runner=run3, log=lambda s: None)
    assert run3.calls == [("fake-model", "mr", "no_pid", 0)]

    # The table: averages of the fake numbers.
    text, summary = R.make_table(out)
    s = summary["models"]["fake-model"]
    assert s["datasets"] == ["sst2", "mr"]
    assert s["icl_avg"] == pytest.approx(55.0)
    assert s["abft_avg"] == pytest.approx((75.0 + 64.0) / 2)
    # std over seeds of the per-seed averages: seed 0 (70+62)/2 = 66, seed 1 (80+66)/2 = 73.
    assert s["abft_avg_std"] == pytest.approx(math.sqrt(((66 - 69.5) ** 2 + (73 - 69.5) ** 2) / 1))
    assert s["unseen_avg"][0] == pytest.approx(27.5)
    ab = summary["ablations"]
    assert ab["model"] == "fake-model" and ab["datasets"] == ["sst2", "mr"]
    assert ab["no_pid"]["avg"] == pytest.approx((60.0 + 62.0) / 2)
    assert ab["no_pid"]["std"] == pytest.approx(math.sqrt(2 * 3.5 ** 2))  # seeds: 57.5, 64.5
    assert ab["full"]["avg"] == pytest.approx(69.5)
    # Per-data-set row: sst2 ABFT 75.0 ± 7.1, Δ +20.0 shown as 20.0; paper rows present.
    assert "| sst2 | 50.0 | 50.0 | 75.0 ± 7.1 | +25.0 | – | – | 2 | 3 |" in text
    assert "| Falcon3-7B | 8 of 8 | 67.6 | 79.6 | +12.0 | paper |" in text
    assert "| no PID | 60.0 ± 7.1 | 62.0 ± 2.8 | 61.0 ± 4.9 | +6.0 | 76.9 |" in text
    # Label attention: correct = acc summed over the 2 layers, wrong = 0.5; mean over seeds.
    assert "| sst2 | vanilla ICL | 50.0 | 0.500 | 0.500 | 0.500 |" in text
    assert "| sst2 | full ABFT | 75.0 ± 7.1 | 0.750 | 0.500 | 0.600 |" in text
    assert "| mr | no PID | 62.0 ± 2.8 | 0.620 | 0.500 | 0.554 |" in text
    assert (Path(out) / "table.md").read_text() == text
    # --table-only computes nothing.
    run4 = FakeRunner()
    assert R.main(["--table-only", "--out", out], runner=run4, log=lambda s: None) == text
    assert run4.calls == []


def test_other_settings_refuse_to_mix(tmp_path):
    out = str(tmp_path / "res")
    R.main(ARGS + ["--out", out], runner=FakeRunner(), log=lambda s: None)
    with pytest.raises(SystemExit, match="another --out"):
        R.main(ARGS[:-3] + ["--eval-queries", "8", "--no-progress", "--out", out],
               runner=FakeRunner(), log=lambda s: None)


def test_uninstalled_packaged_model_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(R, "installed", lambda m: m != "gemma3-270m")
    run = FakeRunner()
    logs = []
    R.main(["--models", "fake-model", "gemma3-270m", "--datasets", "sst2", "--seeds", "0",
            "--ablations", "--out", str(tmp_path), "--no-progress"], runner=run, log=logs.append)
    assert {c[0] for c in run.calls} == {"fake-model"}
    assert any("skipping gemma3-270m" in s for s in logs)


def test_real_cell_on_tiny_model(tmp_path, monkeypatch):
    """The real runner on a tiny random Llama: one ICL and one ABFT cell, then a resumed run."""
    from tokenizers_offline import save_tiny_llama

    from abft_fast.abft import data
    task = data.load_task("sst2")
    # Reading StaICC's data set takes seconds; the runner loads it once per cell: reuse this one.
    monkeypatch.setattr(data, "load_task", lambda name, k=4: task)
    d = tmp_path / "tiny-llama"
    save_tiny_llama(d, [" ".join(e.inputs) for e in task.pool])
    out = tmp_path / "res"
    args = ["--models", str(d), "--datasets", "sst2", "--seeds", "0", "--ablations",
            "--eval-queries", "4", "--robustness-queries", "1", "--train-prompts", "8",
            "--steps", "2", "--batch", "4", "--micro-batch", "2", "--lr", "1e-3",
            "--backend", "torch", "--no-progress", "--out", str(out)]
    R.main(args, log=lambda s: None)
    icl = json.loads((out / "cells/tiny-llama/sst2/icl.json").read_text())
    full = json.loads((out / "cells/tiny-llama/sst2/full-s0.json").read_text())
    assert icl["eval"]["n_prompts"] == 8 and 0 <= icl["eval"]["accuracy"] <= 1
    assert 0 < full["eval"]["template_consistency"] <= 1
    assert [h["step"] for h in full["history"]] == [1, 2]
    assert full["settings"]["steps"] == 2 and full["train_config"]["seed"] == 0
    calls = []
    R.main(args, runner=lambda *a: calls.append(a), log=lambda s: None)
    assert calls == []
    assert "tiny-llama" in (out / "table.md").read_text()


def test_table_paired_intervals_from_per_prompt_cells(tmp_path):
    """Cells that keep per-prompt predictions get the paired bootstrap interval of the change
    (seed-mean ABFT minus ICL, per prompt) and McNemar's p per seed, for both harnesses."""
    from abft_fast.abft import stats
    gold = [0, 1] * 10  # 20 prompts

    def preds(right):
        return [g if r else 1 - g for g, r in zip(gold, right)]
    icl = preds([1] * 10 + [0] * 10)                 # 10 right
    s0 = preds([1] * 15 + [0] * 5)                   # 15 right: 5 gained, 0 lost
    s1 = preds([1] * 5 + [0] * 5 + [1] * 10)         # 15 right: 10 gained, 5 lost

    def ev(pred):
        return {"accuracy": sum(p == g for p, g in zip(pred, gold)) / 20, "predictions": pred,
                "gold": gold, "majority_class_accuracy": 0.5, "unseen_label_prompts": 0}

    def runner(model, ds, variant, seed, args):
        pred = icl if variant == "icl" else (s0 if seed == 0 else s1)
        return {"model": model, "dataset": ds, "variant": variant, "seed": seed,
                "eval": ev(pred), "staicc": {"harness": "staicc", **ev(pred)}}
    out = str(tmp_path / "res")
    R.main(["--models", "m", "--datasets", "sst2", "--seeds", "0", "1", "--ablations",
            "--eval-queries", "10", "--harness", "both", "--no-progress", "--out", out],
           runner=runner, log=lambda s: None)
    text, summary = R.make_table(out)
    c = lambda p: [int(a == b) for a, b in zip(p, gold)]  # noqa: E731
    diffs = [(x + y) / 2 - z for x, y, z in zip(c(s0), c(s1), c(icl))]
    lo, hi = stats.bootstrap_diff_ci(diffs, n_boot=2000, seed=0)
    ci = f"[{lo * 100:+.1f}, {hi * 100:+.1f}]"
    p0 = stats.mcnemar_exact(c(icl), c(s0))["p"]   # b = 5, c = 0: 2 / 32
    p1 = stats.mcnemar_exact(c(icl), c(s1))["p"]   # b = 10, c = 5
    assert p0 == 2 / 32
    assert p1 == pytest.approx(2 * sum(math.comb(15, i) for i in range(6)) / 2 ** 15)
    assert f"| sst2 | 50.0 | 50.0 | 75.0 ± 0.0 | +25.0 | {ci} | {p0:.2g} / {p1:.2g} | 2 |" in text
    m = summary["models"]["m"]
    assert m["delta_avg_ci95"] == pytest.approx([lo * 100, hi * 100])
    assert m["staicc_delta_avg_ci95"] == pytest.approx([lo * 100, hi * 100])
    assert "### StaICC's own harness: m" in text
    assert f"| sst2 | 50.0 | 75.0 ± 0.0 | +25.0 | {ci} | {p0:.2g} / {p1:.2g} | 2 | 75.0 |" in text
    assert json.loads((tmp_path / "res/cells/m/sst2/icl.json").read_text())["settings"][
        "harness"] == "both"
