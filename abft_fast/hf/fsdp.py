"""Probes on FSDP2's gradient path.

FSDP2 (``torch.distributed.fsdp.fully_shard``) re-gathers a unit's sharded weights for backward
from a hook on the unit's forward *outputs*. Probes leave a layer through the recorder, not through
its output, so a loss on probes alone reaches a unit whose weights were freed after forward (or, in
a one-unit model, never triggers the reduce-scatter of its gradients). While ``probe`` is active on
a model holding FSDP2 units, each unit's forward output is, for FSDP's own post-forward hook, the
pair (output, probes recorded inside the unit and not inside an inner unit); a hook after FSDP's
hands the output back. FSDP then treats the probes as the unit's outputs: backward from them
gathers the weights and reduce-scatters the gradients as for any output.
"""
from __future__ import annotations

import torch

__all__ = ["fsdp_units", "attach"]


def _fsdp_module_type():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return None
    return FSDPModule


def fsdp_units(model: torch.nn.Module) -> list:
    """The FSDP2 units (modules ``fully_shard`` was applied to) inside ``model``, outermost first."""
    t = _fsdp_module_type()
    return [] if t is None else [m for m in model.modules() if isinstance(m, t)]


_KEY = "_abft_fast_probes_on_fsdp_path"  # marks the output as FSDP's post-forward hook sees it


def attach(units: list, probes_of, after_unit=None) -> list:
    """Put probes on each FSDP unit's gradient path for one probed forward.

    probes_of(): the list of probe tensors recorded so far (grows during the forward).
    after_unit(module): called after a unit's forward and FSDP's post-forward hook (may raise to
    stop the forward there). Returns the hook handles; remove them when the forward is done."""
    handles, claimed = [], set()
    starts: dict[int, list[int]] = {}

    def pre(module, args):
        starts.setdefault(id(module), []).append(len(probes_of()))

    def wrap(module, args, out):  # before FSDP's post-forward
        start = starts[id(module)].pop()
        new = [p for p in probes_of()[start:] if id(p) not in claimed and p.requires_grad]
        claimed.update(id(p) for p in new)
        return {_KEY: True, "out": out, "probes": new} if new else out

    def unwrap(module, args, out):  # after FSDP's post-forward
        if isinstance(out, dict) and out.get(_KEY) is True:
            out = out["out"]
        if after_unit is not None:
            after_unit(module)
        return out

    for m in units:
        handles.append(m.register_forward_pre_hook(pre, prepend=True))
        handles.append(m.register_forward_hook(wrap, prepend=True))
        handles.append(m.register_forward_hook(unwrap))
    return handles
