"""Probe recording: ``probe(model, rows, cols)`` collects every layer's probe probabilities
during one forward of a model running ``attn_implementation="abft_fast"``."""
from __future__ import annotations

import contextlib
import threading

import torch

from ..ops.spec import check_index_tensor, check_index_values

NAME = "abft_fast"
__all__ = ["NAME", "ProbeRecorder", "active_recorder", "probe"]


class ProbeRecorder:
    """Probe probabilities recorded by :func:`probe` during one forward pass.

    rows: [B, R] int64 query positions (-1 = unused slot); cols: [B, C] int64 key positions or
    None (full rows). Positions index the padded sequence of the forward (0 .. L-1).
    """

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor | None):
        self.rows = rows
        self.cols = cols
        self.per_layer: list[torch.Tensor] = []  # [B, Hq, R, C] each, in call order
        self.layers: list[int] = []  # layer index of each entry of per_layer
        self._on_device: dict = {}
        self._checked: set = set()

    @property
    def probs(self) -> torch.Tensor:
        """[num_layers_run, B, Hq, R, C] (C = Lk when cols is None); float32 for 16/32-bit models
        (float64 for float64 models); keeps the autograd graph."""
        if not self.per_layer:
            raise RuntimeError(
                "no attention layer recorded probes: run the model inside `with probe(...)`, "
                "with attn_implementation='abft_fast'")
        shapes = {tuple(p.shape) for p in self.per_layer}
        if len(shapes) != 1:
            raise RuntimeError(f"layers recorded probes of different shapes {sorted(shapes)}; "
                               "use rec.per_layer")
        return torch.stack(self.per_layer)

    def _indices(self, device):
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = (self.rows.to(device),
                                    None if self.cols is None else self.cols.to(device))
        return self._on_device[key]

    def _check_sizes(self, b, lq, lk):
        if (b, lq, lk) in self._checked:  # once per shape: the checks synchronise the device
            return
        if self.rows.shape[0] != b:
            raise ValueError(f"probe rows have batch size {self.rows.shape[0]}, the forward has "
                             f"{b}")
        check_index_values("probe rows", self.rows, lq)
        if self.cols is not None:
            check_index_values("probe cols", self.cols, lk)
        self._checked.add((b, lq, lk))

    def _record(self, module, probs):
        idx = getattr(module, "layer_idx", None)
        if idx is None:
            idx = len(self.layers)
        if idx in self.layers:
            raise RuntimeError(
                f"attention layer {idx} ran twice inside one probe() context (a second forward, "
                "generate(), or gradient-checkpointing recomputation); record one forward pass per "
                "`with probe(...)` block")
        self.layers.append(int(idx))
        self.per_layer.append(probs)


_lock = threading.Lock()
_active: dict[int, ProbeRecorder] = {}  # id(attention module) -> recorder of its model


def active_recorder(module) -> ProbeRecorder | None:
    """The recorder of the ``probe`` context ``module`` runs in, if any."""
    return _active.get(id(module))


@contextlib.contextmanager
def probe(model: torch.nn.Module, rows: torch.Tensor, cols: torch.Tensor | None = None):
    """Record the attention probabilities ``P[row, col]`` of every layer during one forward.

    Args:
      model: a transformers model using ``attn_implementation="abft_fast"``.
      rows: [B, R] int64 query positions per sample (-1 = unused slot).
      cols: [B, C] int64 key positions per sample (-1 = unused), or None for full rows.

    Yields a :class:`ProbeRecorder`; after the forward, ``rec.probs`` is
    [num_layers, B, Hq, R, C] and ``rec.layers`` the layer indices that ran. Unused slots and
    masked (padding, future, out-of-window) entries are 0. The probes keep their autograd graph.
    """
    rows = check_index_tensor("rows", rows, strict_dtype=False)
    check_index_values("rows", rows, None)
    if cols is not None:
        cols = check_index_tensor("cols", cols, batch=rows.shape[0], strict_dtype=False)
        check_index_values("cols", cols, None)
    cfg = getattr(model, "config", None)
    impl = getattr(cfg, "_attn_implementation", None)
    if impl != NAME:
        raise ValueError(
            f"probe() needs a model running attn_implementation={NAME!r}, this one uses {impl!r}: "
            f"load it with attn_implementation={NAME!r} or call "
            f"model.set_attn_implementation({NAME!r}) (after `import abft_fast.hf`)")
    gc_attr = ("is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing")
               else "is_gradient_checkpointing")
    if getattr(model, gc_attr, False) and model.training:
        raise NotImplementedError(
            "probe() does not support gradient checkpointing (the recomputation would run the "
            "attention again outside the recorded forward); call "
            "model.gradient_checkpointing_disable()")
    rec = ProbeRecorder(rows, cols)
    ids = [id(m) for m in model.modules()]
    with _lock:
        busy = [i for i in ids if i in _active]
        if busy:
            raise RuntimeError("probe() is already active on this model; nested probe contexts "
                               "on one model are not supported")
        for i in ids:
            _active[i] = rec
    try:
        yield rec
    finally:
        with _lock:
            for i in ids:
                if _active.get(i) is rec:
                    del _active[i]


