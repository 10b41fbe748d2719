"""The ABFT objective's forward: probe probabilities of every layer through the public
``abft_fast.hf.probe`` API, optionally stopping right after the last probed attention layer."""
from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from .. import hf
from .params import unwrap

__all__ = ["ProbeForward", "StopForward", "attention_modules", "stop_after"]


class StopForward(Exception):
    """Raised after the last probed layer's attention to skip the rest of the forward."""


def attention_modules(model) -> list:
    """Attention modules with a ``layer_idx``, ordered by layer (``abft_fast.hf.attention_layers``
    of the unwrapped model)."""
    return hf.attention_layers(unwrap(model))


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
    after the last layer's attention (no final MLP, norm or LM head; under FSDP2 after the unit
    holding it: ``abft_fast.hf.probe(..., stop_early=True)``).
    """

    def __init__(self, model, stop_early=True):
        super().__init__()
        self.model = model
        self.stop_early = stop_early

    def forward(self, input_ids, attention_mask, rows, cols):
        lm = unwrap(self.model)
        with hf.probe(lm, rows=rows, cols=cols, stop_early=self.stop_early) as rec:
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return rec.probs
