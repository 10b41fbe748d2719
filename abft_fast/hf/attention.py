"""The attention function registered under "abft_fast" in transformers' ``AttentionInterface``:
each layer's call goes to :func:`abft_fast.attention` with the flags and padding mask of its
:class:`~abft_fast.hf.masks.AbftMask`, and with the probe indices of an active ``probe`` context."""
from __future__ import annotations

import torch

from ..ops import BACKENDS
from ..ops import attention_prechecked as _attention
from .column_scores import record_column_scores
from .masks import AbftMask, UnsupportedMaskError, from_dense
from .recorder import active_recorder

__all__ = ["attention_forward", "get_backend", "set_backend"]

_backend = "auto"


def set_backend(name: str) -> None:
    """Backend used by every "abft_fast" attention layer: one of ``abft_fast.BACKENDS`` ("auto",
    the default, "sdpa", "triton", "cuda", "torch"; see :func:`abft_fast.attention`)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    """The backend set by :func:`set_backend`."""
    return _backend


_REFUSED_KWARGS = {
    "s_aux": "attention sinks", "sinks": "attention sinks",
    "cu_seq_lens_q": "packed (varlen) sequences", "cu_seq_lens_k": "packed (varlen) sequences",
    "max_length_q": "packed (varlen) sequences", "max_length_k": "packed (varlen) sequences",
}


def _refuse(module, query, key, dropout, softcap, head_mask, kwargs):
    name = type(module).__name__
    if kwargs.get("output_attentions"):
        raise ValueError(
            "output_attentions=True is not supported with attn_implementation='abft_fast' (it "
            "would need the L x L matrices); use abft_fast.hf.probe(model, rows, cols) for the "
            "probabilities you need, or attn_implementation='eager'")
    if getattr(module, "is_cross_attention", False) or getattr(
            getattr(module, "config", None), "is_encoder_decoder", False):
        raise NotImplementedError(
            f"abft_fast supports decoder self-attention only; {name} is cross-attention or part "
            "of an encoder-decoder model")
    if head_mask is not None:
        raise NotImplementedError("head_mask is not supported with attn_implementation='abft_fast'")
    if softcap is not None:
        raise NotImplementedError(
            f"attention logit soft-capping (softcap={softcap}) is not supported with "
            "attn_implementation='abft_fast'")
    if dropout and module.training:
        raise NotImplementedError(
            f"attention dropout (p={dropout}) in training mode is not supported with "
            "attn_implementation='abft_fast': set the config's attention dropout to 0 "
            "(attention_dropout / attn_pdrop) or call model.eval()")
    for k, what in _REFUSED_KWARGS.items():
        if kwargs.get(k) is not None:
            raise NotImplementedError(f"{what} (`{k}`) are not supported with "
                                      "attn_implementation='abft_fast'")
    if query.shape[0] != key.shape[0]:
        raise ValueError(f"query batch {query.shape[0]} != key batch {key.shape[0]}")


def _scaling(module, query, scaling):
    """The softmax scale: as given, else GPT-2's rule in transformers 4.5x (which passes none)."""
    if scaling is not None:
        return scaling
    if hasattr(module, "scale_attn_weights"):  # GPT-2 family
        s = query.shape[-1] ** -0.5 if module.scale_attn_weights else 1.0
        if getattr(module, "scale_attn_by_inverse_layer_idx", False):
            s /= float(module.layer_idx + 1)
        return s
    return None  # abft_fast.attention's default, head_dim ** -0.5


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      sliding_window=None, softcap=None, head_mask=None, **kwargs):
    """Attention function registered under "abft_fast" in ``AttentionInterface``.

    query: [B, Hq, Lq, D]; key, value: [B, Hkv, Lk, D]; attention_mask: an :class:`AbftMask`
    (built by :func:`mask_builder`) or None (then causal iff ``module.is_causal``, no padding).
    Returns (out [B, Lq, Hq, D], None): attention weights are never materialised. Query rows at
    padded positions give 0 (as in HF's flash-attention path) when the mask builder read the
    padding; their output reaches no real token.
    """
    _refuse(module, query, key, dropout, softcap, head_mask, kwargs)
    lq, lk = query.shape[2], key.shape[2]
    padding = None
    mod_window = sliding_window if sliding_window is not None else getattr(
        module, "sliding_window", None)
    kpm = None
    if isinstance(attention_mask, AbftMask):
        m = attention_mask
        causal, window = m.causal, m.window
        if m.q_length != lq or m.kv_length != lk or m.batch_size != query.shape[0]:
            raise ValueError(
                f"abft_fast: the mask was built for [B={m.batch_size}, Lq={m.q_length}, "
                f"Lk={m.kv_length}] but {type(module).__name__} got query [B={query.shape[0]}, "
                f"Lq={lq}] and key Lk={lk}")
        if mod_window is not None and window != mod_window:
            raise UnsupportedMaskError(
                f"abft_fast: {type(module).__name__} uses sliding_window={mod_window} but its mask "
                f"has window={window}")
        kpm = m.key_padding_mask
        # The kernel aligns the last query with the last key. Keys past the last query's
        # position (a static cache's free slots) are invisible to every query: drop them.
        end = m.q_offset + lq - m.kv_offset
        if end > lk or end < 1:
            raise UnsupportedMaskError(
                f"abft_fast: queries at positions [{m.q_offset}, {m.q_offset + lq}) and keys at "
                f"[{m.kv_offset}, {m.kv_offset + lk}) cannot be aligned (the last query must see "
                "the last key or keys must end after it)")
        if end == lk and m.padding is not None:
            padding = m.padding  # the runs read once per forward: the varlen kernel can run
        if end < lk:
            if not causal and kpm is not None and bool(kpm[:, end:].any()):
                raise UnsupportedMaskError("abft_fast: bidirectional attention to keys after the "
                                           "last query is not supported")
            key, value = key[:, :, :end], value[:, :, :end]
            kpm = None if kpm is None else kpm[:, :end]
    elif attention_mask is None:
        is_causal = kwargs.get("is_causal")  # a hint some models pass for a None mask
        causal = bool(getattr(module, "is_causal", True) if is_causal is None or lq == 1
                      else is_causal)
        window = mod_window if causal else None
    elif isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        causal, window, kpm = from_dense(attention_mask, query.shape[0], lq, lk, mod_window,
                                          type(module).__name__)
    else:
        raise UnsupportedMaskError(
            f"abft_fast received an attention mask of type {type(attention_mask).__name__} "
            f"{tuple(getattr(attention_mask, 'shape', ()))}; it takes the masks built by its own "
            "mask interface (from a 2-D padding mask given to the model) or a dense 4-D mask that "
            "is exactly padding x causal (x window). Pass a 2-D attention_mask, or use "
            "attn_implementation='sdpa' / 'eager'.")
    scaling = _scaling(module, query, scaling)
    kpm = kpm if padding is None else padding
    record_column_scores(module, query, key, causal=causal, scale=scaling, key_padding_mask=kpm,
                         window=window, backend=_backend)

    rec = active_recorder(module)
    rows = cols = None
    if rec is not None:
        rows, cols = rec._indices(query.device)
        rec._check_sizes(query.shape[0], lq, key.shape[2])
    out, probs = _attention(query, key, value, causal=causal, scale=scaling,
                            key_padding_mask=kpm, window=window, probe_rows=rows, probe_cols=cols,
                            backend=_backend)
    if rec is not None:
        rec._record(module, probs)
    return out.transpose(1, 2).contiguous(), None
