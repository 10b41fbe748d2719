"""Use ``abft_fast.attention`` inside your own ``nn.Module``.

A small causal self-attention block with grouped-query attention (GQA) takes a padded batch and
probe positions, and returns its output together with the attention probabilities of the probe
rows at the probe columns. The script checks both, and the gradients of a loss on both, against
the float64 reference ``abft_fast.ops.attention_reference`` (which builds the full L x L matrix;
the op never does).

Run:  python examples/custom_model_attention.py [--length 40] [--dim 64] [--heads 4] [--kv-heads 2]
On a CPU ``backend="auto"`` is the torch backend; with ``TRITON_INTERPRET=1`` set, try
``--backend triton`` (the fused kernels in Triton's interpreter; keep the sizes small) or
``--backend sdpa --no-padding`` (SDPA output + the Triton probe kernels).
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

import abft_fast
from abft_fast.ops import attention_reference


class CausalSelfAttention(nn.Module):
    """x [B, L, dim] -> (y [B, L, dim], probs [B, heads, R, C] or None)."""

    def __init__(self, dim: int, heads: int, kv_heads: int, window: int | None = None,
                 backend: str = "auto"):
        super().__init__()
        assert dim % heads == 0 and heads % kv_heads == 0
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.window, self.backend = window, backend
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, dim, bias=False)

    def qkv(self, x):
        b, seq, _ = x.shape
        def split(t, h):  # [B, L, h * D] -> [B, h, L, D] (SDPA layout)
            return t.view(b, seq, h, self.head_dim).transpose(1, 2)
        return (split(self.q_proj(x), self.heads), split(self.k_proj(x), self.kv_heads),
                split(self.v_proj(x), self.kv_heads))

    def forward(self, x, attention_mask=None, probe_rows=None, probe_cols=None, attn=None):
        q, k, v = self.qkv(x)
        attn = attn or (lambda *a, **kw: abft_fast.attention(*a, backend=self.backend, **kw))
        res = attn(q, k, v, causal=True, key_padding_mask=attention_mask, window=self.window,
                   probe_rows=probe_rows, probe_cols=probe_cols)
        out, probs = res[0], res[-1]  # the reference also returns lse in the middle
        b, _, seq, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, seq, -1)), probs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, default=40)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--window", type=int, default=None, help="sliding window (default: none)")
    p.add_argument("--padding", action=argparse.BooleanOptionalAction, default=True,
                   help="left-pad every sample but the first (--no-padding for backend sdpa)")
    p.add_argument("--backend", default="auto",
                   help="auto | torch | triton | cuda | sdpa (sdpa: unmasked only, no window)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    b, seq = args.batch, args.length
    block = CausalSelfAttention(args.dim, args.heads, args.kv_heads, args.window, args.backend)
    x = torch.randn(b, seq, args.dim)
    mask = None
    if args.padding:
        mask = torch.ones(b, seq, dtype=torch.bool)  # True = real token
        mask[1:, : seq // 4] = False                  # left padding in every sample but the first
    rows = torch.tensor([[seq - 1, seq // 2, -1]] * b)          # [B, R], -1 = unused slot
    cols = torch.randint(seq // 4, seq, (b, 4))                 # [B, C]
    cols[:, 0] = seq - 1

    # float32 run through abft_fast.attention, and a loss on both the output and the probes
    y, probs = block(x, mask, rows, cols)
    target = torch.randn_like(y)
    def loss_of(y, probs):
        return ((y - target) ** 2).mean() + (1.0 - probs[:, :, 0].sum(-1)).mean()
    loss = loss_of(y, probs)
    grads = torch.autograd.grad(loss, list(block.parameters()))
    print(f"backend {args.backend!r}: y {tuple(y.shape)}, probs {tuple(probs.shape)} "
          f"(B, heads, R, C), loss {loss.item():.6f}")
    print("last row, head 0, sample 0, columns", cols[0].tolist(), ":",
          " ".join(f"{v:.4f}" for v in probs[0, 0, 0].tolist()))

    # the same block in float64 through the L x L reference
    ref_block = CausalSelfAttention(args.dim, args.heads, args.kv_heads, args.window).double()
    ref_block.load_state_dict(block.state_dict())
    y64, p64 = ref_block(x.double(), mask, rows, cols, attn=attention_reference)
    loss64 = loss_of(y64, p64)
    grads64 = torch.autograd.grad(loss64, list(ref_block.parameters()))

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm().clamp(min=1e-30)).item()
    errs = {"y": rel(y, y64), "probs": rel(probs, p64)}
    for (name, _), g, g64 in zip(block.named_parameters(), grads, grads64):
        errs[f"d {name}"] = rel(g, g64)
    for name, e in errs.items():
        print(f"  relative error vs float64 reference  {name:16s} {e:.2e}")
    worst = max(errs.values())
    print(f"max relative error {worst:.2e} (float32 inputs)")
    if worst > 1e-4:
        raise SystemExit(f"mismatch: {worst:.3g}")


if __name__ == "__main__":
    main()
