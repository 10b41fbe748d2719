"""``abft-fast train | eval | demo``: ABFT on a causal LM and a StaICC data set, offline."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import asdict

from .. import BACKENDS

# The demo trains on 512 distinct prompts, each seen once (64 steps x 8), the setting measured to
# gain on SmolLM2-135M + SST-2 (docs/results/multi-query); timing in docs/abft.md.
DEMO = dict(train_prompts=512, steps=64, batch=8, micro_batch=4, lr=2e-5, eval_queries=100)
LR = 2e-5        # full W_Q / W_K (the paper's models up to 10B)
QLORA_LR = 1e-4  # LoRA on q/k over a 4-bit base (the paper's models above 10B)


def load_model(name, dtype="float32", load_in_4bit=False):
    """A local HF model directory, or a name known to ``abft_fast.hf.packaged`` (e.g. smollm2-135m),
    with the "abft_fast" attention implementation; ``load_in_4bit``: its linear layers in NF4
    (``abft_fast.hf.quant``; a packaged GGUF is de-quantised, then re-quantised)."""
    import torch
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if dt is None:
        raise ValueError(f"--dtype must be float32, bfloat16 or float16; got {dtype!r}")
    from ..hf.packaged import PACKAGED, load
    if load_in_4bit and name in PACKAGED:
        print(f"{name}: its GGUF is de-quantised to float32, then re-quantised to NF4 "
              "(--load-in-4bit)", flush=True)
    model, tok = load(name, dtype=dt, attn_implementation="abft_fast", load_in_4bit=load_in_4bit)
    return model, tok


def _parser():
    p = argparse.ArgumentParser(prog="abft-fast", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, demo=False):
        d = DEMO if demo else {}
        sp.add_argument("--model", default="smollm2-135m",
                        help="model name for abft_fast.hf.packaged, or a local HF model directory")
        sp.add_argument("--dataset", default="sst2",
                        help="sst2 | mr | fp | sst5 | trec | subj | emotion | hate")
        sp.add_argument("--k", type=int, default=4, help="demonstrations per prompt")
        sp.add_argument("--eval-queries", type=int, default=d.get("eval_queries", 512),
                        help="fixed StaICC test queries (x 2 demonstration samplings)")
        sp.add_argument("--robustness-queries", type=int, default=0,
                        help="queries for template / demonstration consistency (0 = skip)")
        sp.add_argument("--eval-batch", type=int, default=8)
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--backend", default="auto", choices=list(BACKENDS),
                        help="the attention op's engine (abft_fast.attention; README's engine "
                             "table)")
        sp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        sp.add_argument("--load-in-4bit", action="store_true",
                        help="QLoRA: the base model's linear layers in 4-bit NF4 (bitsandbytes, "
                             "double quantisation; compute in bfloat16 on a GPU, float32 on the "
                             "CPU); training then uses LoRA on q/k (r 16, lr 1e-4 by default)")
        sp.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
        sp.add_argument("--out", default=None, help="output directory (report.json, plots, weights)")
        sp.add_argument("--no-progress", action="store_true")
        sp.add_argument("--harness", default="abft", choices=["abft", "staicc", "both"],
                        help="who scores: abft-fast's evaluator (stripped trailing space, first "
                             "token of ' label', batched), StaICC's own harness (its prompts and "
                             "label tokens, one prompt at a time), or both; train and demo always "
                             "run abft-fast's (docs/abft.md)")

    def training(sp, demo=False):
        d = DEMO if demo else {}
        sp.add_argument("--train-prompts", type=int, default=d.get("train_prompts", 512))
        sp.add_argument("--steps", type=int, default=d.get("steps", 32))
        sp.add_argument("--batch", type=int, default=d.get("batch", 32),
                        help="pseudo-batch (samples per optimizer step)")
        sp.add_argument("--micro-batch", type=int, default=d.get("micro_batch", 4),
                        help="samples per forward (gradient accumulation = batch / micro-batch)")
        sp.add_argument("--lr", type=float, default=None,
                        help=f"learning rate (default {d.get('lr', LR):g}; with --load-in-4bit "
                             f"{QLORA_LR:g}, the paper's LoRA rate)")
        sp.add_argument("-A", "--a0", type=float, default=0.5, help="initial wrong-label weight A")
        sp.add_argument("-B", "--b", type=float, default=1.0, help="correct-label weight B")
        sp.add_argument("--lora", action=argparse.BooleanOptionalAction, default=None,
                        help="LoRA on q/k (peft) instead of full q/k (default: off; on with "
                             "--load-in-4bit, which refuses --no-lora)")
        sp.add_argument("--lora-r", type=int, default=16)
        sp.add_argument("--no-filter", action="store_true", help="count every head (no threshold)")
        sp.add_argument("--no-pid", action="store_true", help="keep A fixed")
        sp.add_argument("--multi-query", action="store_true",
                        help="beyond the paper: apply the loss at every demonstration's label "
                             "prediction row too, not only at the query (docs/abft.md)")
        sp.add_argument("--full-forward", action="store_true",
                        help="run the whole model in training (default: stop after the last "
                             "probed layer's attention)")
        sp.add_argument("--fsdp", action="store_true",
                        help="FSDP2: shard every decoder layer and the model over the processes "
                             "(torchrun; CPU/gloo or GPUs/NCCL); no --save-every / --resume")
        sp.add_argument("--fsdp-param-dtype", default="", choices=["", "bfloat16", "float16"],
                        help="with --fsdp: 16-bit parameters in forward / backward, float32 "
                             "gradient reductions (GPUs only; not run by this project)")
        sp.add_argument("--fsdp-cpu-offload", action="store_true",
                        help="with --fsdp: sharded parameters, gradients and optimiser state on "
                             "the CPU between uses (GPUs only; not run by this project)")
        sp.add_argument("--gradient-checkpointing", action="store_true",
                        help="HF activation checkpointing of every layer (non-reentrant)")
        sp.add_argument("--max-length", type=int, default=0,
                        help="longest prompt in tokens (0 = the model's context); longer prompts "
                             "lose leading demonstrations, never the query")
        sp.add_argument("--save-every", type=int, default=0,
                        help="write a training checkpoint every N steps into OUT/checkpoints")
        sp.add_argument("--resume", default=None,
                        help="continue from a training checkpoint (a step-* directory or the "
                             "checkpoints directory holding them: the newest)")
        sp.add_argument("--no-plots", action="store_true")

    tr = sub.add_parser("train", help="evaluate, train ABFT, evaluate again, write a report")
    common(tr)
    training(tr)
    ev = sub.add_parser("eval", help="evaluate a model (optionally with trained q/k weights)")
    common(ev)
    ev.add_argument("--weights", default=None, help="qk.safetensors written by train")
    ev.add_argument("--baseline", action="store_true",
                    help="with --weights: evaluate the model without them too, and print the "
                         "paired change (bootstrap interval, McNemar test)")
    ev.add_argument("--max-length", type=int, default=0,
                    help="longest prompt in tokens (0 = the model's context)")
    de = sub.add_parser("demo", help="ABFT on SmolLM2-135M + SST-2, 512 prompts seen once "
                                     "(about 6 min on 2 CPU cores)")
    common(de, demo=True)
    training(de, demo=True)
    return p


def _setup(args):
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    from .. import hf
    hf.set_backend(args.backend)
    for name in ("k", "eval_queries", "eval_batch"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")


_HARNESS = {"abft": "", "staicc": " (StaICC harness)"}


def _evaluations(args, model, tok, task, abft=True):
    """The evaluations --harness asks for (with ``abft``, abft-fast's evaluator always):
    ``{"abft": evaluate(...), "staicc": evaluate_staicc(...)}``."""
    from .evaluate import evaluate, evaluate_staicc
    out, prog = {}, not args.no_progress
    if abft or args.harness in ("abft", "both"):
        out["abft"] = evaluate(model, tok, task, args.eval_queries, args.eval_batch,
                               args.robustness_queries, progress=prog,
                               max_length=args.max_length)
    if args.harness in ("staicc", "both"):
        out["staicc"] = evaluate_staicc(model, tok, task, args.eval_queries, args.k, progress=prog)
    return out


def _paired(before, after):
    """Paired change of every harness evaluated both times: {harness: stats.paired dict}."""
    from .evaluate import compare
    return {h: compare(before[h], after[h]) for h in after if h in before}


def cmd_eval(args):
    from . import data
    from .stats import paired_line
    from .trainer import load_qk
    _setup(args)
    if args.baseline and not args.weights:
        raise SystemExit("--baseline compares with --weights: give both")
    model, tok = load_model(args.model, args.dtype, args.load_in_4bit)
    task = data.load_task(args.dataset, args.k)
    base = _evaluations(args, model, tok, task, abft=False) if args.baseline else None
    if args.weights:
        model = load_qk(model, args.weights)
    got = _evaluations(args, model, tok, task, abft=False)
    for h, r in got.items():
        f1 = f"  macro-F1 {r['macro_f1']:.4f}" if r.get("macro_f1") is not None else ""
        print(f"{task.name}{_HARNESS[h]}: accuracy {r['accuracy']:.4f}{f1}  "
              f"({r['n_prompts']} prompts, {r['seconds']:.0f} s)")
    if base is not None:
        for h, s in _paired(base, got).items():
            got[h]["accuracy_base"], got[h]["paired_vs_base"] = base[h]["accuracy"], s
            print(f"{task.name}{_HARNESS[h]}: without the weights {base[h]['accuracy']:.4f}, "
                  f"change {paired_line(s)}")
    res = dict(got["abft"]) if "abft" in got else got["staicc"]
    if "abft" in got and "staicc" in got:
        res["staicc"] = got["staicc"]
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "eval.json"), "w") as f:
            json.dump({"model": args.model, "dataset": task.name, "weights": args.weights,
                       "settings": vars(args), **res}, f, indent=1)
    return res


def cmd_train(args, title="ABFT"):
    """Evaluate, train, evaluate, write report.json + qk.safetensors (+ plots).

    Under several processes (``accelerate launch`` / ``torchrun``) every process trains its share
    of each step; the evaluations, the prints and every file are done by the main process only
    (the others wait), and the output directory is the main process's."""
    from accelerate.utils import broadcast_object_list

    from . import data, plots
    from .stats import paired_line
    from .trainer import TrainConfig, full_qk_state, is_sharded, make_accelerator, save_qk, train
    t_all = time.perf_counter()
    _setup(args)
    cfg = TrainConfig(k=args.k, train_prompts=args.train_prompts, steps=args.steps,
                      batch=args.batch, micro_batch=args.micro_batch, lr=args.lr, a0=args.a0,
                      b=args.b, use_filter=not args.no_filter, use_pid=not args.no_pid,
                      seed=args.seed, lora=args.lora, lora_r=args.lora_r,
                      stop_early=not args.full_forward,
                      gradient_checkpointing=args.gradient_checkpointing,
                      max_length=args.max_length,
                      multi_query=args.multi_query, fsdp=args.fsdp,
                      fsdp_param_dtype=args.fsdp_param_dtype,
                      fsdp_cpu_offload=args.fsdp_cpu_offload).check()
    if args.save_every < 0:
        raise SystemExit(f"--save-every must be >= 0; got {args.save_every}")
    acc = make_accelerator()
    main_proc = acc.is_main_process
    if (cfg.batch // cfg.micro_batch) % acc.num_processes:
        raise ValueError(f"batch / micro_batch = {cfg.batch // cfg.micro_batch} must be a "
                         f"multiple of the {acc.num_processes} processes")
    out = [args.out or os.path.join("runs", f"{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")]
    if acc.num_processes > 1:
        out = broadcast_object_list(out)  # one output directory: the main process's
    out = out[0]
    if main_proc:
        os.makedirs(out, exist_ok=True)

    def say(*a):
        if main_proc:
            print(*a, flush=True)

    t = time.perf_counter()
    model, tok = load_model(args.model, args.dtype, args.load_in_4bit)
    load_s = time.perf_counter() - t
    task = data.load_task(args.dataset, args.k)
    prog = not args.no_progress
    say(f"{title}: {args.model} on {task.name} ({len(task.label_words)} labels), "
        f"k={args.k}, {cfg.steps} steps x {cfg.batch} samples, lr {cfg.lr}"
        + (f", {'4-bit NF4 base + ' if args.load_in_4bit else ''}LoRA r {cfg.lora_r} on q/k"
           if cfg.lora else "")
        + (f", {acc.num_processes} processes" if acc.num_processes > 1 else ""))
    # Evaluation runs on the main process only (the others wait), except with sharded weights
    # (FSDP / DeepSpeed), where every forward is collective: then all processes evaluate the same
    # prompts and only the main process prints and writes.
    every = is_sharded(acc)
    before, evals_before = None, {}
    if main_proc or every:
        evals_before = _evaluations(args, model, tok, task)
        before = evals_before["abft"]
        for h, r in evals_before.items():
            say(f"accuracy before{_HARNESS[h]}: {r['accuracy']:.4f} ({r['n_prompts']} prompts)")
    acc.wait_for_everyone()
    res = train(model, tok, task, cfg, progress=prog, accelerator=acc,
                save_every=args.save_every, checkpoint_dir=os.path.join(out, "checkpoints"),
                resume=args.resume)
    model = res.model
    acc.wait_for_everyone()
    after = full = None
    if every or res.sharded:  # sharded weights: every forward is collective
        evals_after = _evaluations(args, model, tok, task)
        after = evals_after["abft"]
        full = full_qk_state(model)  # collective: all processes
    if not main_proc:
        return None
    if after is None:
        evals_after = _evaluations(args, model, tok, task)
        after = evals_after["abft"]
    # Paired uncertainty of every before/after change, on the same prompts (abft/stats.py).
    paired = _paired(evals_before, evals_after)
    for h, r in evals_after.items():
        say(f"accuracy after{_HARNESS[h]}:  {r['accuracy']:.4f} ({r['n_prompts']} prompts); "
            f"change {paired_line(paired[h])}")
    weights = os.path.join(out, "qk.safetensors")
    save_qk(model, weights, full=full)  # full: the gathered tensors when sharded
    steps_s = [h["seconds"] for h in res.history]
    report = {
        "model": args.model, "dataset": task.name, "staicc_dataset": task.staicc_name,
        "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
        "macro_f1_before": before["macro_f1"], "macro_f1_after": after["macro_f1"],
        # after - before on the same prompts: difference, seeded paired-bootstrap 95 % interval,
        # McNemar exact p; "paired" holds it per harness ("abft", and "staicc" if asked).
        "accuracy_change": paired["abft"], "paired": paired,
        "train_seconds": res.seconds, "mean_step_seconds": sum(steps_s) / len(steps_s),
        "model_load_seconds": load_s, "processes": acc.num_processes,
        "distributed_type": str(acc.distributed_type),
        "settings": {**asdict(cfg), **{
            k: v for k, v in vars(args).items() if k not in asdict(cfg) and k != "argv"}},
        "history": res.history, "eval_before": before, "eval_after": after,
        **({"staicc_accuracy_before": evals_before["staicc"]["accuracy"],
            "staicc_accuracy_after": evals_after["staicc"]["accuracy"],
            "staicc_before": evals_before["staicc"], "staicc_after": evals_after["staicc"]}
           if "staicc" in evals_after else {}),
        "weights": weights, "command": shlex.join(["abft-fast", *args.argv]),
    }
    if not getattr(args, "no_plots", False):
        plots.attention_mass(before["attention_mass"], after["attention_mass"],
                             os.path.join(out, "attention_mass.png"),
                             f"{args.model} / {task.name}: last-token attention on labels")
        plots.training_curve(res.history, os.path.join(out, "training.png"),
                             f"{args.model} / {task.name}")
    report["total_seconds"] = time.perf_counter() - t_all
    tmp = os.path.join(out, f".report.json.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, os.path.join(out, "report.json"))
    say(f"accuracy {before['accuracy']:.4f} -> {after['accuracy']:.4f} "
        f"({paired_line(paired['abft'])}); "
        f"train {res.seconds:.0f} s, total {report['total_seconds']:.0f} s; report in "
        f"{os.path.join(out, 'report.json')}")
    return report


def parse_args(argv):
    """The parsed command line with the defaults that depend on other flags filled in: with
    --load-in-4bit, LoRA on q/k (a 4-bit base cannot train) and lr QLORA_LR unless given."""
    args = _parser().parse_args(argv)
    args.argv = list(argv)  # the command as given, for the report
    if args.cmd == "eval":
        return args
    if args.load_in_4bit:
        if args.fsdp:
            raise SystemExit("--load-in-4bit with --fsdp: FSDP2 does not shard bitsandbytes 4-bit "
                             "weights here; use one process per GPU (DDP) or drop --fsdp")
        if args.lora is False:
            raise SystemExit("--load-in-4bit needs LoRA: the 4-bit base's W_Q / W_K cannot train, "
                             "only LoRA factors over them (QLoRA); drop --no-lora")
    args.lora = bool(args.lora) or args.load_in_4bit
    if args.lr is None:
        args.lr = QLORA_LR if args.load_in_4bit else (DEMO["lr"] if args.cmd == "demo" else LR)
    return args


def main(argv=None):
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.cmd == "eval":
        cmd_eval(args)
    elif args.cmd == "train":
        cmd_train(args)
    else:
        if args.out is None:
            args.out = os.path.join("runs", "demo")
        cmd_train(args, title="ABFT demo")
    return 0


if __name__ == "__main__":
    sys.exit(main())
