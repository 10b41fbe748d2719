"""Mask translation: what transformers asks for -> causal / window flags + a [B, Lk] key padding
mask (an :class:`AbftMask`), never an L x L tensor.

The mask builder registered under "abft_fast" in ``AttentionMaskInterface`` turns the mask
functions of ``transformers.masking_utils`` (causal, sliding-window causal, bidirectional) plus
the 2-D padding mask into an :class:`AbftMask`, and refuses anything else (packed sequences,
chunked attention, custom mask overlays) with an error naming the mask. A dense 4-D mask (a model
that still builds one, or one given by the caller) is accepted only if it is exactly padding x
causal (x window) and is then read back into flags + padding.
"""
from __future__ import annotations

import dataclasses
import inspect

import torch

from ..ops import Padding
from ..ops.masks import visible

try:
    from transformers import masking_utils as _mu
except ImportError as e:  # pragma: no cover - depends on the installed transformers
    raise ImportError(
        "abft_fast.hf needs transformers >= 4.53 (transformers.masking_utils with "
        f"AttentionMaskInterface): {e}. Upgrade with `pip install 'transformers>=4.53'`.") from e

__all__ = ["AbftMask", "UnsupportedMaskError", "describe_mask_function", "from_dense",
           "mask_builder"]


@dataclasses.dataclass(frozen=True)
class AbftMask:
    """The mask transformers hands to each "abft_fast" layer: flags plus a key padding mask.

    Query i of the layer sits at absolute position ``q_offset + i``, key j at ``kv_offset + j``.
    Key j is visible to query i iff ``key_padding_mask[b, j]`` (when not None), and, when
    ``causal``, ``kpos <= qpos`` and (with ``window``) ``kpos > qpos - window``.

    key_padding_mask: [B, kv_length] bool, True = real token, or None (no padding).
    padding: the same mask as an :class:`abft_fast.Padding` (read on the host once, when the mask
    was built; ``zero_padded_queries=True``: padded query rows give 0, as HF's flash-attention
    path does), or None (no padding, or under torch.compile).
    """
    key_padding_mask: torch.Tensor | None
    causal: bool
    window: int | None
    batch_size: int
    q_length: int
    kv_length: int
    q_offset: int
    kv_offset: int
    padding: Padding | None = None

    # A prepared mask may travel back into a model's forward (generate() with a static cache builds
    # masks ahead of the forward); these let transformers' mask code pass it through untouched.
    ndim = 4

    @property
    def shape(self):
        return (self.batch_size, 1, self.q_length, self.kv_length)

    def contiguous(self):
        return self

    def to(self, *args, **kwargs):
        """Move the padding mask; it stays bool whatever dtype is asked for."""
        if self.key_padding_mask is None:
            return self
        kpm = self.key_padding_mask.to(*args, **kwargs).to(torch.bool)
        pad = self.padding and dataclasses.replace(self.padding, mask=kpm, cache={})
        return dataclasses.replace(self, key_padding_mask=kpm, padding=pad)


class UnsupportedMaskError(ValueError):
    """The requested attention pattern cannot be expressed by abft_fast's flags + padding mask."""


def _closure(fn) -> dict:
    try:
        return dict(inspect.getclosurevars(fn).nonlocals)
    except (TypeError, ValueError):
        return {}


def _mask_parts(fn):
    """Flatten ``and_masks`` combinations into their parts; anything else is one part."""
    if getattr(fn, "__qualname__", "").startswith("and_masks.<locals>."):
        parts = _closure(fn).get("mask_functions")
        if isinstance(parts, (tuple, list)):
            out = []
            for p in parts:
                out.extend(_mask_parts(p))
            return out
    return [fn]


@torch._dynamo.assume_constant_result  # introspection: evaluated once when torch.compile traces
def describe_mask_function(fn) -> tuple[bool, int | None]:
    """(causal, window) for the mask functions of ``transformers.masking_utils`` that abft_fast can
    express: ``causal_mask_function``, ``sliding_window_causal_mask_function(w)`` and
    ``bidirectional_mask_function``. Raises :class:`UnsupportedMaskError` for anything else."""
    causal, windows = False, []
    for part in _mask_parts(fn):
        qn = getattr(part, "__qualname__", repr(part))
        if part is _mu.causal_mask_function:
            causal = True
        elif part is getattr(_mu, "bidirectional_mask_function", None):
            pass
        elif qn.startswith("sliding_window_overlay.<locals>."):
            w = _closure(part).get("sliding_window")
            if not isinstance(w, int) or isinstance(w, bool) or w < 1:
                raise UnsupportedMaskError(f"abft_fast: sliding window overlay with window {w!r}")
            windows.append(w)
        else:
            raise UnsupportedMaskError(
                f"abft_fast cannot express the attention mask built from `{qn}` (part of `"
                f"{getattr(fn, '__qualname__', fn)}`): the kernel takes causal / sliding-window "
                "flags plus a 2-D key padding mask only, so packed sequences (detected from "
                "position_ids), chunked attention and custom or_mask/and_mask overlays (e.g. "
                "bidirectional or image-token masks) are not supported. Use "
                "attn_implementation='sdpa' or 'eager' for this model or input.")
    if windows and not causal:
        raise UnsupportedMaskError("abft_fast: a sliding window without a causal mask is not "
                                   "supported (the kernel's window is causal)")
    return causal, (min(windows) if windows else None)


def mask_builder(batch_size, q_length=None, kv_length=None, q_offset=0, kv_offset=0,
                 mask_function=None, attention_mask=None, cache_position=None,
                 **kwargs) -> AbftMask:
    """Mask function registered under "abft_fast" in ``AttentionMaskInterface``.

    Called by transformers' ``create_causal_mask`` & co. with the 2-D padding mask
    ``attention_mask`` ([B, >= kv_offset + kv_length] bool or None, indexed by absolute key
    position) and a ``mask_function``; returns an :class:`AbftMask` (no L x L tensor).
    transformers 5.x passes ``q_length`` / ``q_offset``; 4.5x passes ``cache_position`` (the
    queries' absolute positions, [Lq]) instead.
    """
    if mask_function is None:
        mask_function = _mu.causal_mask_function
    causal, window = describe_mask_function(mask_function)
    if q_length is None:
        if cache_position is None or kv_length is None:
            raise TypeError("abft_fast mask_builder needs q_length (or cache_position) and "
                            "kv_length")
        q_length = int(cache_position.shape[0])
        q_offset = int(cache_position[0])
        if int(cache_position[-1]) - q_offset != q_length - 1:
            raise UnsupportedMaskError("abft_fast: cache_position must be consecutive positions, "
                                       f"got {cache_position.tolist()}")
    if isinstance(q_offset, torch.Tensor):  # static caches pass a tensor
        q_offset = int(q_offset)
    if isinstance(kv_offset, torch.Tensor):
        kv_offset = int(kv_offset)
    if isinstance(attention_mask, AbftMask):  # prepared ahead (generate with a static cache)
        m = attention_mask
        if (m.causal, m.window) != (causal, window) or m.shape != (batch_size, 1, q_length,
                                                                   kv_length):
            raise UnsupportedMaskError(
                f"abft_fast: a prepared AbftMask {m.shape} causal={m.causal} window={m.window} "
                f"does not match the mask now requested {(batch_size, 1, q_length, kv_length)} "
                f"causal={causal} window={window}")
        return m
    kpm = None
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            raise UnsupportedMaskError(
                "abft_fast: expected a 2-D padding mask [B, L] from transformers, got "
                f"{type(attention_mask).__name__} {tuple(getattr(attention_mask, 'shape', ()))}")
        if attention_mask.shape[0] != batch_size:
            raise ValueError(f"attention_mask has batch size {attention_mask.shape[0]}, the "
                             f"inputs have {batch_size}")
        kpm = attention_mask.to(torch.bool)
        end = kv_offset + kv_length
        if kpm.shape[1] < end:  # keys beyond the 2-D mask (e.g. a static cache's free slots)
            kpm = torch.nn.functional.pad(kpm, (0, end - kpm.shape[1]), value=False)
        kpm = kpm[:, kv_offset:end]
        # An all-true mask is no mask (the unmasked engines are faster). Reading the runs of real
        # tokens is the one host sync per forward (per mask kind, not per layer), which the
        # varlen kernel needs; under torch.compile the mask is kept as a tensor.
        if not torch.compiler.is_compiling():
            padding = Padding.of(kpm, zero_padded_queries=True)
            if all(n == kv_length for n in padding.counts):
                kpm = padding = None
            return AbftMask(kpm, causal, window, batch_size, q_length, kv_length, int(q_offset),
                            int(kv_offset), padding)
    return AbftMask(kpm, causal, window, batch_size, q_length, kv_length, int(q_offset),
                    int(kv_offset))


def from_dense(mask, b, lq, lk, window, where):
    """Read a dense [B, 1, Lq, >= Lk] mask as (causal, window, key_padding_mask), or raise.

    bool masks: True = keep; float masks: additive, 0 = keep, <= finfo.min / 2 (or -inf) = masked.
    Accepted only if it equals exactly key padding x causal (x the module's window) or key padding
    alone (bidirectional). This is the legacy path (models that still build 4-D masks, e.g. GPT-2
    in transformers 4.53, or a 4-D mask given by the caller); it costs O(B Lq Lk) like the mask.
    """
    shape = tuple(mask.shape)
    if shape[0] not in (1, b) or shape[1] != 1 or shape[2] != lq or shape[3] < lk:
        raise UnsupportedMaskError(
            f"abft_fast: the 4-D mask given to {where} has shape {shape}; expected [B={b} or 1, "
            f"1, Lq={lq}, >= Lk={lk}] (per-head masks are not supported)")
    mask = mask[:, 0, :, :lk]
    if mask.dtype == torch.bool:
        vis = mask
    elif mask.dtype.is_floating_point:
        off = mask <= torch.finfo(mask.dtype).min / 2
        if not bool(((mask == 0) | off).all()):
            raise UnsupportedMaskError(
                f"abft_fast: the 4-D float mask given to {where} holds additive biases other than "
                "0 and -inf (e.g. ALiBi or a soft mask), which the kernel cannot apply")
        vis = ~off
    else:
        raise UnsupportedMaskError(f"abft_fast: 4-D masks must be bool or float, got {mask.dtype}")
    vis = vis.expand(b, lq, lk)
    kpm = vis.any(1)  # [B, Lk]: keys that some query sees (the others are invisible anyway)
    rows = torch.arange(lq, device=mask.device).expand(b, -1)
    cols = torch.arange(lk, device=mask.device)
    for causal, w in ((True, window), (False, None)):
        if torch.equal(visible(rows, cols, lq=lq, lk=lk, causal=causal, window=w,
                               key_padding_mask=kpm), vis):
            return causal, w, (None if bool(kpm.all()) else kpm)
    raise UnsupportedMaskError(
        f"abft_fast: the 4-D mask given to {where} is not a key padding mask combined with a "
        f"causal{'' if window is None else f' window-{window}'} (bottom-right aligned) or a "
        "bidirectional mask, so the kernel cannot honour it; pass a 2-D attention_mask or use "
        "attn_implementation='sdpa' / 'eager'")


