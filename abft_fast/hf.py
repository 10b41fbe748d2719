"""HuggingFace transformers integration: ``attn_implementation="abft_fast"`` and probe collection.

Importing this module registers the name ``"abft_fast"`` with transformers'
``AttentionInterface`` (the attention function) and ``AttentionMaskInterface`` (the mask
builder), so that::

    import abft_fast.hf as ah
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="abft_fast")
    # or: model.set_attn_implementation("abft_fast")
    with ah.probe(model, rows=rows, cols=cols) as rec:   # rows [B, R], cols [B, C] or None
        model(input_ids=ids, attention_mask=am)
    rec.probs   # [num_layers, B, Hq, R, C], differentiable

runs every attention layer on :func:`abft_fast.attention`.

The mask builder never materialises an L x L tensor: it turns what transformers asks for
(causal, sliding-window causal or bidirectional, plus the 2-D padding mask) into an
:class:`AbftMask` -- flags plus a ``[B, Lk]`` key padding mask -- and refuses anything else
(packed sequences, chunked attention, custom mask overlays) with an error naming the mask.
Needs transformers >= 4.53 (``transformers.masking_utils``). A model that still builds its own
dense 4-D mask (GPT-2 in transformers 4.53), or a 4-D mask given by the caller, is accepted only
if it is exactly padding x causal (x window) and is then read back into flags + padding.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import threading

import torch

from .attention import BACKENDS
from .attention import attention_prechecked as _attention
from .masks import visible

try:
    from transformers import masking_utils as _mu
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface
except ImportError as e:  # pragma: no cover - depends on the installed transformers
    raise ImportError(
        "abft_fast.hf needs transformers >= 4.53 (transformers.masking_utils with "
        f"AttentionMaskInterface): {e}. Upgrade with `pip install 'transformers>=4.53'`.") from e

NAME = "abft_fast"
__all__ = ["NAME", "AbftMask", "ProbeRecorder", "attention_forward", "get_backend", "mask_builder",
           "probe", "set_backend"]

_backend = "auto"


def set_backend(name: str) -> None:
    """Backend used by every "abft_fast" attention layer: "auto" (default), "triton", "cuda" or
    "torch" (see :func:`abft_fast.attention`)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    """The backend set by :func:`set_backend`."""
    return _backend


# --------------------------------------------------------------------------------------------------
# Mask interface
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AbftMask:
    """The mask transformers hands to each "abft_fast" layer: flags plus a key padding mask.

    Query i of the layer sits at absolute position ``q_offset + i``, key j at ``kv_offset + j``.
    Key j is visible to query i iff ``key_padding_mask[b, j]`` (when not None), and, when
    ``causal``, ``kpos <= qpos`` and (with ``window``) ``kpos > qpos - window``.

    key_padding_mask: [B, kv_length] bool, True = real token, or None (no padding).
    """
    key_padding_mask: torch.Tensor | None
    causal: bool
    window: int | None
    batch_size: int
    q_length: int
    kv_length: int
    q_offset: int
    kv_offset: int

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
        return dataclasses.replace(self, key_padding_mask=kpm)


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
        if bool(kpm.all()):
            kpm = None
    return AbftMask(kpm, causal, window, batch_size, q_length, kv_length, int(q_offset),
                    int(kv_offset))


# --------------------------------------------------------------------------------------------------
# Probe recording
# --------------------------------------------------------------------------------------------------

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
        rows, cols = self.rows, self.cols
        if rows.shape[0] != b:
            raise ValueError(f"probe rows have batch size {rows.shape[0]}, the forward has {b}")
        if rows.numel() and int(rows.max()) >= lq:
            raise ValueError(f"probe rows must be query positions < {lq} (this forward's length), "
                             f"got {int(rows.max())}")
        if cols is not None and cols.numel() and int(cols.max()) >= lk:
            raise ValueError(f"probe cols must be key positions < {lk}, got {int(cols.max())}")
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


def _check_index_tensor(name, t, batch=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int64 positions), got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must have shape [B, n], got {tuple(t.shape)}")
    if batch is not None and t.shape[0] != batch:
        raise ValueError(f"{name} has batch size {t.shape[0]}, rows has {batch}")
    if t.numel() and bool((t < -1).any()):
        raise ValueError(f"{name} values must be >= -1 (-1 = unused slot), got min {int(t.min())}")
    return t.to(torch.int64)


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
    rows = _check_index_tensor("rows", rows)
    if cols is not None:
        cols = _check_index_tensor("cols", cols, batch=rows.shape[0])
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


# --------------------------------------------------------------------------------------------------
# Attention function
# --------------------------------------------------------------------------------------------------

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


def _from_dense(mask, b, lq, lk, window, where):
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
    Returns (out [B, Lq, Hq, D], None): attention weights are never materialised.
    """
    _refuse(module, query, key, dropout, softcap, head_mask, kwargs)
    lq, lk = query.shape[2], key.shape[2]
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
        causal, window, kpm = _from_dense(attention_mask, query.shape[0], lq, lk, mod_window,
                                          type(module).__name__)
    else:
        raise UnsupportedMaskError(
            f"abft_fast received an attention mask of type {type(attention_mask).__name__} "
            f"{tuple(getattr(attention_mask, 'shape', ()))}; it takes the masks built by its own "
            "mask interface (from a 2-D padding mask given to the model) or a dense 4-D mask that "
            "is exactly padding x causal (x window). Pass a 2-D attention_mask, or use "
            "attn_implementation='sdpa' / 'eager'.")
    scaling = _scaling(module, query, scaling)

    rec = _active.get(id(module))
    rows = cols = None
    if rec is not None:
        rows, cols = rec._indices(query.device)
        rec._check_sizes(query.shape[0], lq, key.shape[2])
    out, probs = _attention(query, key, value, causal=causal, scale=scaling, key_padding_mask=kpm,
                            window=window, probe_rows=rows, probe_cols=cols, backend=_backend)
    if rec is not None:
        rec._record(module, probs)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register "abft_fast" with transformers (done on import; idempotent)."""
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask_builder)


register()
