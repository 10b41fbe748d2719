"""Which parameters ABFT trains (W_Q and W_K only, or LoRA factors on them), and their small
safetensors save / reload."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..hf.quant import is_4bit

__all__ = ["QKParam", "add_lora", "freeze_all_but_qk", "load_qk", "qk_parameters", "save_qk",
           "unwrap"]


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


def base_kind(model) -> str:
    """"nf4" for a 4-bit (bitsandbytes) base, else "full"; recorded in ``save_qk`` files."""
    return "nf4" if is_4bit(model) else "full"


def save_qk(model, path, full=None):
    """Save the trained W_Q/W_K (or LoRA factors) as a small safetensors file. ``full``:
    id(parameter) -> full tensor, for parameters sharded over processes (FSDP)."""
    from safetensors.torch import save_file
    qk = qk_parameters(model)
    tensors, meta = {}, {"format": "abft-qk", "lora": "0", "base": base_kind(model)}
    for q in qk:
        t = q.param.detach() if full is None or id(q.param) not in full else full[id(q.param)]
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
        if meta.get("lora") != "1" and is_4bit(model):
            raise ValueError(f"{path} holds full W_Q/W_K, which cannot be loaded into a 4-bit base "
                             "(its q/k weights are quantised): load the model without 4-bit")
        if meta.get("base", "full") != base_kind(model):
            warnings.warn(f"{path} was trained on a {meta.get('base', 'full')} base and is loaded "
                          f"onto a {base_kind(model)} one: the results differ from training's",
                          stacklevel=2)
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
