"""A causal LM's linear layers in 4-bit NF4 (bitsandbytes through transformers' quantisation
config): the QLoRA base. Embeddings, norms and the LM head stay in the load dtype; the quantised
weights cannot train (LoRA factors on top of them can)."""
from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["INSTALL", "check_bitsandbytes", "device_map", "from_pretrained", "is_4bit",
           "keep_differentiable", "nf4_config", "target_device"]

INSTALL = "pip install 'abft-fast[qlora]'  (or: pip install bitsandbytes)"


def check_bitsandbytes(device: str | torch.device | None = None) -> None:
    """Raise a clear error when 4-bit loading cannot work here: bitsandbytes missing (ImportError
    naming the package and the extra), or, when :func:`target_device` is a GPU, a
    bitsandbytes whose native library has no CUDA support for this torch (RuntimeError)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"4-bit loading (--load-in-4bit) needs bitsandbytes, which is not "
                          f"installed: {INSTALL}")
    dev = target_device(device)
    if dev.type != "cuda":
        return
    from bitsandbytes import cextension
    lib = getattr(cextension, "lib", None)
    if not isinstance(lib, getattr(cextension, "CudaBNBNativeLibrary", ())):
        import bitsandbytes
        raise RuntimeError(
            f"4-bit loading on {dev}: bitsandbytes {bitsandbytes.__version__} loaded no CUDA "
            f"library for torch {torch.__version__} (CUDA {torch.version.cuda}); its native "
            f"library is {type(lib).__name__}. Install a bitsandbytes build with CUDA support for "
            "this CUDA version, or run on the CPU.")


def target_device(device: str | torch.device | None = None) -> torch.device:
    """Where a 4-bit model goes: ``device`` if given, else this process's GPU (``LOCAL_RANK``
    under torchrun / accelerate) when CUDA is available, else the CPU. A 4-bit model trains on
    the device it was quantised on."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
    return torch.device("cpu")


def device_map(device: str | torch.device | None = None) -> dict | None:
    """``from_pretrained``'s device_map for :func:`target_device` (None: the CPU)."""
    dev = target_device(device)
    return None if dev.type == "cpu" else {"": dev}


def nf4_config(compute_dtype: torch.dtype | None = None,
               device: str | torch.device | None = None):
    """transformers' ``BitsAndBytesConfig``: NF4, double quantisation (the QLoRA recipe); compute
    dtype (unless given) bfloat16 when :func:`target_device` is a GPU, float32 on the CPU."""
    from transformers import BitsAndBytesConfig
    if compute_dtype is None:
        gpu = target_device(device).type == "cuda"
        compute_dtype = torch.bfloat16 if gpu else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)


def from_pretrained(path, *, device: str | torch.device | None = None,
                    compute_dtype: torch.dtype | None = None, **kwargs):
    """``AutoModelForCausalLM.from_pretrained(path, **kwargs)`` with the linear layers in NF4: the
    one way this package loads a 4-bit model. bitsandbytes is checked (:func:`check_bitsandbytes`),
    the config is :func:`nf4_config`, the model is placed on :func:`target_device` at load (never
    moved afterwards) and kept on bitsandbytes' differentiable path (:func:`keep_differentiable`)."""
    from transformers import AutoModelForCausalLM
    check_bitsandbytes(device)
    if "quantization_config" in kwargs:
        raise ValueError("a 4-bit load sets quantization_config itself; pass one or the other")
    kwargs["quantization_config"] = nf4_config(compute_dtype, device)
    dm = device_map(device)
    if dm is not None:
        kwargs.setdefault("device_map", dm)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    keep_differentiable(model)
    return model


def is_4bit(model) -> bool:
    """Whether ``model`` (or anything under it) holds bitsandbytes 4-bit weights."""
    if getattr(model, "is_loaded_in_4bit", False):
        return True
    return any(type(p).__name__ == "Params4bit" for p in model.parameters())


def _linear4bit(model) -> list:
    return [m for m in model.modules() if any(type(p).__name__ == "Params4bit"
                                               for p in m.parameters(recurse=False))]


def keep_differentiable(model) -> int:
    """Keep every 4-bit linear layer of ``model`` on bitsandbytes' differentiable path; returns how
    many layers it touched.

    On a CPU with AVX512-BF16, a bitsandbytes ``Linear4bit`` run in eval mode on an input without
    grad repacks its weight for a bfloat16 kernel that has no backward; every later call, training
    included, then takes that kernel, so gradients through the layer's input would be wrong with
    only a warning. This turns the repacking off and undoes it where it already happened.
    """
    layers = _linear4bit(model)
    for m in layers:
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
        w = m.weight
        qs = getattr(w, "quant_state", None)
        if qs is not None and getattr(qs, "packing_format_for_cpu", False):
            from bitsandbytes import functional as bnbf
            undo = getattr(bnbf, "_convert_weight_packed_for_cpu_inverse", None)
            if undo is None:  # pragma: no cover - depends on the bitsandbytes version
                raise RuntimeError("a 4-bit layer was repacked for bitsandbytes' CPU inference "
                                   "kernel (no backward) and this bitsandbytes cannot undo it: "
                                   "reload the model")
            w.data, w.quant_state = undo(w.data, qs)
    return len(layers)
