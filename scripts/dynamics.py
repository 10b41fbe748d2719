#!/usr/bin/env python
"""ABFT training dynamics: why the correct-label share of last-token label attention stays near 0.5.

Issue 18 ("Why the correct share stays near 0.5"). For one model, data set and k, this script

1. evaluates the model before training on StaICC's fixed test prompts (``--eval-queries`` queries
   x 2 demonstration samplings): accuracy, and per head (layer x head) the last token's attention
   on the demonstrations' correct / wrong labels, at three positions per demonstration: the
   token before the label (offset -1, ``:``), the label's first token (offset 0, what ABFT
   trains) and the token after it (offset +1, the separator ``\\n``), plus how often each head
   passes the induction-head filter S > T = k / (k + ln n);
2. measures, on ``--grad-samples`` training prompts, the gradients of the passing heads' summed
   correct mass (g_c) and wrong mass (g_w) with respect to W_Q / W_K, their cosine, and the
   first-order change of both masses along plain gradient descent and along Adam's first step
   (sign of the gradient) for several values of A (hypothesis a / b);
3. trains each ``--runs`` variant from the same start with the paper's loop (the loop of
   ``abft_fast.abft.trainer.train``, rebuilt here from the public pieces ``ProbeForward``,
   ``abft_loss``, ``PID``, ``freeze_all_but_qk`` and the data helpers, so that it can record per
   step the loss's A part ``A * wrong`` and B part ``B * (1 - correct)`` over the passing heads,
   which heads pass, and train on another label offset), evaluating at ``--eval-at`` steps, with
   paired uncertainty (``abft_fast.abft.stats.paired``) of every accuracy change.

Run specs: ``VARIANT[:key=value,...]``; variants: ``full`` (paper: A0 = 0.5, PID), ``a1`` / ``a2``
(A fixed at 1 / 2, no PID), ``pidfast`` (PID gains x 10), ``b0`` (B = 0), ``sep`` (the loss on the
token after each label instead of the label: ``label_offset = 1``); keys: any ``TrainConfig``
field (``lr``, ``steps``, ``a0``, ``use_pid``, ``cp``...) or ``label_offset``.

    python scripts/dynamics.py --dataset sst2 --runs full:lr=2e-5 full:lr=1e-4 --steps 32 \\
        --eval-at 8 16 32 --tag sst2-k4-lr
    python scripts/dynamics.py --summary          # markdown tables from every JSON written

Writes ``<out>/<tag>.json`` and ``<out>/<tag>-*.png``; the baseline evaluation is cached in
``<out>/baseline-<model>-<dataset>-k<k>-q<queries>.json`` and reused by later invocations.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

VARIANTS = {
    "full": {},
    "a1": {"a0": 1.0, "use_pid": False},
    "a2": {"a0": 2.0, "use_pid": False},
    "pidfast": {"cp": 0.3, "ci": 0.05, "cd": 0.05},
    "b0": {"b": 0.0},
    "sep": {"label_offset": 1},
}
OFFSETS = (-1, 0, 1)  # probed positions relative to each demonstration's label token
GRAD_A = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)


def _ratio(a, b):
    """a / b, or None (JSON null) when b is 0 (e.g. no head passes the filter)."""
    return a / b if b else None


# ----------------------------------------------------------------------------- run specs

def parse_run(spec: str, base: dict) -> dict:
    """``VARIANT[:k=v,...]`` -> {"name", "variant", "cfg" (TrainConfig kwargs), "label_offset"}."""
    from abft_fast.abft.config import TrainConfig
    variant, _, rest = spec.partition(":")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {sorted(VARIANTS)}")
    kw = dict(base)
    kw.update(VARIANTS[variant])
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for item in filter(None, rest.split(",")):
        key, _, val = item.partition("=")
        if key == "label_offset":
            kw[key] = int(val)
        elif key in fields:
            cur = getattr(TrainConfig(), key)
            if isinstance(cur, bool):
                kw[key] = val.lower() in ("1", "true", "yes")
            elif isinstance(cur, int):
                kw[key] = int(val)
            else:
                kw[key] = float(val)
        else:
            raise ValueError(f"run {spec!r}: {key!r} is not a TrainConfig field or label_offset")
    off = int(kw.pop("label_offset", 0))
    return {"name": spec, "variant": variant, "cfg": kw, "label_offset": off}


# ----------------------------------------------------------------------------- evaluation

def _shift(cols, offset):
    return torch.where(cols >= 0, cols + offset, cols)


@torch.no_grad()
def evaluate_heads(model, tok, task, prompts, label_ids, batch=8):
    """Accuracy and per-head label attention of the last token on ``prompts``.

    Returns a dict: ``correct`` (per prompt 0/1), ``predictions``, ``gold``, ``accuracy``;
    ``heads[offset]`` = {"correct": [L][H], "wrong": [L][H]} means over prompts of the last row's
    summed attention on the positions label + offset of demonstrations with the correct / a wrong
    label; ``pass_freq`` [L][H] the share of prompts on which the head passes the filter (at the
    label tokens); and the share statistics of ``shares``."""
    from abft_fast import hf
    from abft_fast.abft import data
    from abft_fast.abft.loss import threshold
    from abft_fast.abft.params import unwrap
    lm = unwrap(model)
    base = getattr(lm, lm.base_model_prefix)
    head = lm.get_output_embeddings()
    w = head.weight[torch.tensor(label_ids)]
    enc = data.encode(tok, prompts, max_length=data.context_length(lm, 0), truncate=True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    order = sorted(range(len(enc)), key=lambda i: len(enc[i].input_ids))
    logits = torch.zeros(len(enc), len(label_ids))
    per = {}
    # share statistics (label offset 0 and +1): sums over prompts and heads
    sh = {o: dict(c=0.0, w=0.0, base=0.0, pc=0.0, pw=0.0, pbase=0.0, pred_c=0.0, pred_base=0.0)
          for o in (0, 1)}
    n_lab = len(label_ids)
    # label 0 offset, all heads: per gold class (share, chance) and per label word (its share of
    # the label attention vs the share its demonstrations would get under uniform attention)
    by_gold = [dict(c=0.0, w=0.0, base=0.0, n=0) for _ in range(n_lab)]
    by_word = [dict(m=0.0, base=0.0) for _ in range(n_lab)]
    pass_cnt = None
    n_pass = 0.0
    lm.eval()
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        b = data.collate([enc[i] for i in idx], pad)
        nc = b.cols.shape[1]
        cols = torch.cat([_shift(b.cols, o) for o in OFFSETS], 1)
        with hf.probe(lm, rows=b.rows, cols=cols) as rec:
            h = base(input_ids=b.input_ids, attention_mask=b.attention_mask,
                     use_cache=False).last_hidden_state
        last = h.gather(1, b.rows[:, :, None].expand(-1, 1, h.shape[-1]))[:, 0]
        z = (last.to(w.dtype) @ w.T).float()
        logits[torch.tensor(idx)] = z
        pred = z.argmax(1)
        p = rec.probs.float().sum(3)  # [L, B, H, 3C]
        valid = b.cols >= 0
        pos = (b.correct & valid).float()
        neg = (~b.correct & valid).float()
        k = valid.sum(1).float()
        chance = pos.sum(1) / k.clamp(min=1)  # share if label attention were uniform
        demo_lab = torch.tensor([[*e.demo_labels, *([-1] * (nc - len(e.demo_labels)))]
                                 for e in (enc[i] for i in idx)])
        is_pred = ((demo_lab == pred[:, None]) & valid).float()
        pred_chance = is_pred.sum(1) / k.clamp(min=1)
        thr = threshold(k, b.lengths.clamp(min=2)).float()
        for j, o in enumerate(OFFSETS):
            po = p[..., j * nc:(j + 1) * nc]
            mc = (po * pos[None, :, None]).sum(-1)  # [L, B, H]
            mw = (po * neg[None, :, None]).sum(-1)
            if o not in per:
                per[o] = [torch.zeros(mc.shape[0], mc.shape[2]), torch.zeros(mc.shape[0], mc.shape[2])]
            per[o][0] += mc.sum(1)
            per[o][1] += mw.sum(1)
            if o == 0:
                s0 = mc + mw
                for c in range(n_lab):
                    sel = b.query_label == c
                    if sel.any():
                        g = by_gold[c]
                        g["c"] += float(mc[:, sel].sum())
                        g["w"] += float(mw[:, sel].sum())
                        g["base"] += float((s0[:, sel] * chance[sel][None, :, None]).sum())
                        g["n"] += int(sel.sum())
                    is_c = ((demo_lab == c) & valid).float()
                    by_word[c]["m"] += float((po * is_c[None, :, None]).sum())
                    by_word[c]["base"] += float(
                        (s0 * (is_c.sum(1) / k.clamp(min=1))[None, :, None]).sum())
                mask = ((mc + mw) > thr[None, :, None]).float()
                pass_cnt = mask.sum(1) if pass_cnt is None else pass_cnt + mask.sum(1)
                n_pass += float(mask.sum())
            if o in sh:
                mask0 = ((p[..., nc:2 * nc] * valid[None, :, None]).sum(-1)
                         > thr[None, :, None]).float()  # passing at the label tokens
                s_ = mc + mw
                mp = (po * is_pred[None, :, None]).sum(-1)
                d = sh[o]
                d["c"] += float(mc.sum())
                d["w"] += float(mw.sum())
                d["base"] += float((s_ * chance[None, :, None]).sum())
                d["pc"] += float((mc * mask0).sum())
                d["pw"] += float((mw * mask0).sum())
                d["pbase"] += float((s_ * mask0 * chance[None, :, None]).sum())
                d["pred_c"] += float(mp.sum())
                d["pred_base"] += float((s_ * pred_chance[None, :, None]).sum())
    n = len(enc)
    pred = logits.argmax(1).tolist()
    gold = [e.query_label for e in enc]
    correct = [int(a == g) for a, g in zip(pred, gold)]
    shares = {}
    for o, d in sh.items():
        tot_m = d["c"] + d["w"]
        ptot = d["pc"] + d["pw"]
        shares[str(o)] = {
            "share_all_heads": _ratio(d["c"], tot_m),
            "chance_all_heads": _ratio(d["base"], tot_m),
            "share_passing_heads": _ratio(d["pc"], ptot),
            "chance_passing_heads": _ratio(d["pbase"], ptot),
            "share_on_predicted_label": _ratio(d["pred_c"], tot_m),
            "chance_predicted_label": _ratio(d["pred_base"], tot_m),
        }
    tot0 = sh[0]["c"] + sh[0]["w"]
    shares["by_gold_class"] = [{"prompts": g["n"], "share": _ratio(g["c"], g["c"] + g["w"]),
                                "chance": _ratio(g["base"], g["c"] + g["w"])} for g in by_gold]
    shares["by_label_word"] = [{"share": _ratio(w_["m"], tot0), "chance": _ratio(w_["base"], tot0)}
                               for w_ in by_word]
    heads = {str(o): {"correct": (v[0] / n).tolist(), "wrong": (v[1] / n).tolist()}
             for o, v in per.items()}
    sums = {str(o): {"correct": float(v[0].sum() / n), "wrong": float(v[1].sum() / n)}
            for o, v in per.items()}
    return {"n_prompts": n, "accuracy": sum(correct) / n, "correct": correct, "predictions": pred,
            "gold": gold, "prediction_counts": [pred.count(c) for c in range(len(label_ids))],
            "heads": heads, "mass_sums": sums, "shares": shares,
            "pass_freq": (pass_cnt / n).tolist(), "passing_heads_per_prompt": n_pass / n}


def passing_set(ev, min_freq=0.5):
    return [[i, j] for i, row in enumerate(ev["pass_freq"]) for j, f in enumerate(row) if f >= min_freq]


# ----------------------------------------------------------------------------- gradients

def _masses(probs, b):
    """Differentiable passing-head masses: (sum of m_pos over passing heads, same of m_neg,
    number of samples); the filter as in ``abft_loss`` (mask from the detached masses)."""
    from abft_fast.abft.loss import abft_loss
    valid = b.cols >= 0
    out = abft_loss(probs, b.correct, valid, b.lengths, A=1.0, B=1.0)
    p = probs.sum(3)
    m_pos = (p * (b.correct & valid).to(p.dtype)[None, :, None]).sum(-1)
    m_neg = (p * (~b.correct & valid).to(p.dtype)[None, :, None]).sum(-1)
    mask = out.head_mask.to(p.dtype)
    return (m_pos * mask).sum(), (m_neg * mask).sum(), out


def gradient_analysis(model, tok, task, k, n, seed, label_ids, micro=4, label_offset=0):
    """Gradients of the passing heads' correct mass (g_c) and wrong mass (g_w) over ``n``
    training prompts (seed + 1000, disjoint draw from the run's own prompts is not guaranteed but
    the pool is the same), w.r.t. the trainable W_Q / W_K; first-order mass changes per A."""
    from abft_fast.abft import data
    from abft_fast.abft.objective import ProbeForward
    from abft_fast.abft.params import freeze_all_but_qk, unwrap
    freeze_all_but_qk(model)
    lm = unwrap(model)
    named = [(nm, p) for nm, p in lm.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    prompts = data.training_prompts(task, n, k, seed + 1000)
    enc = data.encode(tok, prompts, label_ids=label_ids,
                      max_length=data.context_length(lm, 0), truncate=True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    obj = ProbeForward(model, True)
    obj.eval()
    gc = [torch.zeros_like(p) for p in params]
    gw = [torch.zeros_like(p) for p in params]
    C = W = passing = 0.0
    for s in range(0, n, micro):
        b = data.collate(enc[s:s + micro], pad)
        cols = _shift(b.cols, label_offset)
        probs = obj(b.input_ids, b.attention_mask, b.rows, cols)
        c, w, out = _masses(probs, b)
        g1 = torch.autograd.grad(c, params, retain_graph=True, allow_unused=True)
        g2 = torch.autograd.grad(w, params, allow_unused=True)
        for acc, g in zip(gc, g1):
            if g is not None:
                acc += g
        for acc, g in zip(gw, g2):
            if g is not None:
                acc += g
        C += float(c.detach())
        W += float(w.detach())
        passing += float(out.passing.sum())
    vc = torch.cat([g.flatten() for g in gc]).double() / n
    vw = torch.cat([g.flatten() for g in gw]).double() / n
    C, W = C / n, W / n

    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()).clamp(min=1e-30))

    res = {"samples": n, "label_offset": label_offset, "passing_heads_per_sample": passing / n,
           "passing_correct_mass": C, "passing_wrong_mass": W,
           "passing_share": _ratio(C, C + W),
           "cos_gc_gw": cos(vc, vw), "norm_gc": float(vc.norm()), "norm_gw": float(vw.norm()),
           "a_star_gd": float(vc @ vw / (vw @ vw).clamp(min=1e-30)), "per_A": []}
    # share rises to first order iff dC / C > dW / W
    for a in GRAD_A:
        gl = a * vw - vc  # gradient of the loss (B = 1) summed over passing heads
        row = {"A": a}
        for name, d in (("gd", -gl / gl.norm().clamp(min=1e-30)),
                        ("adam_first_step", -torch.sign(gl) / math.sqrt(gl.numel()))):
            dc, dw = float(vc @ d), float(vw @ d)
            row[name] = {"d_correct": dc, "d_wrong": dw,
                         "d_share": _ratio(dc * W - dw * C, (C + W) ** 2)}
        res["per_A"].append(row)
    # per layer: cosine of g_c and g_w restricted to that layer's q/k parameters
    layers = {}
    off = 0
    for nm, p in named:
        num = p.numel()
        li = next((int(t) for t in nm.split(".") if t.isdigit()), -1)
        layers.setdefault(li, []).append((off, off + num))
        off += num
    per_layer = []
    for li in sorted(layers):
        sel = torch.cat([torch.arange(a, b_) for a, b_ in layers[li]])
        a_, b2 = vc[sel], vw[sel]
        per_layer.append({"layer": li, "cos": cos(a_, b2), "norm_gc": float(a_.norm()),
                          "norm_gw": float(b2.norm())})
    res["per_layer"] = per_layer
    model.zero_grad(set_to_none=True)
    return res


# ----------------------------------------------------------------------------- training

class Order:
    """The trainer's data order (reshuffled permutations, drawn from the end)."""

    def __init__(self, n, seed):
        self.n, self.rng, self.order = n, random.Random(seed), []

    def take(self, k):
        out = []
        while len(out) < k:
            if not self.order:
                self.order = list(range(self.n))
                self.rng.shuffle(self.order)
            out.append(self.order.pop())
        return out


def train_run(model, tok, task, cfg, label_offset=0, on_eval=None, eval_at=(), progress=True):
    """The paper's ABFT loop (as ``trainer.train`` runs it on one process) with per-step records
    of the loss split and the passing heads. ``on_eval(step)`` is called after steps in
    ``eval_at``. Returns the history (list of dicts)."""
    from accelerate.utils import set_seed

    from abft_fast.abft import data
    from abft_fast.abft.loss import abft_loss
    from abft_fast.abft.objective import ProbeForward
    from abft_fast.abft.params import freeze_all_but_qk
    from abft_fast.abft.pid import PID
    from abft_fast.abft.trainer import encode_training_prompts
    cfg.check()
    set_seed(cfg.seed)
    freeze_all_but_qk(model)
    encoded, pad = encode_training_prompts(model, tok, task, cfg)
    n_micro = cfg.batch // cfg.micro_batch
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    order = Order(len(encoded), cfg.seed)
    pid = PID(cfg.a0, cfg.cp, cfg.ci, cfg.cd, enabled=cfg.use_pid)
    obj = ProbeForward(model, cfg.stop_early)
    obj.eval()
    a = pid.a
    hist = []
    for step in range(1, cfg.steps + 1):
        ts = time.perf_counter()
        items = sorted((encoded[i] for i in order.take(cfg.batch)), key=lambda e: len(e.input_ids))
        r = dict(loss=0.0, a_part=0.0, b_part=0.0, passing=0.0, pc=0.0, pw=0.0, pbase=0.0,
                 c_all=0.0, w_all=0.0)
        freq = None
        for j in range(n_micro):
            b = data.collate(items[j * cfg.micro_batch:(j + 1) * cfg.micro_batch], pad)
            cols = _shift(b.cols, label_offset)
            probs = obj(b.input_ids, b.attention_mask, b.rows, cols)
            valid = b.cols >= 0
            out = abft_loss(probs, b.correct, valid, b.lengths, A=a, B=cfg.b,
                            use_filter=cfg.use_filter)
            (out.loss / n_micro).backward()
            m = out.head_mask.double()
            mc, mw = out.mass_correct.double(), out.mass_wrong.double()
            nb = b.input_ids.shape[0]
            chance = (b.correct & valid).sum(1).double() / valid.sum(1).clamp(min=1)
            r["loss"] += out.loss.item() * nb
            r["a_part"] += float(a * (mw * m).sum())
            r["b_part"] += float(cfg.b * ((1 - mc) * m).sum())
            r["passing"] += float(m.sum())
            r["pc"] += float((mc * m).sum())
            r["pw"] += float((mw * m).sum())
            r["pbase"] += float(((mc + mw) * m * chance[None, :, None]).sum())
            r["c_all"] += float(mc.sum())
            r["w_all"] += float(mw.sum())
            f = m.sum(1)
            freq = f if freq is None else freq + f
            del probs, out
        opt.step()
        opt.zero_grad(set_to_none=True)
        nb = cfg.batch
        ptot = r["pc"] + r["pw"]
        rec = {"step": step, "A": a, "loss": r["loss"] / nb, "a_part": r["a_part"] / nb,
               "b_part": r["b_part"] / nb, "passing_heads": r["passing"] / nb,
               "passing_correct_mass": r["pc"] / nb, "passing_wrong_mass": r["pw"] / nb,
               "passing_share": _ratio(r["pc"], ptot),
               "passing_chance_share": _ratio(r["pbase"], ptot),
               "mass_correct_all": r["c_all"] / nb, "mass_wrong_all": r["w_all"] / nb,
               "pass_freq": (freq / nb).tolist(), "seconds": time.perf_counter() - ts}
        hist.append(rec)
        a = pid.update(rec["passing_heads"])
        if progress:
            print(f"  step {step}: loss {rec['loss']:.3f} (A part {rec['a_part']:.3f}, B part "
                  f"{rec['b_part']:.3f}) A {rec['A']:.3f} passing {rec['passing_heads']:.1f} "
                  f"share {rec['passing_share']:.3f} ({rec['seconds']:.1f}s)", flush=True)
        if step in eval_at and on_eval is not None:
            on_eval(step)
    return hist


# ----------------------------------------------------------------------------- plots

def _plot_heads(path, before, after, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    cols = [("correct", "correct-label mass"), ("wrong", "wrong-label mass")]
    fig, axes = plt.subplots(2, 4, figsize=(16, 9), sharey=True)
    vmax = max(float(np.max(ev["heads"]["0"][c])) for ev in (before, after) for c, _ in cols)
    for r, (ev, lab) in enumerate(((before, "before"), (after, "after"))):
        for c, (key, name) in enumerate(cols):
            ax = axes[r, c]
            im = ax.imshow(np.array(ev["heads"]["0"][key]), aspect="auto", vmin=0, vmax=vmax,
                           cmap="viridis")
            ax.set_title(f"{lab}: {name}")
            fig.colorbar(im, ax=ax)
        mc, mw = np.array(ev["heads"]["0"]["correct"]), np.array(ev["heads"]["0"]["wrong"])
        share = mc / np.maximum(mc + mw, 1e-12)
        im = axes[r, 2].imshow(share, aspect="auto", vmin=0.3, vmax=0.7, cmap="coolwarm")
        axes[r, 2].set_title(f"{lab}: correct share")
        fig.colorbar(im, ax=axes[r, 2])
        im = axes[r, 3].imshow(np.array(ev["pass_freq"]), aspect="auto", vmin=0, vmax=1,
                               cmap="Greys")
        axes[r, 3].set_title(f"{lab}: filter pass frequency")
        fig.colorbar(im, ax=axes[r, 3])
    for ax in axes.flat:
        ax.set_xlabel("head")
    for ax in axes[:, 0]:
        ax.set_ylabel("layer")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _plot_delta(path, before, after, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    dc = np.array(after["heads"]["0"]["correct"]) - np.array(before["heads"]["0"]["correct"])
    dw = np.array(after["heads"]["0"]["wrong"]) - np.array(before["heads"]["0"]["wrong"])
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(dw.flatten(), dc.flatten(), s=8)
    lim = max(abs(dc).max(), abs(dw).max()) * 1.05 + 1e-9
    ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.8)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_xlabel("change of wrong-label mass (per head)")
    ax.set_ylabel("change of correct-label mass (per head)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _plot_training(path, runs):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for name, run in runs.items():
        h = run["history"]
        s = [x["step"] for x in h]
        line, = axes[0].plot(s, [x["b_part"] for x in h], label=f"{name} B part")
        axes[0].plot(s, [x["a_part"] for x in h], "--", color=line.get_color(), label=f"{name} A part")
        axes[1].plot(s, [x["A"] for x in h], label=name)
        axes[2].plot(s, [x["passing_heads"] for x in h], label=name)
        axes[3].plot(s, [float("nan") if x["passing_share"] is None
                         else x["passing_share"] - x["passing_chance_share"] for x in h], label=name)
    for ax, t in zip(axes, ("loss parts per sample (solid B, dashed A)", "A (PID)",
                            "passing heads per sample", "passing-head correct share - chance")):
        ax.set_title(t)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=6)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _plot_positions(path, ev, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, ax = plt.subplots(figsize=(7, 4))
    for o, name in zip(OFFSETS, ("token before label (':')", "label token", "token after label")):
        m = np.array(ev["heads"][str(o)]["correct"]) + np.array(ev["heads"][str(o)]["wrong"])
        ax.plot(m.sum(1), label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel("last-token attention, summed over heads")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------- summary

def compact_eval(ev):
    """An evaluation without the per-prompt lists and per-head arrays (for tables)."""
    return {k: v for k, v in ev.items() if k not in ("correct", "predictions", "gold", "heads",
                                                      "pass_freq")}


def _f(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def summary(out: Path) -> str:
    lines = ["| file | run | step | acc before | acc after | paired change (95% CI), McNemar p | "
             "share all (chance) | share passing (chance) | share on predicted (chance) | passing/prompt | "
             "label mass c / w |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for f in sorted(out.glob("*.json")):
        if f.name.startswith("baseline-"):
            continue
        d = json.loads(f.read_text())
        bs = d["baseline"]
        s0 = bs["shares"]["0"]
        lines.append(f"| {f.stem} | before | 0 | {bs['accuracy']:.3f} | | | "
                     f"{_f(s0['share_all_heads'])} ({_f(s0['chance_all_heads'])}) | "
                     f"{_f(s0['share_passing_heads'])} ({_f(s0['chance_passing_heads'])}) | "
                     f"{_f(s0['share_on_predicted_label'])} ({_f(s0['chance_predicted_label'])}) | "
                     f"{bs['passing_heads_per_prompt']:.1f} | {bs['mass_sums']['0']['correct']:.2f}"
                     f" / {bs['mass_sums']['0']['wrong']:.2f} |")
        for name, run in d["runs"].items():
            for step, ev in run["evals"].items():
                p = run["paired"][step]
                s = ev["shares"]["0"]
                lines.append(
                    f"| {f.stem} | {name} | {step} | {p['accuracy_before']:.3f} | "
                    f"{p['accuracy_after']:.3f} | {p['diff'] * 100:+.1f} [{p['ci_low'] * 100:+.1f}, "
                    f"{p['ci_high'] * 100:+.1f}], p = {p['mcnemar_p']:.2g} | "
                    f"{_f(s['share_all_heads'])} ({_f(s['chance_all_heads'])}) | "
                    f"{_f(s['share_passing_heads'])} ({_f(s['chance_passing_heads'])}) | "
                    f"{_f(s['share_on_predicted_label'])} ({_f(s['chance_predicted_label'])}) | "
                    f"{ev['passing_heads_per_prompt']:.1f} | {ev['mass_sums']['0']['correct']:.2f} / "
                    f"{ev['mass_sums']['0']['wrong']:.2f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dataset", default="sst2")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--runs", nargs="*", default=["full"], help="VARIANT[:key=value,...]")
    ap.add_argument("--train-prompts", type=int, default=128)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-queries", type=int, default=50, help="x 2 demonstration samplings")
    ap.add_argument("--eval-batch", type=int, default=8)
    ap.add_argument("--eval-at", type=int, nargs="*", default=[],
                    help="extra steps to evaluate at (the last step always is)")
    ap.add_argument("--grad-samples", type=int, default=0,
                    help="training prompts for the gradient analysis before training (0: skip)")
    ap.add_argument("--grad-after", action="store_true",
                    help="repeat the gradient analysis after each run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--out", default="docs/results/dynamics")
    ap.add_argument("--tag", default=None, help="output file stem (default: dataset-kK)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--summary", action="store_true", help="print the tables of --out and exit")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.summary:
        print(summary(out))
        return 0
    torch.set_num_threads(args.threads)
    from abft_fast import hf
    from abft_fast.abft import data, stats
    from abft_fast.abft.config import TrainConfig
    from abft_fast.hf import packaged
    hf.set_backend(args.backend)
    out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or f"{args.dataset}-k{args.k}"
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    base_cfg = dict(k=args.k, train_prompts=args.train_prompts, steps=args.steps, batch=args.batch,
                    micro_batch=args.micro_batch, lr=args.lr, seed=args.seed)
    runs = [parse_run(s, base_cfg) for s in args.runs]
    task = data.load_task(args.dataset, k=args.k)
    prompts = data.eval_prompts(task, args.eval_queries)

    def load():
        model, tok = packaged.load(args.model, attn_implementation="abft_fast")
        return model, tok

    model, tok = load()
    label_ids = data.label_token_ids(tok, task.label_words, task.template.label_prefix)
    t0 = time.perf_counter()
    mname = Path(args.model).name
    bpath = out / f"baseline-{mname}-{args.dataset}-k{args.k}-q{args.eval_queries}.json"
    if bpath.exists():
        baseline = json.loads(bpath.read_text())
        log(f"baseline from {bpath}")
    else:
        baseline = evaluate_heads(model, tok, task, prompts, label_ids, args.eval_batch)
        bpath.write_text(json.dumps(baseline))
    log(f"before: accuracy {baseline['accuracy']:.3f}, shares {baseline['shares']['0']}")
    res = {"command": " ".join(["python", "scripts/dynamics.py", *(argv if argv is not None
                                                                    else sys.argv[1:])]),
           "model": args.model, "dataset": args.dataset, "k": args.k,
           "eval_queries": args.eval_queries, "label_words": task.label_words,
           "layers_heads": [len(baseline["pass_freq"]), len(baseline["pass_freq"][0])],
           "baseline": baseline, "baseline_passing_set": passing_set(baseline), "runs": {},
           "threads": args.threads}
    if args.grad_samples:
        ts = time.perf_counter()
        res["gradient_before"] = gradient_analysis(model, tok, task, args.k, args.grad_samples,
                                                   args.seed, label_ids, args.micro_batch)
        res["gradient_before"]["seconds"] = time.perf_counter() - ts
        log("gradient analysis:", {k: v for k, v in res["gradient_before"].items()
                                   if k not in ("per_layer",)})
    fresh = False
    for run in runs:
        if fresh:
            model, tok = load()
        fresh = True
        cfg = TrainConfig(**run["cfg"])
        log(f"run {run['name']}: {run['cfg']} label_offset {run['label_offset']}")
        evals, paired = {}, {}

        def on_eval(step, model=model, tok=tok, evals=evals, paired=paired):
            ev = evaluate_heads(model, tok, task, prompts, label_ids, args.eval_batch)
            evals[str(step)] = ev
            paired[str(step)] = stats.paired(baseline["correct"], ev["correct"])
            log(f"  eval at step {step}: accuracy {ev['accuracy']:.3f} "
                f"({stats.paired_line(paired[str(step)])}), shares {ev['shares']['0']}")

        ts = time.perf_counter()
        hist = train_run(model, tok, task, cfg, run["label_offset"], on_eval,
                         set(args.eval_at) | {cfg.steps}, progress=not args.quiet)
        rec = {"config": dataclasses.asdict(cfg), "label_offset": run["label_offset"],
               "history": hist, "evals": evals, "paired": paired,
               "seconds": time.perf_counter() - ts}
        last = evals[str(cfg.steps)]
        rec["passing_set_after"] = passing_set(last)
        if args.grad_after:
            rec["gradient_after"] = gradient_analysis(model, tok, task, args.k, args.grad_samples or 8,
                                                      args.seed, label_ids, args.micro_batch)
        res["runs"][run["name"]] = rec
        if not args.no_plots:
            safe = run["name"].replace(":", "_").replace(",", "_").replace("=", "")
            _plot_heads(out / f"{tag}-{safe}-heads.png", baseline, last,
                        f"{args.model} {args.dataset} k={args.k}: {run['name']}, label token, "
                        f"{baseline['n_prompts']} eval prompts")
            _plot_delta(out / f"{tag}-{safe}-delta.png", baseline, last,
                        f"{args.dataset} {run['name']}: per-head change, step {cfg.steps}")
    res["seconds"] = time.perf_counter() - t0
    if not args.no_plots:
        if res["runs"]:
            _plot_training(out / f"{tag}-training.png", res["runs"])
        _plot_positions(out / f"{tag}-positions.png", baseline,
                        f"{args.model} {args.dataset} k={args.k}, before ABFT")
    (out / f"{tag}.json").write_text(json.dumps(res, indent=None))
    log(f"wrote {out / (tag + '.json')} in {res['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
