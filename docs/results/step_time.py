"""Time one ABFT micro-step (forward + loss + backward) with and without the early stop.

Usage: python docs/results/step_time.py [--model smollm2-135m] [--micro-batch 1] [--reps 6]
Alternates the two variants on the same batches and prints medians as JSON.
"""
import argparse
import json
import statistics
import time

import torch

from abft_fast.abft import data, trainer
from abft_fast.abft.cli import load_model
from abft_fast.abft.loss import abft_loss

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="smollm2-135m")
ap.add_argument("--dataset", default="sst2")
ap.add_argument("--micro-batch", type=int, default=1)
ap.add_argument("--reps", type=int, default=6)
args = ap.parse_args()
model, tok = load_model(args.model)
trainer.freeze_all_but_qk(model)
task = data.load_task(args.dataset)
enc = data.encode(tok, data.training_prompts(task, args.micro_batch * (args.reps + 1), 4, seed=0))
times = {True: [], False: []}
for r in range(args.reps + 1):
    b = data.collate(enc[r * args.micro_batch:(r + 1) * args.micro_batch], tok.pad_token_id)
    for stop in (True, False) if r % 2 else (False, True):
        t = time.perf_counter()
        probs = trainer.ProbeForward(model, stop)(b.input_ids, b.attention_mask, b.rows, b.cols)
        abft_loss(probs, b.correct, b.cols >= 0, b.lengths, use_filter=False).loss.backward()
        model.zero_grad(set_to_none=True)
        if r:  # the first round warms up
            times[stop].append(time.perf_counter() - t)
full, early = statistics.median(times[False]), statistics.median(times[True])
print(json.dumps({"model": args.model, "dataset": args.dataset, "micro_batch": args.micro_batch,
                  "reps": args.reps, "median_step_s_full_forward": round(full, 4),
                  "median_step_s_stop_early": round(early, 4),
                  "saving": round(1 - early / full, 4), "threads": torch.get_num_threads()}))
