"""One process of tests/hf/test_fsdp.py (run under torchrun, gloo, CPU), or the one-process reference.

For each case (layers, stop early, gradient checkpointing): a tiny random Llama with only q_proj /
k_proj trainable, ``fully_shard`` on every decoder layer and on the root (default resharding), two
Adam steps on a loss of probes alone (``abft_fast.hf.probe``), each process on its half of the
global batch. Saves, per case, the full q/k gradients of step 1, the full q/k weights after step
2, whether every decoder layer's q_proj weight was sharded (a DTensor) between forward and
backward, and any error. Usage: fsdp_worker.py OUT [--off] [--reference] [--cuda] (--cuda: the
model and batch on the process's GPU, NCCL instead of gloo).
"""
from __future__ import annotations

import os
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import abft_fast.hf as ah
from abft_fast.hf import recorder

CASES = [(layers, stop, ckpt) for layers in (4, 1) for stop in (False, True) for ckpt in (False, True)]
BATCH, L = 4, 16
DEVICE = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if "--cuda" in sys.argv \
    else torch.device("cpu")


def model_for(layers):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64)
    m = LlamaForCausalLM(cfg).to(DEVICE)
    m.set_attn_implementation("abft_fast")
    for n, p in m.named_parameters():
        p.requires_grad = "q_proj" in n or "k_proj" in n
    return m


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (BATCH, L), generator=g)
    rows = torch.full((BATCH, 1), L - 1)
    cols = torch.stack([torch.randperm(L - 1, generator=g)[:3] for _ in range(BATCH)])
    return ids.to(DEVICE), rows.to(DEVICE), cols.to(DEVICE)


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def run_case(layers, stop, ckpt, rank, world, sharded):
    from torch.distributed.tensor import DTensor
    m = model_for(layers)
    if ckpt:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()  # HF checkpoints in training mode only (no dropout in this Llama)
    else:
        m.eval()
    if sharded:
        from torch.distributed.fsdp import fully_shard
        for layer in m.model.layers:
            fully_shard(layer)
        fully_shard(m)
    params = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    opt = torch.optim.Adam([p for _, p in params], lr=1e-2)
    ids, rows, cols = batch()
    per = BATCH // world
    sl = slice(rank * per, (rank + 1) * per)
    out = {"sharded_between": True}
    for step in (1, 2):
        with ah.probe(m, rows[sl], cols[sl], stop_early=stop) as rec:
            m(input_ids=ids[sl], use_cache=False)
        probs = rec.probs
        if sharded:
            last = len(m.model.layers) - 1
            for i, layer in enumerate(m.model.layers):
                if stop and i == last:
                    continue  # the stopped layer's unit may keep its weights until backward
                out["sharded_between"] &= isinstance(layer.self_attn.q_proj.weight, DTensor)
        w = torch.linspace(-1.0, 2.0, probs[:, 0].numel(), device=DEVICE).view_as(probs[:, 0])
        loss = (probs * w[:, None]).sum() / BATCH * world  # mean over the global batch
        loss.backward()
        if step == 1:
            missing = [n for n, p in params if p.grad is None]
            out["missing"] = missing
            out["grads"] = {n: full(p.grad).detach().cpu() for n, p in params
                            if p.grad is not None}
        opt.step()
        opt.zero_grad(set_to_none=True)
    out["weights"] = {n: full(p).detach().cpu() for n, p in params}
    if sharded:
        out["all_dtensor_after"] = all(isinstance(p, DTensor) for _, p in params)
    return out


def main():
    path = sys.argv[1]
    if "--reference" in sys.argv:
        torch.save({c: run_case(*c, 0, 1, False) for c in CASES}, path)
        return
    import torch.distributed as dist
    if DEVICE.type == "cuda":
        torch.cuda.set_device(DEVICE)
    dist.init_process_group("nccl" if DEVICE.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    recorder._FSDP_PATH = "--off" not in sys.argv
    results = {}
    for c in CASES:
        try:
            results[c] = run_case(*c, rank, world, True)
        except Exception as e:  # noqa: BLE001 - recorded for the test, per case
            results[c] = {"error": f"{type(e).__name__}: {e}"[:500]}
        dist.barrier()
    if rank == 0:
        torch.save(results, path)
    dist.barrier()  # no rank tears gloo down while the other still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
