"""Memory plan for ABFT with a 4-bit (NF4) base and LoRA on q/k (QLoRA), per model and context.

    python scripts/memory_plan.py measure [--out DIR]   # CPU measurements beside the formula
    python scripts/memory_plan.py plan                  # the table (markdown)

``measure`` builds random Llama-shaped models, loads them in NF4 (bfloat16 everything else,
bfloat16 compute: the GPU setting) with LoRA r 16 on q/k, and records for one ABFT forward (probes
at every layer, stopping after the last layer's attention, as the trainer does) the bytes the
autograd graph keeps for the backward (``abft_fast.abft.measure.SavedBytes``: each storage once,
parameters excluded), with and without gradient checkpointing, and the model's resident bytes;
beside each,
the prediction of :func:`kept_per_token` and :func:`predicted_weights`: small shapes that vary
one dimension at a time, then a larger shape as the check. ``plan`` applies those formulas, the
LoRA optimiser state and the transient buffers to the public configurations of Llama-3.2-1B,
Llama-3.1-8B, Qwen2.5-32B and Llama-3.1-70B. The table is a model: no GPU ran these sizes
(docs/large-models.md).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
from dataclasses import asdict, dataclass

GIB = 2 ** 30
CUDA_OVERHEAD = 1.0 * GIB  # CUDA context, cuBLAS workspace, allocator slack: an assumption


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    inter: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False
    qkv_bias: bool = False

    @property
    def q_dim(self):
        return self.heads * self.head_dim

    @property
    def kv_dim(self):
        return self.kv_heads * self.head_dim

    def linear_params(self):
        """Parameters of the decoder layers' linear weights (what NF4 quantises)."""
        h = self.hidden
        per = h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h + 3 * h * self.inter
        return self.layers * per

    def other_params(self):
        """Embeddings, LM head, norms, biases: kept in the load dtype."""
        emb = self.vocab * self.hidden * (1 if self.tied else 2)
        norms = (2 * self.layers + 1) * self.hidden
        bias = self.layers * (self.q_dim + 2 * self.kv_dim) if self.qkv_bias else 0
        return emb + norms + bias

    def lora_params(self, r=16):
        return self.layers * r * ((self.hidden + self.q_dim) + (self.hidden + self.kv_dim))


# Public configurations (config.json of each model on the HF hub).
MODELS = [
    Shape("Llama-3.2-1B", 2048, 16, 8192, 32, 8, 64, 128256, tied=True),
    Shape("Llama-3.1-8B", 4096, 32, 14336, 32, 8, 128, 128256),
    Shape("Qwen2.5-32B", 5120, 64, 27648, 40, 8, 128, 152064, qkv_bias=True),
    Shape("Llama-3.1-70B", 8192, 80, 28672, 64, 8, 128, 128256),
]
CONTEXTS = [4096, 32768, 131072]
GPUS = [("H100 80 GB", 78 * GIB), ("H200 141 GB", 139 * GIB)]  # what torch can allocate


def nf4_bytes(n):
    """bitsandbytes NF4 with double quantisation: 4 bits per value, one 8-bit scale per block of
    64, one float32 scale (and offset) per 256 blocks."""
    blocks = -(-n // 64)
    return -(-n // 2) + blocks + 4 * -(-blocks // 256)


# ---------------------------------------------------------------------------------------------
# Measurement (CPU)

def load_4bit(shape: Shape, workdir):
    """The random model ``shape`` in NF4 (bfloat16 compute and rest), LoRA r 16 on q/k."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from abft_fast.abft.params import add_lora, freeze_all_but_qk
    from abft_fast.hf import quant
    cfg = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden,
                      intermediate_size=shape.inter, num_hidden_layers=shape.layers,
                      num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                      head_dim=shape.head_dim, max_position_embeddings=1 << 17,
                      tie_word_embeddings=shape.tied)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(workdir)
    model = quant.from_pretrained(workdir, device="cpu", compute_dtype=torch.bfloat16,
                                  dtype=torch.bfloat16, attn_implementation="abft_fast")
    model = add_lora(model, 16)
    freeze_all_but_qk(model)
    return model.eval()


def saved_bytes(model, length, batch=1, checkpointing=False, probes=(1, 64)):
    """Bytes the autograd graph of one ABFT forward keeps for the backward
    (``abft_fast.abft.measure.SavedBytes``: each storage once, the parameters excluded)."""
    import torch

    from abft_fast.abft.measure import SavedBytes
    from abft_fast.abft.objective import ProbeForward
    from abft_fast.abft.params import unwrap
    from abft_fast.abft.trainer import checkpointed_layers_train_mode, enable_gradient_checkpointing
    lm = unwrap(model)
    if checkpointing:
        enable_gradient_checkpointing(model)
        checkpointed_layers_train_mode(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, lm.config.vocab_size, (batch, length), generator=g)
    am = torch.ones(batch, length, dtype=torch.long)
    r, c = probes
    rows = torch.full((batch, r), length - 1)
    cols = torch.randint(0, length - 1, (batch, c), generator=g)
    with SavedBytes(model) as sb:
        probs = ProbeForward(model, stop_early=True)(ids, am, rows, cols)
    assert probs.requires_grad
    return sb.bytes


def weight_bytes(model):
    """Bytes of parameters and buffers (the NF4 weights, their scales, the rest, LoRA)."""
    import torch
    total, done = 0, set()
    tensors = list(model.parameters()) + list(model.buffers())
    for m in model.modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None and hasattr(qs, "as_dict"):
            tensors += [v for v in qs.as_dict(packed=False).values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in done:
            done.add(s.data_ptr())
            total += s.nbytes()
    return total


# Small shapes (hidden, inter, layers, heads, kv heads, head dim varied separately) and the
# larger shape that checks it (SmolLM2-360M's shape, 4 layers, L 2048).
SMALL = [
    Shape("small-a", 128, 2, 256, 4, 2, 32, 512),
    Shape("small-b", 256, 2, 256, 4, 2, 32, 512),
    Shape("small-c", 128, 2, 768, 4, 2, 32, 512),
    Shape("small-d", 128, 2, 256, 8, 2, 32, 512),
    Shape("small-e", 128, 2, 256, 4, 4, 32, 512),
    Shape("small-f", 128, 3, 256, 4, 2, 32, 512),
    Shape("small-g", 128, 2, 256, 4, 2, 64, 512),
    Shape("small-h", 192, 4, 384, 6, 3, 16, 512),
]
SMALL_LENGTHS = [256, 512]
CHECK = (Shape("check-360M-shape-4-layers", 960, 4, 2560, 15, 5, 64, 49152), 2048)


def kept_per_token(shape: Shape, r=16, rows=1, checkpointing=False, layers=None):
    """Bytes per token (batch 1) that one ABFT forward keeps for the backward, read off the saved
    tensors of the CPU run (bfloat16 model, float32 LoRA factors): per layer, peft's two float32
    copies of the layer input (q and k adapters) and their rank-r products, q / k / v / attention
    output in bfloat16, float32 log-sum-exp per head, the probe path's float32 keys and its
    rows' float32 statistics, the key mask; per layer but the last (the forward stops after its attention),
    RMSNorm's float32 inputs around the MLP and the three bfloat16 MLP intermediates; once,
    rotary cos / sin. With checkpointing only every layer's bfloat16 input stays.
    ``layers``: count only that many layers' terms (one layer: the recomputed one)."""
    h, n = shape.hidden, shape.layers if layers is None else layers
    if checkpointing:
        return 2 * h * n
    attn = (8 * h + 8 * r + 4 * shape.q_dim + 4 * shape.kv_dim + 4 * shape.heads
            + 4 * shape.kv_dim + 12 * shape.heads * rows + 1)
    mlp = 8 * h + 8 + 6 * shape.inter
    cos_sin = 4 * shape.head_dim
    return n * attn + max(n - 1, 0) * mlp + cos_sin


def measure(out):
    """Measure every shape at its lengths, with and without checkpointing; DIR/measured.csv with
    the prediction of :func:`kept_per_token` beside each measurement."""
    os.makedirs(out, exist_ok=True)
    rows = []
    for shape in SMALL + [CHECK[0]]:
        lengths = SMALL_LENGTHS if shape in SMALL else [CHECK[1]]
        with tempfile.TemporaryDirectory() as d:
            for length in lengths:
                for ck in (False, True):
                    model = load_4bit(shape, d)
                    got = saved_bytes(model, length, checkpointing=ck)
                    pred = length * kept_per_token(shape, checkpointing=ck)
                    rec = dict(asdict(shape), length=length, checkpointing=ck,
                               saved_bytes=got, predicted_saved_bytes=pred,
                               saved_ratio=round(pred / got, 5),
                               weight_bytes=weight_bytes(model),
                               predicted_weight_bytes=predicted_weights(shape, 16),
                               role="small" if shape in SMALL else "check")
                    rec["weight_ratio"] = round(rec["predicted_weight_bytes"] / rec["weight_bytes"], 5)
                    rows.append(rec)
                    print(json.dumps({k: rec[k] for k in ("name", "length", "checkpointing",
                                                          "saved_bytes", "saved_ratio",
                                                          "weight_bytes", "weight_ratio")}),
                          flush=True)
                    del model
    import bitsandbytes
    import torch
    import transformers
    with open(os.path.join(out, "measured.csv"), "w", newline="") as f:
        f.write(f"# torch {torch.__version__}, transformers {transformers.__version__}, "
                f"bitsandbytes {bitsandbytes.__version__}; CPU; `python scripts/memory_plan.py "
                "measure`\n")
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return rows


# ---------------------------------------------------------------------------------------------
# The plan

def predicted_weights(shape: Shape, r=16, other_bytes=2):
    """Resident bytes of the NF4 base (per-weight rounding), the bfloat16 rest and LoRA (fp32)."""
    h = shape.hidden
    per_layer = [h * shape.q_dim, h * shape.kv_dim, h * shape.kv_dim, shape.q_dim * h,
                 h * shape.inter, h * shape.inter, shape.inter * h]
    nf4 = shape.layers * sum(nf4_bytes(n) for n in per_layer)
    return nf4 + other_bytes * shape.other_params() + 4 * shape.lora_params(r)


def plan_rows(r=16, batch=1):
    out = []
    for shape in MODELS:
        for length in CONTEXTS:
            w = predicted_weights(shape, r)
            lora_state = 12 * shape.lora_params(r)  # fp32 gradient + Adam's two moments
            # the backward holds, on top of what is kept, the gradients inside the layer it is in:
            # assumed as large as that layer's kept tensors; with checkpointing that layer's
            # recomputed graph comes on top of the checkpoints too
            layer = batch * length * kept_per_token(shape, r, layers=1)
            plain = batch * length * kept_per_token(shape, r) + layer
            ck = batch * length * kept_per_token(shape, r, checkpointing=True) + 2 * layer
            # one de-quantised bfloat16 weight at a time (the largest), and CUDA's own
            transient = 2 * max(shape.hidden * shape.inter, shape.hidden * shape.q_dim) + CUDA_OVERHEAD
            out.append(dict(model=shape.name, context=length, weights=w, lora_state=lora_state,
                            act_plain=plain, act_ck=ck, total_plain=w + lora_state + plain + transient,
                            total_ck=w + lora_state + ck + transient))
    return out


def fits(total):
    return " / ".join("yes" if total <= cap else "no" for _, cap in GPUS)


def plan():
    print("| model | context | NF4 base + rest (GiB) | LoRA + Adam (GiB) | activations, no "
          "checkpointing (GiB) | activations, checkpointing (GiB) | total, checkpointing (GiB) "
          f"| fits {' / '.join(n for n, _ in GPUS)} (checkpointing) | (no checkpointing) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|")
    for r in plan_rows():
        print(f"| {r['model']} | {r['context'] // 1024}k | {r['weights'] / GIB:.1f} | "
              f"{r['lora_state'] / GIB:.2f} | {r['act_plain'] / GIB:.1f} | {r['act_ck'] / GIB:.1f} "
              f"| {r['total_ck'] / GIB:.1f} | {fits(r['total_ck'])} | {fits(r['total_plain'])} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--out", default="docs/results/qlora-memory")
    sub.add_parser("plan")
    args = p.parse_args(argv)
    if args.cmd == "measure":
        measure(args.out)
    else:
        plan()


if __name__ == "__main__":
    main()
