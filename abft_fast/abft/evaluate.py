"""ICL evaluation on StaICC's fixed test inputs: accuracy, macro-F1, robustness, unseen labels.

Only the prompt's last position is scored, and only against the label tokens: the decoder's final
hidden state at that position times the LM-head rows of the label tokens. The same forward records
(through ``abft_fast.hf`` probes) the last row's attention mass on correct vs wrong demonstration
labels per layer, for the plots.
"""
from __future__ import annotations

import contextlib
import functools
import io
import time
import warnings
from collections import Counter

import torch

from .. import hf
from . import data, stats
from .params import unwrap


def _decoder_and_head(model):
    lm = unwrap(model)
    base = getattr(lm, lm.base_model_prefix, None)
    head = lm.get_output_embeddings()
    if base is None or head is None:
        raise ValueError(f"{type(lm).__name__}: need a causal LM with a base model and an LM head")
    return lm, base, head


def score_prompts(model, tokenizer, prompts, label_ids, batch=8, probe=True, progress=True,
                  desc="eval", max_length=0):
    """Label logits at the last position for each prompt (see ``_score_prompts``). An FSDP2-sharded
    model (``fully_shard``; every process must call this with the same prompts) has its root
    unit's own weights (embeddings, final norm, LM head) gathered for the evaluation, which calls
    the decoder and the head apart; each layer gathers its own as usual."""
    root = unwrap(model)
    fsdp_root = callable(getattr(root, "unshard", None)) and callable(getattr(root, "reshard", None))
    if fsdp_root:
        root.unshard()
    try:
        return _score_prompts(model, tokenizer, prompts, label_ids, batch, probe, progress, desc,
                              max_length)
    finally:
        if fsdp_root:
            root.reshard()


@torch.no_grad()
def _score_prompts(model, tokenizer, prompts, label_ids, batch=8, probe=True, progress=True,
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
        # Per prompt, in eval_prompts order (sampling-major): what paired statistics need.
        "predictions": pred,
        "gold": gold,
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


# ----------------------------------------------------------------------------- paired reporting

def correctness(res: dict) -> list:
    """Per-prompt correctness (0/1) of an evaluation result (``evaluate`` or ``evaluate_staicc``)."""
    if "predictions" not in res or "gold" not in res:
        raise KeyError("this evaluation result keeps no per-prompt predictions")
    return [int(p == g) for p, g in zip(res["predictions"], res["gold"])]


def compare(before: dict, after: dict, n_boot: int = 2000, seed: int = 0) -> dict:
    """Paired uncertainty of after - before on the same prompts (``stats.paired``): accuracy
    difference, its seeded bootstrap 95 % interval and McNemar's exact p-value."""
    if before.get("gold") != after.get("gold"):
        raise ValueError("before and after were not evaluated on the same prompts")
    return stats.paired(correctness(before), correctness(after), n_boot=n_boot, seed=seed)


# ----------------------------------------------------------------------------- StaICC's harness

def staicc_experimentor(task: data.Task | str, k: int = 4):
    """StaICC's own ``single_experimentor`` for a data set, built as StaICC's ``Normal`` benchmark
    builds it (its standard split, its template, its seeded demonstration sampler). Built once per
    (data set, k) in a process (about 4 s each) and reused: scoring does not change its prompts."""
    name = task.name if isinstance(task, data.Task) else data.ALIASES.get(task, task)
    if name not in data.DATASETS:
        raise ValueError(f"dataset must be one of {sorted(data.DATASETS)}; got {name!r}")
    return _experimentor(name, int(k))


@functools.lru_cache(maxsize=4)
def _experimentor(name, k):
    from StaICC.util import experimentor, hgf_dataset_loader
    cls_name, dividing = data.DATASETS[name]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return experimentor.single_experimentor(
            original_dataset=getattr(hgf_dataset_loader, cls_name)(), k=k, dividing=dividing)


def staicc_label_tokens(tokenizer, label_space) -> list:
    """The token StaICC's reference inference reads for each label: the LAST id of
    ``tokenizer(label)`` (special tokens included, no leading space)."""
    return [tokenizer(w).input_ids[-1] for w in label_space]


def _metric(fn, gold, probs):
    """One of StaICC's metric functions; None where it refuses the subset (its ECE needs at least
    as many prompts as its 10 bins)."""
    try:
        return fn(gold, probs)
    except ValueError:
        return None


def evaluate_staicc(model, tokenizer, task: data.Task | str, n_queries=None, k: int = 4,
                    progress=True, experimentor=None):
    """Accuracy as StaICC computes it: its ``single_experimentor`` prompts (exactly as written,
    ending in the label prefix's trailing space), scored one at a time by its reference inference
    ``standard_ICL_inference_with_torch_Causal_LM`` (the whole prompt with the tokenizer's
    special tokens, the last position's logits at the last token of each bare label word, softmax),
    and its metric functions (``accuracy``: argmax == ground truth).

    ``n_queries`` None (or the full test split): ``single_experimentor.auto_run`` itself, all 512
    test queries x 2 demonstration samplings. Fewer: the first ``n_queries`` queries of each
    sampling from the same experimentor's ``prompt_set()`` (the same prompts, in the same order,
    as our evaluator's ``eval_prompts``), scored by the same inference and metric functions.
    """
    from StaICC.prefabricate_inference.model_kernel import (
        standard_ICL_inference_with_torch_Causal_LM,
    )
    from StaICC.util import functional
    t0 = time.perf_counter()
    ex = experimentor if experimentor is not None else staicc_experimentor(task, k)
    lm = unwrap(model)
    was_training = lm.training
    lm.eval()

    def infer(prompt, label_space):
        return standard_ICL_inference_with_torch_Causal_LM(
            prompt=prompt, model=lm, tokenizer=tokenizer, label_space=label_space,
            cache_empty=None)

    nt, reps = len(ex.triplet_dataset.test), ex.get_repeat_times()
    n = nt if n_queries is None else int(n_queries)
    if not 1 <= n <= nt:
        raise ValueError(f"n_queries must be in 1..{nt}; got {n_queries}")
    quiet = contextlib.redirect_stdout(io.StringIO()) if not progress else contextlib.nullcontext()
    try:
        with quiet:
            if n == nt:
                metrics, ok, out = ex.auto_run(forward_inference=infer, return_outputs=True)
                if not ok:
                    raise RuntimeError(f"StaICC's experimentor failed on {task}")
                probs, gold = out["prob."], out["groundtruth"]
            else:
                prompts = ex.prompt_set()
                idx = [r * nt + q for r in range(reps) for q in range(n)]
                from tqdm.auto import tqdm
                probs = [infer(prompt=prompts[i], label_space=ex.get_label_space())
                         for i in tqdm(idx, desc="StaICC harness", disable=not progress)]
                gold = [ex.triplet_dataset.get_default_ground_truth_label_index(i % nt)
                        for i in idx]
                metrics = {name: _metric(fn, gold, probs) for name, fn in ex.metrics.items()}
    finally:
        lm.train(was_training)
    pred = functional.compress_logits_prediction_to_onehot(probs)
    space = ex.get_label_space()
    ids = staicc_label_tokens(tokenizer, space)
    return {
        "harness": "staicc",
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics.get("macro_F1"),
        "staicc_metrics": metrics,
        "n_prompts": len(gold),
        "full_test_set": n == nt,
        "prediction_counts": [pred.count(c) for c in range(len(space))],
        "label_space": space,
        "label_token_ids": ids,
        "label_tokens": [tokenizer.convert_ids_to_tokens(i) for i in ids],
        "predictions": pred,
        "gold": gold,
        "seconds": time.perf_counter() - t0,
    }
