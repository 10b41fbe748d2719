"""Probe recording: ``probe(model, rows, cols)`` collects every layer's probe probabilities
during one forward of a model running ``attn_implementation="abft_fast"``.

Gradient checkpointing (HF ``gradient_checkpointing_enable`` with ``use_reentrant=False``) is
supported: inside the context, each checkpointing layer's checkpoint function is wrapped so that
the checkpointed function carries its recorder with it. Its first call (the forward) records; a
second call of that same function (the recomputation during backward, after the context has
closed) gets the same probe indices -- so the recomputed attention saves the same tensors as the
first pass -- but records nothing. The probes recorded in the first pass keep the autograd graph
of the checkpointed forward, so ``loss(rec.probs).backward()`` works and gives the gradients of
the run without checkpointing. Reentrant checkpointing (whose forward runs without autograd) is
refused."""
from __future__ import annotations

import contextlib
import threading

import torch

from ..ops.spec import check_index_tensor, check_index_values
from . import fsdp

NAME = "abft_fast"
_FSDP_PATH = True  # probes on FSDP2's gradient path (hf/fsdp.py); False only to test without it
__all__ = ["NAME", "ProbeRecorder", "active_recorder", "attention_layers", "probe"]


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
        self._module_ids: set = set()
        self.recomputed: int = 0  # attention calls replayed by checkpoint recomputation

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
        replay = _replaying()
        if replay is not None and replay[0] is self:
            # Gradient-checkpointing recomputation: the probes of this call were recorded in the
            # first pass (with the graph that the recomputation now refills); keep those.
            self._check_replay(int(idx), probs, replay[1])
            return
        if idx in self.layers:
            raise RuntimeError(
                f"attention layer {idx} ran twice inside one probe() context (a second forward, "
                "generate(), or a recomputation the recorder does not know: only HF's non-reentrant "
                "gradient checkpointing is recognised); record one forward pass per "
                "`with probe(...)` block")
        self.layers.append(int(idx))
        self.per_layer.append(probs)

    def _check_replay(self, idx, probs, seen):
        if idx not in self.layers:
            raise RuntimeError(
                f"gradient-checkpointing recomputation ran attention layer {idx}, which the "
                f"recorded forward did not run (recorded layers {self.layers})")
        if idx in seen:
            raise RuntimeError(f"attention layer {idx} ran twice in one checkpoint recomputation")
        seen.add(idx)
        first = self.per_layer[self.layers.index(idx)]
        if first.shape != probs.shape or first.dtype != probs.dtype:
            raise RuntimeError(
                f"gradient-checkpointing recomputation of layer {idx} gave probes of shape "
                f"{tuple(probs.shape)} {probs.dtype}, the forward {tuple(first.shape)} "
                f"{first.dtype}: the recomputation is not the recorded forward")
        self.recomputed += 1


_lock = threading.Lock()
_active: dict[int, ProbeRecorder] = {}  # id(attention module) -> recorder of its model
_tls = threading.local()  # .stack: [(recorder, layers seen)] of checkpoint recomputations running


def _replaying():
    stack = getattr(_tls, "stack", None)
    return stack[-1] if stack else None


def active_recorder(module) -> ProbeRecorder | None:
    """The recorder of the ``probe`` context ``module`` runs in, if any (also while a
    gradient-checkpointing recomputation of a recorded forward replays ``module``)."""
    replay = _replaying()
    if replay is not None and id(module) in replay[0]._module_ids:
        return replay[0]
    return _active.get(id(module))


class _CheckpointedFunction:
    """The function a checkpointing layer hands to its checkpoint function, bound to a recorder:
    the first call is the recorded forward, later calls are recomputations (replays)."""

    def __init__(self, fn, rec, grad_outside):
        self.fn, self.rec, self.grad_outside = fn, rec, grad_outside
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 1:
            if self.grad_outside and not torch.is_grad_enabled():
                raise NotImplementedError(
                    "probe() does not support reentrant gradient checkpointing (its forward runs "
                    "without autograd, so the probes would have no gradient): enable it with "
                    "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
                    "{'use_reentrant': False})")
            return self.fn(*args, **kwargs)
        stack = getattr(_tls, "stack", None)
        if stack is None:
            stack = _tls.stack = []
        stack.append((self.rec, set()))
        try:
            return self.fn(*args, **kwargs)
        finally:
            stack.pop()


def _wrap_checkpointing(model, rec) -> list:
    """Bind every checkpointing layer's checkpoint function to ``rec`` (see the module doc).
    Returns [(module, original)] to restore."""
    wrapped = []
    for m in model.modules():
        orig = m.__dict__.get("_gradient_checkpointing_func")
        if orig is None or not getattr(m, "gradient_checkpointing", False):
            continue

        def ckpt(function, *args, _orig=orig, **kwargs):
            return _orig(_CheckpointedFunction(function, rec, torch.is_grad_enabled()),
                         *args, **kwargs)
        m._gradient_checkpointing_func = ckpt
        wrapped.append((m, orig))
    return wrapped


class _StopForward(Exception):
    """Raised inside the model to end a ``probe(..., stop_early=True)`` forward; caught by probe."""


def attention_layers(model) -> list:
    """The model's attention modules (HF attention classes with an int ``layer_idx``), by layer."""
    mods = [(m.layer_idx, m) for m in model.modules()
            if "Attention" in type(m).__name__ and isinstance(getattr(m, "layer_idx", None), int)]
    return [m for _, m in sorted(mods, key=lambda x: x[0])]


def _stop_hooks(model, units) -> tuple:
    """Hooks that end the forward once the last attention layer has recorded its probes: right
    after that layer, or under FSDP2 after the innermost unit holding it (whose post-forward hook
    must run to put the probes on its gradient path). Returns (hook handles, the after-unit
    callback for fsdp.attach or None)."""
    layers = attention_layers(model)
    if not layers:
        raise ValueError("probe(stop_early=True): the model has no attention module with a "
                         "layer_idx to stop after")
    last = layers[-1]

    def stop(*_):
        raise _StopForward
    holding = [u for u in units if any(m is last for m in u.modules())]
    if not holding:
        return [last.register_forward_hook(stop)], None
    inner = min(holding, key=lambda u: sum(1 for _ in u.modules()))
    return [], (lambda module: stop() if module is inner else None)


@contextlib.contextmanager
def probe(model: torch.nn.Module, rows: torch.Tensor, cols: torch.Tensor | None = None, *,
          stop_early: bool = False):
    """Record the attention probabilities ``P[row, col]`` of every layer during one forward.

    Args:
      model: a transformers model using ``attn_implementation="abft_fast"``.
      rows: [B, R] int64 query positions per sample (-1 = unused slot).
      cols: [B, C] int64 key positions per sample (-1 = unused), or None for full rows.

    Yields a :class:`ProbeRecorder`; after the forward, ``rec.probs`` is
    [num_layers, B, Hq, R, C] and ``rec.layers`` the layer indices that ran. Unused slots and
    masked (padding, future, out-of-window) entries are 0. The probes keep their autograd graph,
    also under HF's non-reentrant gradient checkpointing (its recomputation during backward, inside
    or after the context, replays the probes without recording them again), and under FSDP2
    (``fully_shard``): each unit's probes count as its outputs for FSDP's gradient hooks.

    stop_early: end the forward once the last attention layer has recorded its probes (the rest
    of the model does not run; under FSDP2, the rest of the unit holding that layer does). The
    model call then does not return: the ``with`` block is left at that call, so put nothing
    after it inside the block.
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
    rec = ProbeRecorder(rows, cols)
    ids = [id(m) for m in model.modules()]
    rec._module_ids = set(ids)
    with _lock:
        busy = [i for i in ids if i in _active]
        if busy:
            raise RuntimeError("probe() is already active on this model; nested probe contexts "
                               "on one model are not supported")
        for i in ids:
            _active[i] = rec
    wrapped, hooks = [], []
    try:
        wrapped = _wrap_checkpointing(model, rec)
        units = fsdp.fsdp_units(model) if _FSDP_PATH else []
        after_unit = None
        if stop_early:
            hooks, after_unit = _stop_hooks(model, units)
        if units:
            hooks += fsdp.attach(units, lambda: rec.per_layer, after_unit)
        try:
            yield rec
        except _StopForward:
            pass
    finally:
        for h in hooks:
            h.remove()
        for m, orig in wrapped:
            m._gradient_checkpointing_func = orig
        with _lock:
            for i in ids:
                if _active.get(i) is rec:
                    del _active[i]


