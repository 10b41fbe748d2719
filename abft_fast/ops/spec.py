"""The op's argument spec: every check once, one frozen record handed to every backend.

``make_spec`` validates what ``abft_fast.attention`` was given and returns an
:class:`AttentionSpec`: the shapes, the resolved softmax scale, the visibility flags and the probe
indices. Backends take ``(q, k, v, spec)`` and never re-check.

Value checks (probe indices in range, integer masks 0/1) read tensor values. On the CPU they raise
``ValueError`` at once. On a GPU they are queued as device asserts (``torch._assert_async``): no
host synchronisation, and a bad index stops the stream with a device-side assert whose message
names the argument. ``check_values=False`` skips them for callers that validated the values once
(``abft_fast.hf`` per probe context).
"""
from __future__ import annotations

import dataclasses
import numbers

import torch

from .padding import Padding

BACKENDS = ("auto", "sdpa", "varlen", "triton", "cuda", "torch")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """What one call of the op computes (see ``abft_fast.attention`` for the semantics).

    key_padding_mask: [B, Lk] bool (True = real key) or None; probe_rows: [B, R] int64 or None;
    probe_cols: [B, C] int64 or None (full rows when probe_rows is given). padding: the
    :class:`Padding` the caller gave (its host-side runs), else None. query_mask: [B, Lq] bool or
    None; a False row gives out 0 and probes 0 (``Padding(zero_padded_queries=True)``).
    """
    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    k_len: int
    head_dim: int
    causal: bool
    scale: float
    window: int | None
    key_padding_mask: torch.Tensor | None
    probe_rows: torch.Tensor | None
    probe_cols: torch.Tensor | None
    padding: Padding | None = None
    query_mask: torch.Tensor | None = None

    @property
    def group(self) -> int:
        """Query heads per key/value head (GQA)."""
        return self.q_heads // self.kv_heads

    @property
    def offset(self) -> int:
        """Absolute position of query 0: Lk - Lq (bottom-right alignment)."""
        return self.k_len - self.q_len

    @property
    def has_probes(self) -> bool:
        return self.probe_rows is not None

    @property
    def n_cols(self) -> int:
        """C, or Lk for full rows."""
        return self.k_len if self.probe_cols is None else self.probe_cols.shape[1]

    @property
    def masked(self) -> bool:
        """Anything beyond plain causal / full attention of equal lengths."""
        return (self.key_padding_mask is not None or self.window is not None
                or (self.causal and self.q_len != self.k_len))

    def without_probes(self) -> AttentionSpec:
        return dataclasses.replace(self, probe_rows=None, probe_cols=None)


def probs_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the probe probabilities: float32 for 16-bit inputs, else the input dtype."""
    return torch.promote_types(dtype, torch.float32)


# ------------------------------------------------------------------------------ small checks

def check_qkv(q, k, v=None) -> None:
    """Types, dtypes, devices and shapes of q [B, Hq, Lq, D], k (and v) [B, Hkv, Lk, D]; v None
    for the ops that take no values (column scores)."""
    named = (("q", q), ("k", k)) + ((("v", v),) if v is not None else ())
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, L, D], got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    names = "q, k, v" if v is not None else "q and k"
    others = [t for _, t in named[1:]]
    if any(t.dtype != q.dtype for t in others):
        raise TypeError(f"{names} must share one dtype, got "
                        f"{', '.join(str(t.dtype) for _, t in named)}")
    if any(t.device != q.device for t in others):
        raise ValueError(f"{names} must be on one device, got "
                         f"{', '.join(str(t.device) for _, t in named)}")
    b, hq, lq, d = q.shape
    if v is not None and k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if k.shape[0] != b:
        raise ValueError(f"k batch size {k.shape[0]} does not match q batch size {b}")
    if k.shape[3] != d:
        raise ValueError(f"k head dim {k.shape[3]} does not match q head dim {d}")
    hkv, lk = k.shape[1], k.shape[2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"q heads ({hq}) must be a multiple of {'k/v' if v is not None else 'k'}"
                         f" heads ({hkv}) for GQA")
    if lq == 0 or lk == 0 or d == 0 or b == 0:
        raise ValueError(f"q and k must have non-zero sizes, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")


def check_causal(causal) -> bool:
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    return causal


def check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (
            float(scale) == float(scale) and abs(float(scale)) != float("inf")):
        raise TypeError(f"scale must be a finite real number or None, got {scale!r}")
    return float(scale)


def check_window(window, causal: bool) -> int | None:
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    if not causal:
        raise ValueError("window (sliding-window attention) requires causal=True")
    return int(window)


def checks_on_host(device: torch.device) -> bool:
    """Whether value checks read their result on the host (raise ValueError at once): on the CPU,
    outside torch.compile. Elsewhere they are device asserts (``torch._assert_async``)."""
    return device.type == "cpu" and not torch.compiler.is_compiling()


def value_check(ok: torch.Tensor, message: str) -> None:
    """Raise ValueError(message) unless the bool scalar ``ok`` holds: at once on the CPU; as an
    asynchronous device assert on a GPU (no host synchronisation)."""
    if checks_on_host(ok.device):
        if not bool(ok):
            raise ValueError(message)
    else:
        torch._assert_async(ok, message)


def check_key_padding_mask(kpm, batch: int, k_len: int, device, check_values=True):
    """-> the mask as [B, Lk] bool, or None. A :class:`Padding` gives its mask."""
    if kpm is None:
        return None
    if isinstance(kpm, Padding):
        kpm = kpm.mask
    if not isinstance(kpm, torch.Tensor):
        raise TypeError("key_padding_mask must be a torch.Tensor or an abft_fast.Padding, got "
                        f"{type(kpm).__name__}")
    if tuple(kpm.shape) != (batch, k_len):
        raise ValueError(f"key_padding_mask must have shape [B, Lk] = [{batch}, {k_len}], got "
                         f"{tuple(kpm.shape)}")
    if kpm.dtype.is_floating_point or kpm.dtype.is_complex:
        raise TypeError("key_padding_mask must be bool (True = real token) or a 0/1 integer "
                        f"mask, got {kpm.dtype}; additive float masks are not accepted")
    if kpm.device != device:
        raise ValueError(f"key_padding_mask is on {kpm.device}, q on {device}")
    if kpm.dtype == torch.bool:
        return kpm
    if check_values:
        value_check(((kpm == 0) | (kpm == 1)).all(),
                    "key_padding_mask integer values must be 0 or 1")
    return kpm != 0


def check_index_tensor(name: str, t, *, batch: int | None = None, device=None,
                       strict_dtype: bool = True) -> torch.Tensor:
    """Type and shape of a [B, n] position tensor (probe_rows / probe_cols / recorder rows).

    strict_dtype: require int64 (the op); otherwise any integer dtype is converted to int64."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if strict_dtype and t.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {t.dtype}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int64 positions), got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must have shape [B, n], got {tuple(t.shape)}")
    if batch is not None and t.shape[0] != batch:
        raise ValueError(f"{name} must have shape [B, n] with B = {batch}, got {tuple(t.shape)} "
                         f"(batch size {t.shape[0]})")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, q on {device}")
    return t.to(torch.int64)


def check_index_values(name: str, t: torch.Tensor, upper: int | None) -> None:
    """Every value in [-1, upper) (-1 = unused slot); ``upper=None`` checks only the lower end."""
    if not t.numel():
        return
    ok = (t >= -1).all() if upper is None else ((t >= -1) & (t < upper)).all()
    rng = f"lie in [-1, {upper})" if upper is not None else "be >= -1"
    if checks_on_host(t.device):
        if not bool(ok):
            raise ValueError(f"{name} values must {rng} (-1 = unused slot); got min "
                             f"{int(t.min())}, max {int(t.max())}")
        return
    torch._assert_async(ok, f"{name} values must {rng} (-1 = unused slot)")


def check_backend(backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def make_spec(q, k, v, *, causal, scale, key_padding_mask, window, probe_rows, probe_cols,
              check_values=True) -> AttentionSpec:
    """Validate the arguments of ``abft_fast.attention``; raise naming the argument."""
    check_qkv(q, k, v)
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    causal = check_causal(causal)
    scale = check_scale(scale, d)
    window = check_window(window, causal)
    kpm = check_key_padding_mask(key_padding_mask, b, lk, q.device, check_values)
    if probe_cols is not None and probe_rows is None:
        raise ValueError("probe_cols given without probe_rows")
    for name, t, hi in (("probe_rows", probe_rows, lq), ("probe_cols", probe_cols, lk)):
        if t is None:
            continue
        check_index_tensor(name, t, batch=b, device=q.device)
        if check_values:
            check_index_values(name, t, hi)
    return AttentionSpec(b, hq, hkv, lq, lk, d, causal, scale, window, kpm, probe_rows,
                         probe_cols, *padding_parts(key_padding_mask, lq))


def padding_parts(key_padding_mask, q_len: int):
    """(the Padding given or None, the [B, Lq] query mask of a zero_padded_queries Padding or
    None), for the spec."""
    if not isinstance(key_padding_mask, Padding):
        return None, None
    qm = key_padding_mask.query_mask(q_len) if key_padding_mask.zero_padded_queries else None
    return key_padding_mask, qm
