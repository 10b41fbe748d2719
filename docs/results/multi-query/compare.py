"""Single-query (the paper's) vs multi-query ABFT at equal training prompts on SmolLM2-135M.

Both runs start from the same weights, train on the same prompts in the same order (same seed,
same config except ``multi_query``), and are scored on the same fixed evaluation prompts with
the project's evaluator (``evaluate.score_prompts``: first token of " <label>", last position),
so every comparison is paired per prompt (``abft.stats.paired``: bootstrap interval, McNemar).

    .venv/bin/python docs/results/multi-query/compare.py --out docs/results/multi-query/run
    .venv/bin/python docs/results/multi-query/compare.py --time-steps 2   # time steps only
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch


def share(mass):
    c, w = sum(mass["correct"]), sum(mass["wrong"])
    return {"mass_correct": c, "mass_wrong": w, "share": c / (c + w) if c + w > 0 else None}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="sst2")
    ap.add_argument("--train-prompts", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--eval-queries", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--time-steps", type=int, default=0,
                    help="only time this many steps of each variant (no evaluation)")
    ap.add_argument("--out", default="docs/results/multi-query/run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import abft_fast.hf as ah
    from abft_fast.abft import data, stats
    from abft_fast.abft.evaluate import score_prompts
    from abft_fast.abft.trainer import TrainConfig, train
    from abft_fast.hf.packaged import load
    ah.set_backend("torch")

    t0 = time.perf_counter()
    model, tok = load(args.model, dtype=torch.float32, attn_implementation="abft_fast")
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    task = data.load_task(args.dataset, 4)
    label_ids = data.label_token_ids(tok, task.label_words, task.template.label_prefix)
    prompts = data.eval_prompts(task, args.eval_queries)
    gold = [p.query_label for p in prompts]
    print(f"loaded in {time.perf_counter() - t0:.0f} s; {len(prompts)} eval prompts", flush=True)

    def evaluate(name):
        ts = time.perf_counter()
        logits, mass = score_prompts(model, tok, prompts, label_ids, batch=8, progress=False)
        pred = logits.argmax(1).tolist()
        ok = [p == g for p, g in zip(pred, gold)]
        unseen = [c for c, p in zip(ok, prompts) if p.query_label not in p.demo_labels]
        r = {"accuracy": sum(ok) / len(ok), "correct": ok, "predictions": pred,
             "unseen_label_accuracy": sum(unseen) / len(unseen) if unseen else None,
             "unseen_label_prompts": len(unseen), "attention_mass": mass, **share(mass),
             "seconds": time.perf_counter() - ts}
        print(f"{name}: accuracy {r['accuracy']:.4f}, correct share {r['share']:.4f} "
              f"({r['seconds']:.0f} s)", flush=True)
        return r

    res = {"args": vars(args), "n_eval_prompts": len(prompts)}
    os.makedirs(args.out, exist_ok=True)

    def dump():
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump(res, f, indent=1)

    if not args.time_steps:
        res["base"] = evaluate("base")
        dump()
    for mq in (False, True):
        name = "multi" if mq else "single"
        model.load_state_dict(init)
        steps = args.time_steps or args.steps
        cfg = TrainConfig(train_prompts=args.train_prompts, steps=steps, batch=args.batch,
                          micro_batch=args.micro_batch, lr=args.lr, seed=args.seed,
                          multi_query=mq)
        tr = train(model, tok, task, cfg, progress=False)
        secs = [h["seconds"] for h in tr.history]
        print(f"{name}: {steps} steps, {tr.seconds:.1f} s, per step {secs}", flush=True)
        res[name] = {"history": tr.history, "train_seconds": tr.seconds}
        if not args.time_steps:
            res[name].update(evaluate(name))
        dump()
    if not args.time_steps:
        b, s, m = (res[k]["correct"] for k in ("base", "single", "multi"))
        res["paired"] = {"single_vs_base": stats.paired(b, s), "multi_vs_base": stats.paired(b, m),
                         "multi_vs_single": stats.paired(s, m)}
        for k, v in res["paired"].items():
            print(f"{k}: {stats.paired_line(v)}", flush=True)
    dump()
    print(f"total {time.perf_counter() - t0:.0f} s -> {args.out}/result.json", flush=True)


if __name__ == "__main__":
    main()
