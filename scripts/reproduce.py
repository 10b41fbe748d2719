#!/usr/bin/env python
"""Reproduce the ABFT paper's Table 1 / Table 4 protocol with abft-fast, offline and resumable.

Runs vanilla ICL and ABFT on SmolLM2-135M (and Gemma-3-270M when its package is installed) over
the paper's eight data sets, several seeds, plus the Table-4 ablations on one model, and writes a
markdown table (mean +- std over seeds) next to the paper's numbers.

Every cell is one JSON file under ``--out``:

    <out>/cells/<model>/<dataset>/icl.json              vanilla ICL (deterministic: no seed)
    <out>/cells/<model>/<dataset>/<variant>-s<seed>.json  ABFT variant after training

Vanilla ICL uses StaICC's fixed test inputs and a fixed model, so it has no seed: it is computed
once per (model, data set) and is the "before" column of every seed. A finished cell is never
recomputed; a cell written with other settings (queries, steps, ...) stops the run instead of
being mixed in (use another ``--out``). ``--table-only`` rebuilds ``<out>/table.md`` (and
``table.json``) from the cells that exist.

    python scripts/reproduce.py                          # paper defaults (hours to days on CPU)
    python scripts/reproduce.py --seeds 0 1 --eval-queries 64 --train-prompts 128 --steps 8 \
        --batch 16 --datasets sst2 mr --ablations full no_pid --threads 2
    python scripts/reproduce.py --table-only
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

DATASETS = ["sst2", "mr", "fp", "sst5", "trec", "subj", "emotion", "hate"]
MODELS = ["smollm2-135m", "gemma3-270m"]
# Table 4 of the paper: variant -> TrainConfig overrides. "A = 0" removes the wrong-label term,
# so A is held at 0 (no PID, which would move it away from 0); "B = 0" keeps the PID on A.
VARIANTS = {
    "full": {},
    "no_pid": {"use_pid": False},
    "no_pid_no_filter": {"use_pid": False, "use_filter": False},
    "a0": {"a0": 0.0, "use_pid": False},
    "b0": {"b": 0.0},
}
VARIANT_NAMES = {"full": "full ABFT", "no_pid": "no PID", "no_pid_no_filter": "no PID, no filter",
                 "a0": "A = 0", "b0": "B = 0"}
# docs/design.md section 1 (Cho et al. 2025): average accuracy over the 8 data sets, ICL -> ABFT.
PAPER_T1 = {"GPT2-L": (45.9, 63.2), "GPT2-XL": (50.1, 67.7), "Falcon3-7B": (67.6, 79.6),
            "Llama3-8B": (66.6, 80.2), "Qwen2.5-32B": (75.3, 79.6)}
PAPER_T4 = {"full": 79.6, "no_pid": 76.9, "no_pid_no_filter": 75.6, "a0": 72.1, "b0": 56.5}
# Settings that define a cell's result: a cell file written with other values is not reused.
EVAL_KEYS = ("k", "eval_queries", "robustness_queries")
TRAIN_KEYS = ("train_prompts", "steps", "batch", "micro_batch", "lr")


# ----------------------------------------------------------------------------- cells

def cell_path(out, model, dataset, variant, seed=None):
    name = "icl.json" if variant == "icl" else f"{variant}-s{seed}.json"
    return Path(out) / "cells" / model_key(model) / dataset / name


def model_key(model):
    """File-system name of a model: a PACKAGED name as is, a local directory by its base name."""
    return Path(model).name if os.sep in model or os.path.isdir(model) else model


def cell_settings(args, variant):
    s = {k: getattr(args, k) for k in EVAL_KEYS}
    if getattr(args, "harness", "abft") != "abft":  # absent = abft-fast's evaluator only
        s["harness"] = args.harness
    if variant != "icl":
        s.update({k: getattr(args, k) for k in TRAIN_KEYS})
        s["variant"] = variant
        s["overrides"] = VARIANTS[variant]
    return s


def plan(args):
    """Cells to run, in order: per seed, per model, per data set: ICL then full ABFT; then the
    ablations (on ``--ablation-model``, ``--ablation-datasets``)."""
    cells = []
    seen = set()

    def add(model, ds, variant, seed):
        key = (model, ds, variant, None if variant == "icl" else seed)
        if key not in seen:
            seen.add(key)
            cells.append(key)

    for seed in args.seeds:
        for model in args.models:
            for ds in args.datasets:
                add(model, ds, "icl", seed)
                add(model, ds, "full", seed)
    abl = [v for v in args.ablations if v != "full"]
    if abl and args.ablation_model in args.models:
        for seed in args.seeds:
            for ds in args.ablation_datasets:
                add(args.ablation_model, ds, "icl", seed)
                for v in ["full"] + abl:
                    add(args.ablation_model, ds, v, seed)
    return cells


def run_cell(model_name, dataset, variant, seed, args):
    """Compute one cell; returns its JSON-able dict. Loads a fresh model (training is in place)."""
    import torch

    from abft_fast import hf
    from abft_fast.abft import data
    from abft_fast.abft.cli import load_model
    from abft_fast.abft.evaluate import evaluate, evaluate_staicc
    from abft_fast.abft.trainer import TrainConfig, train
    if args.threads:
        torch.set_num_threads(args.threads)
    hf.set_backend(args.backend)
    t0 = time.perf_counter()
    model, tok = load_model(model_name)
    task = data.load_task(dataset, args.k)
    prog = not args.no_progress
    out = {"model": model_key(model_name), "dataset": dataset, "variant": variant, "seed": seed}
    if variant != "icl":
        cfg = TrainConfig(k=args.k, train_prompts=args.train_prompts, steps=args.steps,
                          batch=args.batch, micro_batch=args.micro_batch, lr=args.lr, seed=seed,
                          **VARIANTS[variant]).check()
        res = train(model, tok, task, cfg, progress=prog)
        model = res.model
        out["train_seconds"] = res.seconds
        out["history"] = res.history
        out["train_config"] = res.config
    ev = evaluate(model, tok, task, args.eval_queries, args.eval_batch, args.robustness_queries,
                  progress=prog)
    out["eval"] = ev
    if getattr(args, "harness", "abft") == "both":
        out["staicc"] = evaluate_staicc(model, tok, task, args.eval_queries, args.k,
                                        progress=prog)
    out["seconds"] = time.perf_counter() - t0
    return out


def write_json(path, obj):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)  # a killed run never leaves a half-written cell


def run_all(args, runner=run_cell, log=print):
    """Run every planned cell that has no file yet. Returns (computed, skipped) counts."""
    cells = plan(args)
    todo = []
    for model, ds, variant, seed in cells:
        p = cell_path(args.out, model, ds, variant, seed)
        if p.exists():
            old = json.loads(p.read_text())
            want = cell_settings(args, variant)
            if old.get("settings") != want:
                raise SystemExit(f"{p} was computed with settings {old.get('settings')}, not "
                                 f"{want}; use another --out for other settings")
            continue
        todo.append((model, ds, variant, seed))
    skipped = len(cells) - len(todo)
    log(f"{len(cells)} cells planned, {skipped} already done, {len(todo)} to run")
    spent = {"icl": [], "train": []}
    t_start = time.perf_counter()
    for i, (model, ds, variant, seed) in enumerate(todo):
        kind = "icl" if variant == "icl" else "train"
        log(f"[{i + 1}/{len(todo)}] {model_key(model)} {ds} {variant}"
            + ("" if variant == "icl" else f" seed {seed}") + f"  {_eta(todo[i:], spent)}")
        t = time.perf_counter()
        res = runner(model, ds, variant, seed, args)
        res["settings"] = cell_settings(args, variant)
        res["command"] = " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])
        write_json(cell_path(args.out, model, ds, variant, seed), res)
        dt = time.perf_counter() - t
        spent[kind].append(dt)
        log(f"    accuracy {res['eval']['accuracy']:.4f}  ({dt:.0f} s; elapsed "
            f"{(time.perf_counter() - t_start) / 60:.1f} min)")
    return len(todo), skipped


def _eta(remaining, spent):
    def mean(xs):
        return sum(xs) / len(xs) if xs else None
    mi, mt = mean(spent["icl"]), mean(spent["train"])
    if mi is None and mt is None:
        return "ETA ?"
    mi = mi if mi is not None else mt * 0.25
    mt = mt if mt is not None else mi * 4
    s = sum(mi if v == "icl" else mt for _, _, v, _ in remaining)
    return f"ETA {s / 60:.0f} min"


# ----------------------------------------------------------------------------- table

def load_cells(out):
    cells = []
    for p in sorted((Path(out) / "cells").glob("*/*/*.json")):
        cells.append(json.loads(p.read_text()))
    return cells


def _ms(xs, scale=100.0):
    """Mean and sample std (n - 1; None for one value) of ``xs`` in percent."""
    xs = [x * scale for x in xs if x is not None]
    if not xs:
        return None, None, 0
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return m, sd, len(xs)


def _fmt(m, sd=None, n=None):
    if m is None:
        return "–"
    s = f"{m:.1f}"
    if sd is not None:
        s += f" ± {sd:.1f}"
    return s


def _delta(a, b):
    return f"{b - a:+.1f}" if a is not None and b is not None else "–"


def aggregate(cells):
    """Nested summary: per model, per data set, per variant: the metric lists over seeds."""
    agg = {}
    for c in cells:
        d = agg.setdefault(c["model"], {}).setdefault(c["dataset"], {})
        v = d.setdefault(c["variant"], {"seeds": [], "acc": [], "unseen": [], "tc": [], "dc": [],
                                        "mass_correct": [], "mass_wrong": [], "correct": [],
                                        "st_acc": [], "st_correct": [],
                                        "majority": None, "n_unseen": None})
        ev = c["eval"]
        # Per-prompt correctness (cells written before it was kept have none: no interval).
        v["correct"].append(correctness(ev) if "predictions" in ev else None)
        st = c.get("staicc")
        v["st_acc"].append(st["accuracy"] if st else None)
        v["st_correct"].append(correctness(st) if st else None)
        mass = ev.get("attention_mass") or {}
        # Last-token attention on the demonstrations' correct / wrong labels, summed over layers.
        v["mass_correct"].append(sum(mass["correct"]) if "correct" in mass else None)
        v["mass_wrong"].append(sum(mass["wrong"]) if "wrong" in mass else None)
        v["seeds"].append(c["seed"])
        v["acc"].append(ev["accuracy"])
        v["unseen"].append(ev.get("unseen_label_accuracy"))
        v["tc"].append(ev.get("template_consistency"))
        v["dc"].append(ev.get("demo_consistency"))
        v["majority"] = ev.get("majority_class_accuracy")
        v["n_unseen"] = ev.get("unseen_label_prompts")
    return agg


def correctness(ev):
    from abft_fast.abft.evaluate import correctness as c
    return c(ev)


def _prompt_diffs(per_ds, d, variant, key="correct"):
    """Per prompt of data set ``d``: the variant's correctness averaged over its seeds minus
    vanilla ICL's, on the same prompts; None when a cell lacks per-prompt results."""
    i, v = per_ds[d].get("icl"), per_ds[d].get(variant)
    if not i or not v or not i[key] or i[key][0] is None or any(a is None for a in v[key]):
        return None
    before, afters = i[key][0], v[key]
    if not afters or any(len(a) != len(before) for a in afters):
        return None
    return [sum(a[j] for a in afters) / len(afters) - before[j] for j in range(len(before))]


def _ci(per_ds, datasets, variant, key="correct"):
    """Paired bootstrap 95 % interval (points) of ICL -> variant over ``datasets`` (each data set
    resampled within itself; the statistic is the mean over data sets of the seed-mean change)."""
    from abft_fast.abft.stats import bootstrap_diff_ci
    diffs = [_prompt_diffs(per_ds, d, variant, key) for d in datasets]
    if not diffs or any(x is None for x in diffs):
        return None
    lo, hi = bootstrap_diff_ci(diffs, n_boot=2000, seed=0)
    return lo * 100, hi * 100


def _fmt_ci(ci):
    return "–" if ci is None else f"[{ci[0]:+.1f}, {ci[1]:+.1f}]"


def _mcnemar(per_ds, d, variant, key="correct"):
    """McNemar exact p of ICL -> variant per seed, e.g. ``0.021 / 0.34 / 0.11``."""
    from abft_fast.abft.stats import mcnemar_exact
    i, v = per_ds[d].get("icl"), per_ds[d].get(variant)
    if not i or not v or not i[key] or i[key][0] is None or any(a is None for a in v[key]):
        return "–"
    return " / ".join(f"{mcnemar_exact(i[key][0], a)['p']:.2g}" for a in v[key])


def _avg_over_datasets(per_ds, variant, metric, datasets):
    """Average over ``datasets`` of the per-data-set seed means, and the sample std over seeds of
    the per-seed averages (only seeds present in every data set)."""
    if not datasets or any(variant not in per_ds[d] for d in datasets):
        return None, None
    means = []
    for d in datasets:
        m, _, n = _ms(per_ds[d][variant][metric])
        if m is None:
            return None, None
        means.append(m)
    avg = sum(means) / len(means)
    if variant == "icl":
        return avg, None
    common = set.intersection(*[set(per_ds[d][variant]["seeds"]) for d in datasets])
    per_seed = []
    for s in sorted(common):
        vals = []
        for d in datasets:
            e = per_ds[d][variant]
            x = e[metric][e["seeds"].index(s)]
            if x is None:
                break
            vals.append(x)
        else:
            per_seed.append(sum(vals) / len(vals))
    _, sd, _ = _ms(per_seed)
    return avg, sd


def _mass_table(model, per_ds):
    """Rows per data set and variant: last-token attention on correct / wrong demonstration labels
    (per layer the mean over heads of the summed label probability, then summed over layers;
    mean over seeds) and the correct share c / (c + w)."""
    rows = []
    for d in [d for d in DATASETS if d in per_ds] + sorted(d for d in per_ds if d not in DATASETS):
        for v in ["icl"] + list(VARIANTS):
            e = per_ds[d].get(v)
            if e is None:
                continue
            c, _, _ = _ms(e["mass_correct"], 1.0)
            w, _, _ = _ms(e["mass_wrong"], 1.0)
            if c is None or w is None:
                continue
            share = c / (c + w) if c + w > 0 else None
            rows.append(f"| {d} | {'vanilla ICL' if v == 'icl' else VARIANT_NAMES[v]} | "
                        f"{_fmt(*_ms(e['acc'])[:2])} | {c:.3f} | {w:.3f} | "
                        f"{'–' if share is None else f'{share:.3f}'} |")
    if not rows:
        return []
    return [f"## Attention on the demonstrations' labels: {model}", "",
            "Last token of the standard evaluation prompts; per layer the mean over heads of the "
            "probability on the correct (resp. wrong) labels, summed over layers; mean over "
            "seeds. Correct share = correct / (correct + wrong); attention blind to the labels' "
            "values gives about the fraction of demonstrations whose label is the query's "
            "(1/2 for two classes, less with more).", "",
            "| data set | variant | accuracy | correct | wrong | correct share |",
            "|---|---|---|---|---|---|", *rows, ""]


def _staicc_table(model, per_ds, dss, summary):
    """ICL -> ABFT as StaICC's own harness scores it, for the cells that ran it (--harness both)."""
    rows, both = [], []
    for d in dss:
        i, f = per_ds[d].get("icl"), per_ds[d].get("full")
        im = _ms(i["st_acc"])[0] if i and None not in i["st_acc"] else None
        fm, fs, fn = _ms(f["st_acc"]) if f and None not in f["st_acc"] else (None, None, 0)
        if im is None and fm is None:
            continue
        if im is not None and fm is not None:
            both.append(d)
        ours = _ms(f["acc"])[0] if f else None
        rows.append(f"| {d} | {_fmt(im)} | {_fmt(fm, fs)} | {_delta(im, fm)} | "
                    f"{_fmt_ci(_ci(per_ds, [d], 'full', 'st_correct'))} | "
                    f"{_mcnemar(per_ds, d, 'full', 'st_correct')} | {fn} | {_fmt(ours)} |")
    if not rows:
        return []
    ia, _ = _avg_over_datasets(per_ds, "icl", "st_acc", both)
    fa, fsd = _avg_over_datasets(per_ds, "full", "st_acc", both)
    ci = _ci(per_ds, both, "full", "st_correct")
    summary.update({"staicc_datasets": both, "staicc_icl_avg": ia, "staicc_abft_avg": fa,
                    "staicc_abft_avg_std": fsd, "staicc_delta_avg_ci95": ci})
    return [f"### StaICC's own harness: {model}", "",
            "The same models scored by StaICC's `single_experimentor` and its reference inference "
            "(its prompts with the trailing space, the last token of each bare label word; "
            "docs/abft.md). Last column: abft-fast's evaluator, for comparison.", "",
            "| data set | ICL acc | ABFT acc | Δ | Δ 95% CI | McNemar p | n | ABFT acc (ours) |",
            "|---|---|---|---|---|---|---|---|", *rows,
            f"| **average ({len(both)} sets)** | {_fmt(ia)} | {_fmt(fa, fsd)} | {_delta(ia, fa)} | "
            f"{_fmt_ci(ci)} | – | | |", ""]


def make_table(out, ablation_model=None):
    cells = load_cells(out)
    agg = aggregate(cells)
    lines = ["# ABFT reproduction: results", "",
             f"Generated by `scripts/reproduce.py --table-only --out {out}` from {len(cells)} "
             "cells. Accuracies in percent; `a ± s` is the mean and sample standard deviation "
             "over training seeds (n = seeds). Vanilla ICL is deterministic (StaICC's fixed test "
             "inputs, no training), so it has one value per data set. TC / DC: prediction "
             "consistency across StaICC's 9 templates / 8 demonstration samplings; unseen: "
             "accuracy on the standard prompts whose query label is absent from the "
             "demonstrations; maj.: majority-class accuracy of the evaluated prompts. Δ 95% CI: "
             "paired bootstrap interval (2,000 resamples of the prompts, seed 0; the average "
             "resamples each data set within itself) of the change from ICL to the seed-mean "
             "ABFT accuracy on the same prompts; McNemar p: exact McNemar test of ICL vs ABFT on "
             "the same prompts, one per seed; – where the cells keep no per-prompt predictions.",
             ""]
    summary = {"models": {}, "ablations": {}}
    settings = {}
    for c in cells:
        settings.setdefault(c["variant"] == "icl", c.get("settings"))
    for model in sorted(agg):
        per_ds = agg[model]
        dss = [d for d in DATASETS if d in per_ds] + sorted(d for d in per_ds if d not in DATASETS)
        lines += [f"## Table 1 style: {model}", "",
                  "| data set | maj. | ICL acc | ABFT acc | Δ | Δ 95% CI | McNemar p | n | unseen "
                  "prompts | ICL unseen | ABFT unseen | ICL TC | ABFT TC | ICL DC | ABFT DC |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for d in dss:
            e = per_ds[d]
            i, f = e.get("icl"), e.get("full")
            row = [d, _fmt(_ms([e[next(iter(e))]["majority"]])[0])]
            im = _ms(i["acc"])[0] if i else None
            fm, fs, fn = _ms(f["acc"]) if f else (None, None, 0)
            nu = e[next(iter(e))]["n_unseen"]
            row += [_fmt(im), _fmt(fm, fs), _delta(im, fm), _fmt_ci(_ci(per_ds, [d], "full")),
                    _mcnemar(per_ds, d, "full"), str(fn), "–" if nu is None else str(nu)]
            for key in ("unseen", "tc", "dc"):
                row += [_fmt(*_ms(i[key])[:2]) if i else "–", _fmt(*_ms(f[key])[:2]) if f else "–"]
            lines.append("| " + " | ".join(row) + " |")
        both = [d for d in dss if "icl" in per_ds[d] and "full" in per_ds[d]]
        row = [f"**average ({len(both)} sets)**", "–"]
        ia, _ = _avg_over_datasets(per_ds, "icl", "acc", both)
        fa, fsd = _avg_over_datasets(per_ds, "full", "acc", both)
        avg_ci = _ci(per_ds, both, "full")
        row += [_fmt(ia), _fmt(fa, fsd), _delta(ia, fa), _fmt_ci(avg_ci), "–", "", ""]
        extra = {}
        for key in ("unseen", "tc", "dc"):
            a, _ = _avg_over_datasets(per_ds, "icl", key, both)
            b, bs = _avg_over_datasets(per_ds, "full", key, both)
            row += [_fmt(a), _fmt(b, bs)]
            extra[key] = (a, b)
        lines += ["| " + " | ".join(row) + " |", ""]
        summary["models"][model] = {"datasets": both, "icl_avg": ia, "abft_avg": fa,
                                    "abft_avg_std": fsd, "delta_avg_ci95": avg_ci,
                                    **{f"{k}_avg": v for k, v in extra.items()}}
        lines += _staicc_table(model, per_ds, dss, summary["models"][model])
    for model in sorted(agg):
        lines += _mass_table(model, agg[model])
    # Comparison with the paper's averages.
    lines += ["## Average accuracy, ICL -> ABFT, next to the paper (Table 1)", "",
              "| model | data sets | ICL | ABFT | Δ | source |", "|---|---|---|---|---|---|"]
    for model, s in summary["models"].items():
        lines.append(f"| {model} | {len(s['datasets'])} of 8 | {_fmt(s['icl_avg'])} | "
                     f"{_fmt(s['abft_avg'], s['abft_avg_std'])} | "
                     f"{_delta(s['icl_avg'], s['abft_avg'])} "
                     f"| this run |")
    for m, (a, b) in PAPER_T1.items():
        lines.append(f"| {m} | 8 of 8 | {a:.1f} | {b:.1f} | {b - a:+.1f} | paper |")
    lines.append("")
    # Ablations.
    am = ablation_model if ablation_model in agg else None
    if am is None:
        am = next((m for m in agg if any(len(v) > 2 for v in agg[m].values())), None)
    if am is not None:
        per_ds = agg[am]
        variants = [v for v in VARIANTS if any(v in per_ds[d] for d in per_ds)]
        dss = [d for d in DATASETS if d in per_ds and "icl" in per_ds[d]
               and all(v in per_ds[d] for v in variants)]
        if len(variants) > 1 and dss:
            lines += [f"## Table 4 style: ablations on {am} ({', '.join(dss)})", "",
                      "| variant | " + " | ".join(dss) + " | average | Δ vs ICL, 95% CI | "
                      "paper (Falcon3-7B, 8 sets) |",
                      "|---|" + "---|" * (len(dss) + 3)]
            ia, _ = _avg_over_datasets(per_ds, "icl", "acc", dss)
            lines.append("| vanilla ICL | " + " | ".join(_fmt(_ms(per_ds[d]["icl"]["acc"])[0])
                                                        for d in dss)
                         + f" | {_fmt(ia)} | | {PAPER_T1['Falcon3-7B'][0]:.1f} |")
            summary["ablations"] = {"model": am, "datasets": dss, "icl": ia}
            for v in variants:
                a, sd = _avg_over_datasets(per_ds, v, "acc", dss)
                ci = _ci(per_ds, dss, v)
                lines.append(f"| {VARIANT_NAMES[v]} | " + " | ".join(
                    _fmt(*_ms(per_ds[d][v]["acc"])[:2]) for d in dss)
                    + f" | {_fmt(a, sd)} | {_delta(ia, a)}{'' if ci is None else ' ' + _fmt_ci(ci)} | "
                    f"{PAPER_T4[v]:.1f} |")
                summary["ablations"][v] = {"avg": a, "std": sd, "delta_ci95": ci}
            lines.append("")
    if settings:
        lines += ["## Settings of these cells", ""]
        for is_icl, s in sorted(settings.items()):
            lines.append(f"- {'ICL' if is_icl else 'ABFT'} cells: `{json.dumps(s)}`")
        lines.append("")
    text = "\n".join(lines)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "table.md").write_text(text)
    (Path(out) / "table.json").write_text(json.dumps(summary, indent=1))
    return text, summary


# ----------------------------------------------------------------------------- command line

def installed(model):
    """Local directories and names other than the packaged ones are always tried; packaged
    models only when their package is installed."""
    from abft_fast.hf.packaged import PACKAGED
    if model in PACKAGED:
        return importlib.util.find_spec(PACKAGED[model].module) is not None
    return True


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/results/reproduction")
    p.add_argument("--models", nargs="+", default=MODELS,
                   help="abft_fast.hf.packaged names or local HF model directories; packaged models "
                        "whose package is not installed are skipped")
    p.add_argument("--datasets", nargs="+", default=DATASETS, choices=DATASETS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--ablations", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                   help="ABFT variants; 'full' is ABFT itself, the rest are Table 4's")
    p.add_argument("--ablation-model", default=None, help="default: the first model")
    p.add_argument("--ablation-datasets", nargs="+", default=None, choices=DATASETS,
                   help="default: --datasets")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--eval-queries", type=int, default=512, help="x 2 demonstration samplings")
    p.add_argument("--robustness-queries", type=int, default=128,
                   help="queries for template / demonstration consistency (0 = skip)")
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--train-prompts", type=int, default=512)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--harness", default="abft", choices=["abft", "both"],
                   help="both: score every cell by StaICC's own harness too (a table of its own)")
    from abft_fast import BACKENDS
    p.add_argument("--backend", default="auto", choices=list(BACKENDS))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--no-progress", action="store_true", help="no per-cell tqdm bars")
    p.add_argument("--table-only", action="store_true")
    return p


def main(argv=None, runner=run_cell, log=None):
    args = parser().parse_args(argv)
    log = log or (lambda s: print(time.strftime("%H:%M:%S ") + s, flush=True))
    if not args.table_only:
        models = [m for m in args.models if installed(m)]
        for m in args.models:
            if m not in models:
                log(f"skipping {m}: its package is not installed")
        args.models = models
        args.ablation_model = args.ablation_model or (models[0] if models else None)
        args.ablation_datasets = args.ablation_datasets or args.datasets
        run_all(args, runner=runner, log=log)
    text, _ = make_table(args.out, args.ablation_model)
    log(f"table written to {Path(args.out) / 'table.md'}")
    return text


if __name__ == "__main__":
    print(main())
