"""ICL evaluation on StaICC's fixed test inputs: accuracy, macro-F1, robustness, unseen labels.

Only the prompt's last position is scored, and only against the label tokens: the decoder's final
hidden state at that position times the LM-head rows of the label tokens. The same forward records
(through ``abft_fast.hf`` probes) the last row's attention mass on correct vs wrong demonstration
labels per layer, for the plots.
"""
from __future__ import annotations

import time
from collections import Counter

import torch

from .. import hf
from . import data
from .params import unwrap


def _decoder_and_head(model):
    lm = unwrap(model)
    base = getattr(lm, lm.base_model_prefix, None)
    head = lm.get_output_embeddings()
    if base is None or head is None:
        raise ValueError(f"{type(lm).__name__}: need a causal LM with a base model and an LM head")
    return lm, base, head


@torch.no_grad()
def score_prompts(model, tokenizer, prompts, label_ids, batch=8, probe=True, progress=True,
                  desc="eval", max_length=0):
    """Label logits at the last position for each prompt.

    Prompts longer than ``max_length`` tokens (0: the model's context) lose leading
    demonstrations (see ``data.encode``), as in training.

    Returns (logits [N, n_labels] float32, mass dict or None) where mass has per-layer means over
    heads and prompts of the last row's attention on correct / wrong demonstration labels.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1; got {batch}")
    lm, base, head = _decoder_and_head(model)
    device = next(lm.parameters()).device
    w = head.weight[torch.tensor(label_ids, device=device)]
    bias = getattr(head, "bias", None)
    if bias is not None:
        bias = bias[torch.tensor(label_ids, device=device)]
    cap = getattr(lm.config, "final_logit_softcapping", None)
    enc = data.encode(tokenizer, prompts, max_length=data.context_length(lm, max_length),
                      truncate=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(enc)), key=lambda i: len(enc[i].input_ids))
    logits = torch.zeros(len(enc), len(label_ids))
    m_pos = m_neg = None
    n_pos = n_neg = 0
    was_training = lm.training
    lm.eval()
    from tqdm.auto import tqdm
    try:
        for s in tqdm(range(0, len(order), batch), desc=desc, unit="batch", disable=not progress):
            idx = order[s:s + batch]
            b = data.collate([enc[i] for i in idx], pad).to(device)
            if probe:
                with hf.probe(lm, rows=b.rows, cols=b.cols) as rec:
                    h = base(input_ids=b.input_ids, attention_mask=b.attention_mask,
                             use_cache=False).last_hidden_state
                p = rec.probs.float().sum(3)  # [layers, B, H, C]
                valid = b.cols >= 0
                pos = (b.correct & valid).float()[None, :, None, :]
                neg = (~b.correct & valid).float()[None, :, None, :]
                mp = (p * pos).sum(-1).mean(2).sum(1).cpu()  # [layers], summed over samples
                mn = (p * neg).sum(-1).mean(2).sum(1).cpu()
                m_pos = mp if m_pos is None else m_pos + mp
                m_neg = mn if m_neg is None else m_neg + mn
                n_pos += int((b.correct & valid).any(1).sum())
                n_neg += int((~b.correct & valid).any(1).sum())
            else:
                h = base(input_ids=b.input_ids, attention_mask=b.attention_mask,
                         use_cache=False).last_hidden_state
            last = h.gather(1, b.rows[:, :, None].expand(-1, 1, h.shape[-1]))[:, 0]
            z = last.to(w.dtype) @ w.T
            if bias is not None:
                z = z + bias
            if cap:
                z = torch.tanh(z / cap) * cap
            logits[torch.tensor(idx)] = z.float().cpu()
    finally:
        lm.train(was_training)
    mass = None
    if m_pos is not None:
        # Means over prompts that have correct (resp. wrong) labels among their demonstrations.
        mass = {"correct": (m_pos / max(n_pos, 1)).tolist(), "wrong": (m_neg / max(n_neg, 1)).tolist()}
    return logits, mass


def macro_f1(gold, pred, n_labels):
    f1s = []
    for c in range(n_labels):
        tp = sum(g == c and p == c for g, p in zip(gold, pred))
        fp = sum(g != c and p == c for g, p in zip(gold, pred))
        fn = sum(g == c and p != c for g, p in zip(gold, pred))
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1s.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    return sum(f1s) / n_labels


def consistency(preds, group):
    """Mean over consecutive groups of ``group`` predictions of the majority's share."""
    if len(preds) % group:
        raise ValueError(f"{len(preds)} predictions do not split into groups of {group}")
    out = []
    for i in range(0, len(preds), group):
        c = Counter(preds[i:i + group])
        out.append(c.most_common(1)[0][1] / group)
    return sum(out) / len(out)


def evaluate(model, tokenizer, task: data.Task, n_queries=None, batch=8, robustness_queries=0,
             progress=True, probe=True, max_length=0):
    """The paper's protocol on ``task``: ``n_queries`` (default 512) fixed test queries x 2
    demonstration samplings. ``robustness_queries`` > 0 adds StaICC's consistency across its 9
    templates and across 8 demonstration samplings on that many queries."""
    t0 = time.perf_counter()
    label_ids = data.label_token_ids(tokenizer, task.label_words, task.template.label_prefix)
    prompts = data.eval_prompts(task, n_queries)
    logits, mass = score_prompts(model, tokenizer, prompts, label_ids, batch, probe, progress,
                                 desc=f"eval {task.name}", max_length=max_length)
    pred = logits.argmax(1).tolist()
    gold = [p.query_label for p in prompts]
    correct = [p == g for p, g in zip(pred, gold)]
    unseen = [c for c, p in zip(correct, prompts) if p.query_label not in p.demo_labels]
    res = {
        "accuracy": sum(correct) / len(correct),
        "macro_f1": macro_f1(gold, pred, len(task.label_words)),
        "n_prompts": len(prompts),
        "unseen_label_accuracy": sum(unseen) / len(unseen) if unseen else None,
        "unseen_label_prompts": len(unseen),
        "prediction_counts": [pred.count(c) for c in range(len(task.label_words))],
        "majority_class_accuracy": max(gold.count(c) for c in set(gold)) / len(gold),
        "attention_mass": mass,
    }
    if robustness_queries:
        tp = data.template_prompts(task, robustness_queries)
        tl = _template_predictions(model, tokenizer, task, tp, batch, progress, max_length)
        res["template_consistency"] = consistency(tl, len(data.L9))
        dp = data.demo_sampling_prompts(task, robustness_queries)
        dl, _ = score_prompts(model, tokenizer, dp, label_ids, batch, False, progress,
                              desc=f"demo consistency {task.name}", max_length=max_length)
        res["demo_consistency"] = consistency(dl.argmax(1).tolist(), 8)
        res["robustness_queries"] = robustness_queries
    res["seconds"] = time.perf_counter() - t0
    return res


def _template_predictions(model, tokenizer, task, prompts, batch, progress, max_length=0):
    # Label ids depend on the template's label prefix; score each template's prompts with its own.
    temps = data.template_variants(task)
    preds = [None] * len(prompts)
    for t_i, t in enumerate(temps):
        idx = list(range(t_i, len(prompts), len(temps)))
        ids = data.label_token_ids(tokenizer, task.label_words, t.label_prefix)
        lg, _ = score_prompts(model, tokenizer, [prompts[i] for i in idx], ids, batch, False,
                              progress, desc=f"template {t_i + 1}/9", max_length=max_length)
        for i, p in zip(idx, lg.argmax(1).tolist()):
            preds[i] = p
    return preds
