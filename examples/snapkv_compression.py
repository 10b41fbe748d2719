"""SnapKV / H2O KV-cache compression on SmolLM2-135M with ``abft_fast.hf.column_scores``.

For each long prompt (many-shot SST-2 ICL prompts from StaICC, and pass-key questions hidden in a
long document) the model prefills all tokens but the last with attn_implementation="abft_fast"
inside two ``column_scores`` contexts (one forward fills both):

- SnapKV: the attention each key gets from the last 32 queries (the observation window),
- H2O: the attention each key has accumulated over every query row,

both as [layers, B, Hq, L] without any L x L matrix. Per layer and key/value head (scores summed
over the head's query group; SnapKV's scores average-pooled with kernel 5), the top 25% / 50% of
the keys before the window are kept, plus the window's 32 keys (equal counts per head, so the
compressed cache is a plain DynamicCache). The last prompt token then runs against the compressed
cache (position_ids = its true position; the cached keys are already rotated), and the label /
pass key is read from the compressed-cache logits.

Reported: accuracy (and agreement with the full cache) per policy and budget; the selection's
agreement with the same selection computed from eager attention's ``output_attentions`` (identical
up to ties); time and peak memory of the prefill + scores, abft_fast vs eager at the same length,
each measured in a fresh subprocess (peak RSS above the loaded model, Linux VmHWM).

Run:  python examples/snapkv_compression.py [--prompts 8] [--shots 56] [--agree 2] [--passkeys 2]
First run converts the packaged GGUF model (~25 s); later runs load the cached copy.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

WINDOW = 32
BUDGETS = (0.25, 0.5)


# ----------------------------------------------------------------------------------- prompts

def sst2_prompts(tok, n, shots, seed=0):
    """n many-shot SST-2 prompts: (token ids [1, L], gold label), and the label token ids."""
    from abft_fast.abft.data import label_token_ids, load_task
    task = load_task("sst2")
    labels = label_token_ids(tok, task.label_words, task.template.label_prefix)
    out = []
    for i in range(n):
        rng = random.Random(seed + i)
        demos = rng.sample(range(len(task.demonstrations)), shots)
        p = task.prompt(demos, task.test[i])
        out.append((tok(p.text, return_tensors="pt").input_ids, p.query_label))
    return out, labels, task


def passkey_prompts(tok, task, n, n_sentences, seed=0):
    """n long documents (SST-2 sentences) with a pass key hidden at different depths, ending in
    the question: (token ids [1, L], the key's digits)."""
    out = []
    for i in range(n):
        rng = random.Random(1000 + seed + i)
        key = str(rng.randint(10000, 99999))
        sents = [task.demonstrations[j].inputs[0].strip() for j in
                 rng.sample(range(len(task.demonstrations)), n_sentences)]
        depth = int(len(sents) * (0.2 + 0.6 * i / max(1, n - 1)))
        sents.insert(depth, f"The pass key is {key}. Remember it. {key} is the pass key.")
        text = ("There is a pass key hidden in the following text. Find it and memorize it.\n"
                + " ".join(sents) + "\nWhat is the pass key? The pass key is")
        out.append((tok(text, return_tensors="pt").input_ids, key))
    return out


# ------------------------------------------------------------------------------- selection

def group_sum(scores, hkv):
    """[layers, 1, Hq, L] -> [layers, Hkv, L]: summed over each key/value head's query group."""
    n_l, _, hq, length = scores.shape
    return scores[:, 0].reshape(n_l, hkv, hq // hkv, length).sum(2)


def select(scores, frac, pool):
    """Kept key positions [layers, Hkv, K] (sorted): the top frac of the keys before the window
    by score (average-pooled with kernel 5 for SnapKV) plus the window's keys."""
    n_l, hkv, length = scores.shape
    n_pre = length - WINDOW
    s = scores[..., :n_pre].float()
    if pool:
        s = F.avg_pool1d(s.reshape(-1, 1, n_pre), 5, stride=1, padding=2).reshape(n_l, hkv, n_pre)
    k = max(1, round(frac * n_pre))
    top = s.topk(k, dim=-1).indices
    win = torch.arange(n_pre, length).expand(n_l, hkv, WINDOW)
    return torch.cat([top.sort(-1).values, win], -1), s


def compare_selection(sel_a, sel_b, s_b, rel_tie=1e-4):
    """(identical heads, heads that differ only by ties, heads that differ otherwise): a head
    differs by ties when every key kept by only one side has, in s_b (the eager scores), a score
    within rel_tie (relative to the head's largest) of the k-th largest score."""
    n_l, hkv, _ = sel_a.shape
    same = ties = other = 0
    n_pre = s_b.shape[-1]
    for li in range(n_l):
        for h in range(hkv):
            a = set(sel_a[li, h].tolist())
            b = set(sel_b[li, h].tolist())
            if a == b:
                same += 1
                continue
            sb = s_b[li, h]
            kth = sb.sort(descending=True).values[len([x for x in b if x < n_pre]) - 1]
            diff = [x for x in a ^ b if x < n_pre]
            tol = rel_tie * float(sb.max())
            if all(abs(float(sb[x]) - float(kth)) <= tol for x in diff):
                ties += 1
            else:
                other += 1
    return same, ties, other


# ------------------------------------------------------------------------------ the cache

def _cache_kw(model):
    sig = inspect.signature(model.forward).parameters
    return "cache" if "cache" in sig else "past_key_values"


def _out_cache(out):
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


def layer_kv(cache):
    """[(k, v)] per layer, each [1, Hkv, L, D]."""
    if hasattr(cache, "layers"):
        return [(lay.keys, lay.values) for lay in cache.layers]
    return [(cache.key_cache[i], cache.value_cache[i]) for i in range(len(cache.key_cache))]


def compressed_cache(kv, keep):
    """A DynamicCache holding, per layer and head, the keys / values at ``keep`` [layers, Hkv, K]
    (None: everything)."""
    from transformers import DynamicCache
    cache = DynamicCache()
    for li, (k, v) in enumerate(kv):
        if keep is not None:
            idx = keep[li][None, :, :, None].expand(1, -1, -1, k.shape[-1])
            k, v = torch.gather(k, 2, idx), torch.gather(v, 2, idx)
        cache.update(k.clone(), v.clone(), li)
    return cache


@torch.no_grad()
def continue_from(model, cache, first_id, pos, steps):
    """Greedy tokens after feeding first_id at position pos against ``cache``; returns (logits of
    the first step [V], generated ids)."""
    kw = _cache_kw(model)
    ids, first_logits = [], None
    tok_id = first_id
    for t in range(steps):
        out = model(input_ids=torch.tensor([[tok_id]]), position_ids=torch.tensor([[pos + t]]),
                    use_cache=True, **{kw: cache})
        cache = _out_cache(out)
        logits = out.logits[0, -1]
        if first_logits is None:
            first_logits = logits
        tok_id = int(logits.argmax())
        ids.append(tok_id)
    return first_logits, ids


# ------------------------------------------------------------------------------- routes

@torch.no_grad()
def prefill_abft(model, ids):
    import abft_fast.hf as ah
    with ah.column_scores(model, last=WINDOW) as snap, ah.column_scores(model) as h2o:
        out = model(input_ids=ids, use_cache=True)
    return _out_cache(out), snap.scores, h2o.scores


@torch.no_grad()
def prefill_eager(model, ids):
    """Eager attention's output_attentions -> the same two scores (the L x L route)."""
    out = model(input_ids=ids, output_attentions=True, use_cache=False)
    att = out.attentions  # layers x [1, Hq, L, L]
    snap = torch.stack([a[:, :, -WINDOW:].sum(2) for a in att]).float()
    h2o = torch.stack([a.sum(2) for a in att]).float()
    return snap, h2o


def measure(route, length, shots):
    """Child process: one prefill + scores of prompt 0 cut to ``length`` tokens; prints JSON."""
    from abft_fast.hf.packaged import load
    impl = "abft_fast" if route == "abft" else "eager"
    model, tok = load("smollm2-135m", attn_implementation=impl)
    ids = sst2_prompts(tok, 1, shots)[0][0][0]
    ids = ids[:, :length]
    fn = prefill_abft if route == "abft" else prefill_eager
    fn(model, ids[:, :64])  # warm-up (allocator, kernels), outside the measurement
    try:  # reset the peak RSS (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    base = _status_kb("VmRSS")
    t = time.perf_counter()
    fn(model, ids)
    sec = time.perf_counter() - t
    peak = _status_kb("VmHWM") if reset else None
    print(json.dumps(dict(route=route, length=int(ids.shape[1]), seconds=sec,
                          peak_above_mb=None if peak is None else (peak - base) / 1024,
                          threads=torch.get_num_threads())))


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def run_measure(route, length, shots):
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--_measure", route,
                        "--_length", str(length), "--shots", str(shots)],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------- main

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=8, help="SST-2 many-shot prompts")
    p.add_argument("--shots", type=int, default=56, help="demonstrations per prompt")
    p.add_argument("--passkeys", type=int, default=2, help="pass-key documents")
    p.add_argument("--passkey-sentences", type=int, default=100)
    p.add_argument("--agree", type=int, default=2,
                   help="prompts whose selection is also computed from eager output_attentions")
    p.add_argument("--no-measure", action="store_true", help="skip the time / memory subprocesses")
    p.add_argument("--backend", default="auto", help="abft_fast backend: auto | torch | triton")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--_measure", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_length", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._measure:
        return measure(args._measure, args._length, args.shots)

    import abft_fast.hf as ah
    from abft_fast.hf.packaged import load
    ah.set_backend(args.backend)
    model, tok = load("smollm2-135m", attn_implementation="abft_fast")
    hkv = model.config.num_key_value_heads
    prompts, labels, task = sst2_prompts(tok, args.prompts, args.shots)
    keys = passkey_prompts(tok, task, args.passkeys, args.passkey_sentences)
    policies = [("full", None, None)] + [(pol, f, pol == "snapkv") for pol in ("snapkv", "h2o")
                                         for f in BUDGETS]
    names = ["full"] + [f"{pol}@{f:.0%}" for pol, f, _ in policies[1:]]
    res = dict(correct={n: 0 for n in names}, same_as_full={n: 0 for n in names},
               passkey={n: 0 for n in names}, lengths=[], passkey_lengths=[],
               agreement={n: [0, 0, 0] for n in names[1:]}, max_score_diff=0.0)
    t0 = time.perf_counter()
    for i, (ids, gold) in enumerate(prompts):
        n = ids.shape[1]
        res["lengths"].append(n)
        cache, snap, h2o = prefill_abft(model, ids[:, :-1])
        kv = layer_kv(cache)
        scores = {"snapkv": group_sum(snap, hkv), "h2o": group_sum(h2o, hkv)}
        eager = None
        if i < args.agree:
            model.set_attn_implementation("eager")
            e_snap, e_h2o = prefill_eager(model, ids[:, :-1])
            model.set_attn_implementation("abft_fast")
            res["max_score_diff"] = max(  # relative to the largest score of each kind
                res["max_score_diff"], float((e_snap - snap).abs().max() / e_snap.max()),
                float((e_h2o - h2o).abs().max() / e_h2o.max()))
            eager = {"snapkv": group_sum(e_snap, hkv), "h2o": group_sum(e_h2o, hkv)}
        full_pred = None
        for name, (pol, frac, pool) in zip(names, policies):
            keep = None
            if pol != "full":
                keep, _ = select(scores[pol], frac, pool)
                if eager is not None:
                    keep_e, s_e = select(eager[pol], frac, pool)
                    for j, c in enumerate(compare_selection(keep, keep_e, s_e)):
                        res["agreement"][name][j] += c
            logits, _ = continue_from(model, compressed_cache(kv, keep), int(ids[0, -1]), n - 1, 1)
            pred = int(logits[labels].argmax())
            full_pred = pred if pol == "full" else full_pred
            res["correct"][name] += int(pred == gold)
            res["same_as_full"][name] += int(pred == full_pred)
        print(f"prompt {i}: {n} tokens, gold {gold}, "
              f"{time.perf_counter() - t0:.0f} s so far", flush=True)
    for i, (ids, key) in enumerate(keys):
        n = ids.shape[1]
        res["passkey_lengths"].append(n)
        cache, snap, h2o = prefill_abft(model, ids[:, :-1])
        kv = layer_kv(cache)
        scores = {"snapkv": group_sum(snap, hkv), "h2o": group_sum(h2o, hkv)}
        outs = {}
        for name, (pol, frac, pool) in zip(names, policies):
            keep = None if pol == "full" else select(scores[pol], frac, pool)[0]
            _, gen = continue_from(model, compressed_cache(kv, keep), int(ids[0, -1]), n - 1, 6)
            outs[name] = tok.decode(gen)
            res["passkey"][name] += int(key in outs[name])
        print(f"pass key {i}: {n} tokens, key {key}, answers {outs}", flush=True)
    res["seconds_total"] = time.perf_counter() - t0
    if not args.no_measure:
        length = res["lengths"][0] - 1
        # alternating fresh processes, twice each: the load of a shared machine drifts
        res["measure"] = [run_measure(r, length, args.shots) for _ in range(2)
                          for r in ("abft", "eager")]
    report(res, names, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


def report(res, names, args):
    n, k = args.prompts, args.passkeys
    lens = res["lengths"]
    print(f"\nSST-2, {n} prompts of {min(lens)}-{max(lens)} tokens ({args.shots} shots), window "
          f"{WINDOW}; pass key, {k} documents of {res['passkey_lengths']} tokens")
    print(f"{'cache':<12} {'kept':>6} {'accuracy':>9} {'= full':>7} {'pass key':>9}")
    for name in names:
        kept = "100%" if name == "full" else name.split("@")[1] + "+w"
        print(f"{name:<12} {kept:>6} {res['correct'][name] / n:>9.3f} "
              f"{res['same_as_full'][name] / n:>7.3f} {res['passkey'][name]:>5}/{k}")
    if args.agree:
        print(f"\nselection vs eager output_attentions ({args.agree} prompts x layers x kv heads); "
              f"max |score difference| / max score {res['max_score_diff']:.2e}")
        for name, (same, ties, other) in res["agreement"].items():
            print(f"  {name:<12} identical {same}, differ only by ties {ties}, differ {other}")
    for m in res.get("measure", []):
        mem = "n/a" if m["peak_above_mb"] is None else f"{m['peak_above_mb']:.0f} MB"
        print(f"prefill + both scores, {m['route']:<5} L={m['length']}: {m['seconds']:.1f} s, peak "
              f"RSS above the loaded model {mem} ({m['threads']} threads)")


if __name__ == "__main__":
    main()
