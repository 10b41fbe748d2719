"""HuggingFace transformers integration: ``attn_implementation="abft_fast"`` and probe collection.

Importing this package registers the name ``"abft_fast"`` with transformers'
``AttentionInterface`` (the attention function, :mod:`.attention`) and ``AttentionMaskInterface``
(the mask builder, :mod:`.masks`), so that::

    import abft_fast.hf as ah
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="abft_fast")
    # or: model.set_attn_implementation("abft_fast")
    with ah.probe(model, rows=rows, cols=cols) as rec:   # rows [B, R], cols [B, C] or None
        model(input_ids=ids, attention_mask=am)
    rec.probs   # [num_layers, B, Hq, R, C], differentiable

runs every attention layer on :func:`abft_fast.attention`. Masks reach the op as flags plus a
[B, Lk] key padding mask, never L x L. :mod:`.packaged` loads the models shipped in PyPI packages
offline. Needs transformers >= 4.53. Knows nothing of ABFT.
"""
from __future__ import annotations

from .attention import attention_forward, get_backend, set_backend
from .column_scores import ColumnScoreRecorder, column_scores
from .masks import AbftMask, UnsupportedMaskError, describe_mask_function, mask_builder
from .recorder import NAME, ProbeRecorder, attention_layers, probe

try:
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface
except ImportError as e:  # pragma: no cover - depends on the installed transformers
    from ._requirements import import_failure
    raise import_failure(e) from e

__all__ = ["NAME", "AbftMask", "ColumnScoreRecorder", "ProbeRecorder", "UnsupportedMaskError",
           "attention_forward", "attention_layers", "column_scores", "describe_mask_function", "get_backend",
           "mask_builder", "probe", "register", "set_backend"]


def register() -> None:
    """Register "abft_fast" with transformers (done on import; idempotent)."""
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask_builder)


register()
