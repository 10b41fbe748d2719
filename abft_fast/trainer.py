"""ABFT training: only W_Q and W_K move, through accelerate, with the PID-steered loss.

The trainer uses only the public API: ``abft_fast.hf`` (probes on a HuggingFace model whose
attention implementation is "abft_fast"), nothing of the kernels.
"""
from __future__ import annotations

import math
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from . import data as D
from .loss import abft_loss
from .pid import PID


@dataclass
class TrainConfig:
    k: int = 4
    train_prompts: int = 512
    steps: int = 32
    batch: int = 32            # pseudo-batch: samples per optimizer step
    micro_batch: int = 4       # samples per forward; gradient accumulation = batch / micro_batch
    lr: float = 2e-5
    a0: float = 0.5
    b: float = 1.0
    use_filter: bool = True
    use_pid: bool = True
    cp: float = 0.03
    ci: float = 0.005
    cd: float = 0.005
    seed: int = 0
    lora: bool = False
    lora_r: int = 16
    stop_early: bool = True    # stop the forward after the last probed layer's attention

    def check(self):
        for name in ("k", "train_prompts", "steps", "batch", "micro_batch", "lora_r"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int; got {v!r}")
        if self.batch % self.micro_batch:
            raise ValueError(f"batch ({self.batch}) must be a multiple of micro_batch "
                             f"({self.micro_batch})")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number; got {self.lr!r}")
        for name in ("a0", "b"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number; got {v!r}")
        return self


# ------------------------------------------------------------------------ which parameters train

@dataclass
class QKParam:
    name: str
    param: nn.Parameter
    keep: tuple | None = None  # (dim, stop): only [..., :stop] along dim trains (fused QKV)


def unwrap(model):
    """The HF causal LM under DDP / accelerate / peft wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def qk_parameters(model) -> list:
    """W_Q and W_K (and their biases) of every attention layer.

    Separate projections (``q_proj``/``k_proj``: Llama, Gemma, Qwen, Mistral, ...) train whole;
    GPT-2's fused ``c_attn`` (output columns [Q | K | V]) trains only its first two thirds.
    With peft LoRA the LoRA factors of those modules train instead (for ``c_attn`` only the
    rows of lora_B that produce Q and K).
    """
    out, lora = [], any("lora_" in n for n, _ in model.named_parameters())
    for mname, mod in model.named_modules():
        leaf = mname.rsplit(".", 1)[-1]
        if leaf in ("q_proj", "k_proj"):
            for pname, p in mod.named_parameters():
                if lora and "lora_" not in pname:
                    continue
                if not lora and "." in pname:
                    continue
                out.append(QKParam(f"{mname}.{pname}", p))
        elif leaf == "c_attn" and hasattr(getattr(mod, "base_layer", mod), "nf"):
            nf = getattr(mod, "base_layer", mod).nf  # peft's LoRA wrapper keeps it in base_layer
            e = nf // 3
            if nf != 3 * e:
                raise ValueError(f"{mname}: fused c_attn width {nf} is not 3 x hidden")
            for pname, p in mod.named_parameters():
                if lora:
                    if "lora_B" in pname and pname.endswith("weight"):
                        out.append(QKParam(f"{mname}.{pname}", p, (0, 2 * e)))
                    elif "lora_A" in pname:
                        out.append(QKParam(f"{mname}.{pname}", p))
                elif pname == "weight":
                    out.append(QKParam(f"{mname}.{pname}", p, (1, 2 * e)))
                elif pname == "bias":
                    out.append(QKParam(f"{mname}.{pname}", p, (0, 2 * e)))
    if not out:
        raise ValueError(f"found no W_Q/W_K (q_proj/k_proj or GPT-2 c_attn) in "
                         f"{type(unwrap(model)).__name__}")
    return out


def _mask_hook(keep, shape):
    dim, stop = keep
    mask = torch.zeros(shape, dtype=torch.bool)
    idx = [slice(None)] * len(shape)
    idx[dim] = slice(0, stop)
    mask[tuple(idx)] = True

    def hook(g):
        return g.masked_fill(~mask.to(g.device), 0.0)
    return hook


def freeze_all_but_qk(model) -> list:
    """requires_grad only on W_Q/W_K; fused Q/K/V get a gradient mask that zeros the V part."""
    qk = qk_parameters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for q in qk:
        q.param.requires_grad_(True)
        if q.keep is not None:
            q.param.register_hook(_mask_hook(q.keep, q.param.shape))
    return qk


def add_lora(model, r=16, alpha=None):
    """Wrap ``model`` with peft LoRA of rank r on the query and key projections."""
    from peft import LoraConfig, get_peft_model
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets = ["q_proj", "k_proj"] if "q_proj" in names else ["c_attn"] if "c_attn" in names else None
    if targets is None:
        raise ValueError(f"LoRA: no q_proj/k_proj or c_attn in {type(model).__name__}")
    cfg = LoraConfig(r=r, lora_alpha=alpha or 2 * r, lora_dropout=0.0, target_modules=targets,
                     bias="none", fan_in_fan_out=targets == ["c_attn"])
    return get_peft_model(model, cfg)


# -------------------------------------------------------------------------- save / reload q/k

def save_qk(model, path):
    """Save the trained W_Q/W_K (or LoRA factors) as a small safetensors file."""
    from safetensors.torch import save_file
    qk = qk_parameters(model)
    tensors, meta = {}, {"format": "abft-qk", "lora": "0"}
    for q in qk:
        t = q.param.detach()
        if q.keep is not None:
            dim, stop = q.keep
            t = t.narrow(dim, 0, stop)
            meta[q.name] = f"{dim}:{stop}"
        tensors[q.name] = t.contiguous().cpu()
    if any("lora_" in q.name for q in qk):
        m = [m for m in (model, getattr(model, "module", None)) if hasattr(m, "peft_config")]
        cfg = m[0].peft_config["default"] if m else None
        meta["lora"] = "1"
        if cfg is not None:
            meta["lora_r"], meta["lora_alpha"] = str(cfg.r), str(cfg.lora_alpha)
    save_file(tensors, str(path), metadata=meta)


def load_qk(model, path):
    """Load ``save_qk`` output into ``model`` (wrapping it with LoRA first if the file holds LoRA
    factors and the model has none). Returns the model to use."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "abft-qk":
            raise ValueError(f"{path}: not an abft-qk file (metadata {meta})")
        if meta.get("lora") == "1" and not any("lora_" in n for n, _ in model.named_parameters()):
            model = add_lora(model, int(meta.get("lora_r", 16)), int(meta.get("lora_alpha", 32)))
        qk = {q.name: q for q in qk_parameters(model)}
        keys = set(f.keys())
        if keys != set(qk):
            raise ValueError(f"{path}: tensors do not match the model's q/k parameters "
                             f"(missing {sorted(set(qk) - keys)[:3]}, extra {sorted(keys - set(qk))[:3]})")
        with torch.no_grad():
            for name in keys:
                t, q = f.get_tensor(name), qk[name]
                dst = q.param if q.keep is None else q.param.narrow(q.keep[0], 0, q.keep[1])
                if dst.shape != t.shape:
                    raise ValueError(f"{path}: {name} has shape {tuple(t.shape)}, model "
                                     f"{tuple(dst.shape)}")
                dst.copy_(t.to(dst.dtype))
    return model


# ------------------------------------------------------------------------------ the objective

class StopForward(Exception):
    """Raised after the last probed layer's attention to skip the rest of the forward."""


def attention_modules(model) -> list:
    """Attention modules with a ``layer_idx``, ordered by layer."""
    mods = [(m.layer_idx, m) for m in unwrap(model).modules()
            if "Attention" in type(m).__name__ and isinstance(getattr(m, "layer_idx", None), int)]
    return [m for _, m in sorted(mods, key=lambda x: x[0])]


@contextmanager
def stop_after(module):
    def hook(*_):
        raise StopForward
    h = module.register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


class ProbeForward(nn.Module):
    """forward(input_ids, attention_mask, rows, cols) -> probe probs [layers, B, H, R, C].

    Wrapping the probe in one module keeps DDP/FSDP wrapping (accelerate.prepare) on a module
    whose forward returns the tensors the loss needs; with ``stop_early`` the forward ends right
    after the last layer's attention (no final MLP, norm or LM head).
    """

    def __init__(self, model, stop_early=True):
        super().__init__()
        self.model = model
        self.stop_early = stop_early

    def forward(self, input_ids, attention_mask, rows, cols):
        from . import hf
        lm = unwrap(self.model)
        attn = attention_modules(lm) if self.stop_early else []
        with hf.probe(lm, rows=rows, cols=cols) as rec:
            if attn:
                with stop_after(attn[-1]):
                    try:
                        self.model(input_ids=input_ids, attention_mask=attention_mask,
                                   use_cache=False)
                    except StopForward:
                        pass
            else:
                self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return rec.probs


# ----------------------------------------------------------------------------------- training

@dataclass
class TrainResult:
    history: list = field(default_factory=list)  # per step: loss, A, passing, mass_correct, ...
    seconds: float = 0.0
    config: dict = field(default_factory=dict)
    model: object = None                          # the trained model (LoRA-wrapped with --lora)


def train(model, tokenizer, task: D.Task, cfg: TrainConfig, progress=True, accelerator=None):
    """ABFT on ``task``'s pool prompts. Returns a ``TrainResult``; trains ``model`` in place."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    cfg.check()
    set_seed(cfg.seed)
    if cfg.lora:
        model = add_lora(model, cfg.lora_r)
    freeze_all_but_qk(model)
    prompts = D.training_prompts(task, cfg.train_prompts, cfg.k, cfg.seed)
    label_ids = D.label_token_ids(tokenizer, task.label_words, task.template.label_prefix)
    encoded = D.encode(tokenizer, prompts, label_ids=label_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    n_micro = cfg.batch // cfg.micro_batch
    acc = accelerator or Accelerator(gradient_accumulation_steps=1)
    if n_micro % acc.num_processes:
        raise ValueError(f"batch / micro_batch = {n_micro} must be a multiple of the "
                         f"{acc.num_processes} processes")
    acc.gradient_accumulation_steps = n_micro // acc.num_processes
    acc.step = 0
    objective = ProbeForward(model, cfg.stop_early)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    objective, opt = acc.prepare(objective, opt)
    objective.eval()  # no dropout: the ABFT loss is deterministic; gradients flow in eval mode

    rng = random.Random(cfg.seed)
    order: list = []

    def next_items(n):
        nonlocal order
        out = []
        while len(out) < n:
            if not order:
                order = list(range(len(encoded)))
                rng.shuffle(order)
            out.append(encoded[order.pop()])
        return out

    pid = PID(cfg.a0, cfg.cp, cfg.ci, cfg.cd, enabled=cfg.use_pid)
    a = cfg.a0
    result = TrainResult(config=asdict(cfg))
    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.steps, desc=f"ABFT {task.name}", unit="step",
               disable=not progress or not acc.is_main_process)
    t0 = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        ts = time.perf_counter()
        sums = torch.zeros(5, dtype=torch.float64)  # loss*n, passing, m_pos, m_neg, n
        # The step's samples, sorted by length so micro-batches carry little padding (the
        # accumulated gradient is the same sum whatever the grouping).
        step_items = sorted(next_items(cfg.batch), key=lambda e: len(e.input_ids))
        for j in range(n_micro):
            items = step_items[j * cfg.micro_batch:(j + 1) * cfg.micro_batch]
            if j % acc.num_processes != acc.process_index:
                continue
            b = D.collate(items, pad).to(acc.device)
            with acc.accumulate(objective):
                probs = objective(b.input_ids, b.attention_mask, b.rows, b.cols)
                valid = b.cols >= 0
                out = abft_loss(probs, b.correct, valid, b.lengths, A=a, B=cfg.b,
                                use_filter=cfg.use_filter)
                acc.backward(out.loss)
                opt.step()
                opt.zero_grad(set_to_none=True)
            nb = len(items)
            sums += torch.tensor([out.loss.item() * nb, out.passing.sum().item(),
                                  out.mass_correct.mean((0, 2)).sum().item(),
                                  out.mass_wrong.mean((0, 2)).sum().item(), nb], dtype=torch.float64)
        sums = acc.reduce(sums.to(acc.device), "sum").cpu()
        n = sums[4].item()
        rec = {"step": step, "loss": sums[0].item() / n, "A": a, "passing_heads": sums[1].item() / n,
               "loss_per_passing_head": sums[0].item() / max(sums[1].item(), 1.0),
               "mass_correct": sums[2].item() / n, "mass_wrong": sums[3].item() / n,
               "seconds": time.perf_counter() - ts}
        result.history.append(rec)
        a = pid.update(rec["passing_heads"])
        bar.set_postfix(loss=f"{rec['loss']:.3f}", A=f"{rec['A']:.3f}",
                        heads=f"{rec['passing_heads']:.1f}")
        bar.update(1)
    bar.close()
    result.seconds = time.perf_counter() - t0
    result.model = acc.unwrap_model(objective).model
    return result
