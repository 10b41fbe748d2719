"""Probe a model's attention rows with ``abft_fast.hf.probe``, and compare with eager attention.

A tiny Llama (GQA, random weights, no download) runs twice on the same left-padded batch:

- with ``attn_implementation="abft_fast"`` inside ``abft_fast.hf.probe(model, rows, cols)``, which
  records, for every layer and head, the softmax probabilities of the probe rows (here: each
  sample's last token) at the probe columns, without building any L x L matrix;
- with ``attn_implementation="eager"`` and ``output_attentions=True``, which returns the full
  [B, H, L, L] matrices, from which the same entries are gathered.

Run:  python examples/probe_attention_rows.py [--layers 2] [--length 24] [--batch 2] [--cols 5]
"""
from __future__ import annotations

import argparse
import copy

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import abft_fast.hf as ah  # registers attn_implementation="abft_fast"


def tiny_llama_config(layers: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=256, initializer_range=0.08, pad_token_id=0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--length", type=int, default=24, help="padded sequence length L")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--cols", type=int, default=5, help="probe columns C per sample")
    p.add_argument("--backend", default="auto", help="auto | torch | triton | cuda | sdpa")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    cfg = tiny_llama_config(args.layers)
    # one config object each: from_config records the attention implementation in the config
    eager = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    fused = AutoModelForCausalLM.from_config(copy.deepcopy(cfg),
                                             attn_implementation="abft_fast").eval()
    fused.load_state_dict(eager.state_dict())
    ah.set_backend(args.backend)

    b, seq = args.batch, args.length
    ids = torch.randint(3, cfg.vocab_size, (b, seq))
    am = torch.ones(b, seq, dtype=torch.long)
    for i in range(1, b):  # left padding: sample i has 3 * i pad tokens in front
        am[i, :min(3 * i, seq - 1)] = 0
    ids = ids.masked_fill(am == 0, cfg.pad_token_id)

    # probe row: each sample's last token (left padding: position L-1); a second, unused slot (-1)
    rows = torch.tensor([[seq - 1, -1]] * b)
    # probe columns: C random real (non-pad) key positions per sample
    cols = torch.stack([torch.randint(int((am[i] == 0).sum()), seq, (args.cols,))
                        for i in range(b)])

    with torch.no_grad():
        with ah.probe(fused, rows=rows, cols=cols) as rec:
            fused(input_ids=ids, attention_mask=am)
        probs = rec.probs  # [layers, B, Hq, R, C]
        att = eager(input_ids=ids, attention_mask=am, output_attentions=True).attentions

    # the same entries from eager's full matrices: [layers, B, Hq, L, L] -> [layers, B, Hq, R, C]
    full = torch.stack(att)
    r = rows.clamp(min=0)
    ref = torch.stack([full[:, i][:, :, r[i]][..., cols[i]] for i in range(b)], dim=1)
    ref = ref * (rows >= 0)[None, :, None, :, None]  # unused slots are 0

    print(f"probs shape {tuple(probs.shape)} (layers, B, Hq, R, C); eager attentions "
          f"{len(att)} x {tuple(att[0].shape)}")
    for i in range(b):
        print(f"sample {i}: last row {seq - 1}, columns {cols[i].tolist()}")
        print(f"  abft_fast layer {args.layers - 1} head 0: "
              + " ".join(f"{x:.4f}" for x in probs[-1, i, 0, 0].tolist()))
        print(f"  eager     layer {args.layers - 1} head 0: "
              + " ".join(f"{x:.4f}" for x in ref[-1, i, 0, 0].tolist()))
    err = (probs - ref.to(probs.dtype)).abs().max().item()
    print(f"unused slot (-1) all zero: {bool((probs[:, :, :, 1] == 0).all())}")
    print(f"max |abft_fast - eager| over all layers, heads, rows, columns: {err:.2e}")
    if err > 1e-4:
        raise SystemExit(f"mismatch: {err:.3g}")


if __name__ == "__main__":
    main()
