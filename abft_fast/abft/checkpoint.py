"""Resumable ABFT runs: atomic training checkpoints (``--save-every N`` / ``--resume DIR``).

A checkpoint is a directory ``step-000012/`` holding

- ``state.pt``: the trainable tensors (W_Q/W_K, or the LoRA factors) by name, the optimiser state,
  the PID controller, the data order and its RNG state, torch's RNG state, the step and the
  per-step history (``torch.save``, loaded with ``weights_only=True``);
- ``meta.json``: format version, step, the SHA-256 of ``state.pt``, and the run's fingerprint:
  the training config (all fields but ``steps``), the model (class, config, names / shapes /
  dtypes and checksums of the trainable tensors before training) and the data (data set and a
  hash of the tokenized training prompts).

It is written into ``step-000012.tmp-<pid>/`` first, flushed to disk, then renamed with
``os.replace``: a run killed while saving leaves only a ``.tmp-*`` directory, which is ignored.
Older checkpoints are deleted only after the new one is in place. Loading checks the hash, the
format and the fingerprint and only then returns the state: a corrupt or mismatching checkpoint is
refused with a ``CheckpointError`` before anything is applied to the model or the optimiser.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

import torch

__all__ = ["CheckpointError", "find_checkpoint", "fingerprint", "load_checkpoint",
           "save_checkpoint"]

FORMAT = "abft-train-checkpoint/1"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


class CheckpointError(ValueError):
    """A training checkpoint that cannot be used: missing, corrupt, or from another run."""


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _model_config(lm) -> dict:
    cfg = getattr(lm, "config", None)
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else {}
    for k in ("_name_or_path", "transformers_version", "_attn_implementation",
              "_attn_implementation_internal", "dtype", "torch_dtype", "use_cache",
              "gradient_checkpointing"):
        d.pop(k, None)
    return d


def fingerprint(cfg: dict, lm, named_trainable, encoded, dataset: str) -> dict:
    """What identifies a run: config (without ``steps``), model and data (see the module doc).
    ``named_trainable``: [(name, tensor)] of the trainable tensors BEFORE training."""
    tensors = []
    with torch.no_grad():
        for name, t in named_trainable:
            x = t.detach().double()
            tensors.append([name, list(t.shape), str(t.dtype), float(x.sum()),
                            float((x * x).sum())])
    data_hash = _digest([[e.input_ids, e.label_pos, e.demo_labels, e.query_label]
                         for e in encoded])
    return {
        "config": {k: v for k, v in cfg.items() if k != "steps"},
        "model": {"class": type(lm).__name__, "config_sha256": _digest(_model_config(lm)),
                  "trainable": tensors},
        "data": {"dataset": dataset, "prompts": len(encoded), "sha256": data_hash},
    }


def _compare(saved: dict, now: dict) -> list:
    """Human-readable differences between two fingerprints."""
    out = []
    sc, nc = saved.get("config", {}), now.get("config", {})
    for k in sorted(set(sc) | set(nc)):
        if sc.get(k) != nc.get(k):
            out.append(f"config {k}: checkpoint {sc.get(k)!r}, this run {nc.get(k)!r}")
    sm, nm = saved.get("model", {}), now.get("model", {})
    if sm.get("class") != nm.get("class"):
        out.append(f"model class: checkpoint {sm.get('class')}, this run {nm.get('class')}")
    if sm.get("config_sha256") != nm.get("config_sha256"):
        out.append("model config differs")
    st, nt = sm.get("trainable", []), nm.get("trainable", [])
    if [t[:3] for t in st] != [t[:3] for t in nt]:
        out.append(f"trainable tensors differ ({len(st)} in the checkpoint, {len(nt)} here; "
                   "names, shapes or dtypes)")
    else:
        for a, b in zip(st, nt):
            if any(abs(x - y) > 1e-6 * max(1.0, abs(y)) for x, y in zip(a[3:], b[3:])):
                out.append(f"initial weights differ (tensor {a[0]}): another model or "
                           "checkpoint of it")
                break
    sd, nd = saved.get("data", {}), now.get("data", {})
    if sd != nd:
        out.append(f"training data differ (checkpoint {sd.get('dataset')} x {sd.get('prompts')}, "
                   f"this run {nd.get('dataset')} x {nd.get('prompts')}; token hash "
                   f"{'equal' if sd.get('sha256') == nd.get('sha256') else 'different'})")
    return out


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root, step: int, state: dict, fp: dict, keep: int = 1) -> str:
    """Write ``state`` atomically as ``root/step-{step:06d}``; keep the newest ``keep``.
    Returns the checkpoint's path."""
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:06d}")
    tmp = f"{final}.tmp-{os.getpid()}"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    spath = os.path.join(tmp, "state.pt")
    with open(spath, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    h = hashlib.sha256()
    with open(spath, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    meta = {"format": FORMAT, "step": int(step), "state_sha256": h.hexdigest(),
            "state_bytes": os.path.getsize(spath), "fingerprint": fp}
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if os.path.exists(final):  # a re-run of this step: move the old one aside first
        old = f"{final}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    done = sorted((int(m.group(1)), n) for n in os.listdir(root)
                  if (m := _STEP_DIR.match(n)))
    for _, n in done[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(root, n), ignore_errors=True)
    return final


def find_checkpoint(path) -> str:
    """``path`` itself if it is a checkpoint, else its newest complete ``step-*`` checkpoint."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"--resume {path}: no such directory")
    if os.path.exists(os.path.join(path, "meta.json")):
        return path
    steps = sorted((int(m.group(1)), n) for n in os.listdir(path) if (m := _STEP_DIR.match(n)))
    if not steps:
        raise CheckpointError(f"--resume {path}: neither a checkpoint (meta.json + state.pt) nor "
                              "a directory holding step-NNNNNN checkpoints")
    return os.path.join(path, steps[-1][1])


def load_checkpoint(path, fp: dict) -> tuple:
    """(state, meta) of the checkpoint at ``path`` (see ``find_checkpoint``) after checking its
    integrity and that ``fp`` (this run's fingerprint) matches. Raises ``CheckpointError``."""
    ck = find_checkpoint(path)
    mpath, spath = os.path.join(ck, "meta.json"), os.path.join(ck, "state.pt")
    try:
        with open(mpath) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{ck}: unreadable meta.json ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{ck}: not an abft training checkpoint (format "
                              f"{meta.get('format') if isinstance(meta, dict) else None!r}, "
                              f"expected {FORMAT!r})")
    if not os.path.exists(spath):
        raise CheckpointError(f"{ck}: state.pt is missing")
    h = hashlib.sha256()
    with open(spath, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != meta.get("state_sha256"):
        raise CheckpointError(f"{ck}: state.pt is corrupt (SHA-256 {h.hexdigest()[:12]}..., "
                              f"meta.json says {str(meta.get('state_sha256'))[:12]}...)")
    diff = _compare(meta.get("fingerprint", {}), fp)
    if diff:
        raise CheckpointError(f"{ck} belongs to another run, refusing to resume: "
                              + "; ".join(diff))
    try:
        state = torch.load(spath, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise CheckpointError(f"{ck}: cannot load state.pt ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or state.get("step") != meta.get("step"):
        raise CheckpointError(f"{ck}: state.pt and meta.json disagree on the step")
    return state, meta
