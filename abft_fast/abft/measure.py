"""Measure one ABFT micro-step (forward to the last attention, loss, backward on W_Q/W_K) with
``abft_fast`` probes vs eager attention + ``output_attentions`` on the same model and batch.

    python -m abft_fast.abft.measure --model smollm2-135m --lengths 128 256 512 1024 \\
        --methods abft_fast eager --reps 2

Prints one JSON line per (method, L): median step seconds, the bytes autograd saves for backward
(unique storages, counted by a saved-tensors hook: the activation memory of the step), and the
process's peak RSS so far. Random token ids, probe row = last token, ``--cols`` label columns
spread over the prompt. CPU numbers; not a GPU measurement.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from .. import hf
from .loss import abft_loss
from .objective import ProbeForward, StopForward, attention_modules, stop_after
from .params import freeze_all_but_qk


class SavedBytes:
    """Bytes of the distinct storages autograd saves for backward inside the context, the
    model's own parameters excluded (they are not activations)."""

    def __init__(self, model):
        self.seen = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.bytes = 0

    def pack(self, t):
        st = t.untyped_storage()
        key = st.data_ptr()
        if key not in self.seen:
            self.seen.add(key)
            self.bytes += st.nbytes()
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def eager_probs(model, ids, rows, cols):
    """Probes gathered from eager attention's full L x L matrices (output_attentions=True)."""
    got = []
    mods = attention_modules(model)

    def take(_m, _args, out):
        p = out[1]  # [B, H, L, L]
        b, h, _, lk = p.shape
        pr = torch.gather(p, 2, rows[:, None, :, None].expand(b, h, rows.shape[1], lk))
        got.append(torch.gather(pr, 3, cols[:, None, None, :].expand(
            b, h, rows.shape[1], cols.shape[1])).float())
    hs = [m.register_forward_hook(take) for m in mods]
    try:
        with stop_after(mods[-1]):
            try:
                model(input_ids=ids, output_attentions=True, use_cache=False)
            except StopForward:
                pass
    finally:
        for h in hs:
            h.remove()
    return torch.stack(got)


def step(model, method, ids, rows, cols, correct):
    model.zero_grad(set_to_none=True)
    with SavedBytes(model) as sb:
        if method == "eager":
            probs = eager_probs(model, ids, rows, cols)
        else:
            probs = ProbeForward(model, True)(ids, torch.ones_like(ids), rows, cols)
        lengths = torch.full((ids.shape[0],), ids.shape[1])
        out = abft_loss(probs, correct, cols >= 0, lengths, use_filter=False)
    out.loss.backward()
    return sb.bytes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--methods", nargs="+", default=["abft_fast", "eager"])
    ap.add_argument("--cols", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--backend", default="torch")
    args = ap.parse_args(argv)
    from .cli import load_model
    hf.set_backend(args.backend)
    model, _ = load_model(args.model)
    freeze_all_but_qk(model)
    model.eval()
    cfg = model.config
    for L in args.lengths:
        g = torch.Generator().manual_seed(L)
        ids = torch.randint(0, cfg.vocab_size, (args.batch, L), generator=g)
        rows = torch.full((args.batch, 1), L - 1)
        cols = torch.linspace(1, L - 2, args.cols).long()[None].expand(args.batch, -1).contiguous()
        correct = (torch.arange(args.cols) % 2 == 0)[None].expand(args.batch, -1).contiguous()
        for method in args.methods:
            model.set_attn_implementation("eager" if method == "eager" else hf.NAME)
            times, saved = [], 0
            for r in range(args.reps + 1):
                t = time.perf_counter()
                saved = step(model, method, ids, rows, cols, correct)
                if r:
                    times.append(time.perf_counter() - t)
            print(json.dumps({
                "model": args.model, "method": method, "backend": args.backend
                if method != "eager" else None, "L": L, "batch": args.batch, "cols": args.cols,
                "layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads,
                "hidden": cfg.hidden_size, "median_step_s": round(statistics.median(times), 4),
                "saved_for_backward_bytes": saved,
                "peak_rss_mb_so_far": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main()
