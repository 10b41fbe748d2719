"""One ABFT training step, 4-bit NF4 base + LoRA r 16 on q/k beside bf16 full W_Q/W_K: peak memory
and tokens per second, on random weights of a public model shape.

    python scripts/qlora_step.py --shape llama-8b --length 4096 --csv OUT.csv   # on a GPU
    python scripts/qlora_step.py --shape tiny --length 256                      # plumbing, CPU

Each mode loads the random model (saved once as bf16 safetensors in a temporary directory), runs
``--warmup`` steps and then ``--steps`` timed steps (probes at every layer on one row and up to 64
label columns, the ABFT loss, backward, Adam), with gradient checkpointing unless
``--no-checkpointing``, and appends one CSV row per mode. Peak memory is
``torch.cuda.max_memory_allocated`` (empty on the CPU).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time

SHAPES = {  # public configurations; "tiny" checks the plumbing on the CPU
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     vocab_size=128256),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                     vocab_size=128256, tie_word_embeddings=True),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=512),
}


def save_random(shape, path):
    """The random bf16 model ``shape`` as safetensors in ``path`` (built on the GPU when there
    is one: an 8B model's random init on the CPU takes minutes)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(max_position_embeddings=1 << 17, **SHAPES[shape])
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(dev):
            model = LlamaForCausalLM(cfg)
        model.save_pretrained(path)
    finally:
        torch.set_default_dtype(old)
    del model
    if dev == "cuda":
        torch.cuda.empty_cache()


def load(path, mode, device):
    import torch
    from transformers import AutoModelForCausalLM

    from abft_fast.abft.params import add_lora, freeze_all_but_qk
    from abft_fast.hf import quant
    kw = dict(dtype=torch.bfloat16, attn_implementation="abft_fast")
    if mode == "nf4-lora":
        model = add_lora(quant.from_pretrained(path, device=device, **kw), 16)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kw).to(device)
    freeze_all_but_qk(model)
    return model.eval()


def step_fn(model, length, device, checkpointing):
    import torch

    from abft_fast.abft.loss import abft_loss
    from abft_fast.abft.objective import ProbeForward
    from abft_fast.abft.params import unwrap
    from abft_fast.abft.trainer import checkpointed_layers_train_mode, enable_gradient_checkpointing
    if checkpointing:
        enable_gradient_checkpointing(model)
        checkpointed_layers_train_mode(model)
    vocab = unwrap(model).config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (1, length), generator=g).to(device)
    am = torch.ones(1, length, dtype=torch.long, device=device)
    rows = torch.full((1, 1), length - 1, device=device)
    c = min(64, length - 1)
    cols = torch.sort(torch.randperm(length - 1, generator=g)[:c]).values[None].to(device)
    correct = (torch.arange(c) % 2 == 0)[None].to(device)
    valid = torch.ones(1, c, dtype=torch.bool, device=device)
    lengths = torch.tensor([length], device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-4)
    objective = ProbeForward(model, stop_early=True)

    def step():
        probs = objective(ids, am, rows, cols)
        out = abft_loss(probs, correct, valid, lengths, use_filter=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()
    return step, sum(p.numel() for p in params)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama-8b", choices=sorted(SHAPES))
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--modes", default="nf4-lora,bf16-qk")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--csv", default=None)
    args = p.parse_args(argv)
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        save_random(args.shape, d)
        print(f"random {args.shape} saved in {time.perf_counter() - t:.0f} s", flush=True)
        for mode in args.modes.split(","):
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            model = load(d, mode, device)
            step, n_train = step_fn(model, args.length, device, not args.no_checkpointing)
            for _ in range(args.warmup):
                step()
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            losses = [step() for _ in range(args.steps)]
            if device == "cuda":
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t) / args.steps
            peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else ""
            row = dict(shape=args.shape, mode=mode, length=args.length,
                       checkpointing=not args.no_checkpointing, trainable=n_train,
                       peak_gib=peak if peak == "" else round(peak, 2), step_s=round(dt, 4),
                       tokens_per_s=round(args.length / dt, 1), loss=losses[-1],
                       device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                       torch=torch.__version__)
            print(row, flush=True)
            rows.append(row)
            del model, step
    if args.csv:
        new = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                w.writeheader()
            w.writerows(rows)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
