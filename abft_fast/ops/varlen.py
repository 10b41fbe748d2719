"""Output provider "varlen": PyTorch's variable-length flash attention for padded and windowed
batches (``torch.nn.attention.varlen.varlen_attn``, else ``aten._flash_attention_forward`` with
cumulative sequence lengths), differentiated by PyTorch.

The padded batch is unpadded into one packed sequence per batch row (its run of real keys and the
query rows that see them), the vendor kernel runs with ``cu_seqlens`` and the window
(``window_size = (window - 1, 0)``; causal alignment is bottom-right, as the op's), and the result
is scattered back; rows left out give 0. Exact when, per batch row, the real keys form one run
[s, e) and no row left out sees a key: the rows left out are those before position s (causal:
they see only padding), and the padded query rows of a ``Padding(zero_padded_queries=True)``.
Causal rows after the run (right padding) see real keys, so without zero_padded_queries only
left padding is taken. The runs come from a :class:`Padding` (read on the host once, where it was
built); a plain tensor mask costs one host read per call, so ``auto`` leaves it to the fused
kernel. No padding (a window alone, causal Lq != Lk) needs no read.

``find_kernel`` detects what the installed torch offers by feature (parameters and op schemas),
not by version. ``naive_kernel`` is the vendor contract in plain torch: the reference the tests
run the unpad / re-pad logic against on a CPU.
"""
from __future__ import annotations

import dataclasses
import inspect

import torch

from .spec import AttentionSpec

__all__ = ["Kernel", "Layout", "find_kernel", "layout", "naive_kernel", "output", "supports",
           "unavailable", "why_unsupported"]

MAX_HEAD_DIM = 256


@dataclasses.dataclass(frozen=True)
class Kernel:
    """``run(q [Tq,Hq,D], k [Tk,Hk,D], v, cu_q [N+1] int32, cu_k, max_q, max_k, scale,
    window_size (left, right), gqa) -> out [Tq,Hq,D]``; ``gqa``: takes Hk < Hq itself;
    ``devices`` / ``dtypes``: what it runs on."""
    name: str
    run: object
    gqa: bool
    devices: tuple[str, ...] = ("cuda",)
    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)


def _public_kernel():
    try:
        from torch.nn.attention import varlen
    except ImportError:
        return None
    fn = getattr(varlen, "varlen_attn", None)
    if fn is None:
        return None
    params = inspect.signature(fn).parameters
    if "window_size" not in params or "scale" not in params:
        return None
    gqa = "enable_gqa" in params

    def run(q, k, v, cu_q, cu_k, max_q, max_k, scale, window_size, enable_gqa):
        kw = {"enable_gqa": True} if enable_gqa else {}
        return fn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window_size, **kw)
    return Kernel("torch.nn.attention.varlen.varlen_attn", run, gqa)


def _aten_kernel():
    op = getattr(torch.ops.aten, "_flash_attention_forward", None)
    try:
        schema = str(op.default._schema)
    except Exception:
        return None
    if "cum_seq_q" not in schema or "window_size_left" not in schema:
        return None

    def run(q, k, v, cu_q, cu_k, max_q, max_k, scale, window_size, enable_gqa):
        left, right = window_size
        causal = left < 0 and right == 0
        out = op(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale,
                 window_size_left=None if causal or left < 0 else left,
                 window_size_right=None if causal or right < 0 else right)
        return out[0]
    return Kernel("aten._flash_attention_forward", run, False)


_found: list = []


def find_kernel() -> Kernel | None:
    """The vendor varlen kernel of the installed torch, or None."""
    if not _found:
        _found.append(_public_kernel() or _aten_kernel())
    return _found[0]


def naive_kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale, window_size, enable_gqa):
    """The varlen contract in plain torch (one masked SDPA per sequence, float32 maths):
    sequence n is queries cu_q[n]:cu_q[n+1] against keys cu_k[n]:cu_k[n+1], query t aligned with
    key t + len_k - len_q; key j visible iff t' - left <= j (left >= 0) and j <= t' + right
    (right >= 0). A query seeing no key gives 0."""
    left, right = window_size
    if not enable_gqa and q.shape[1] != k.shape[1]:
        raise ValueError("naive_kernel: Hq != Hk without enable_gqa")
    outs = []
    for n in range(cu_q.numel() - 1):
        q0, q1, k0, k1 = (int(x) for x in (cu_q[n], cu_q[n + 1], cu_k[n], cu_k[n + 1]))
        if q1 == q0:
            continue
        qs, ks, vs = (t.transpose(0, 1).float() for t in (q[q0:q1], k[k0:k1], v[k0:k1]))
        vis = _visible(q1 - q0, k1 - k0, left, right, q.device)
        has = vis.any(-1, keepdim=True)
        o = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=vis | ~has, scale=scale, enable_gqa=enable_gqa)
        outs.append(o.masked_fill(~has, 0.0).transpose(0, 1).to(q.dtype))
    return torch.cat(outs) if outs else q[:0]


def _visible(m: int, n: int, left: int, right: int, device):
    """[m, n] bool: query t (aligned with key t + n - m) sees key j within (left, right)."""
    t = torch.arange(m, device=device)[:, None] + n - m
    j = torch.arange(n, device=device)[None, :]
    vis = torch.ones(m, n, dtype=torch.bool, device=device)
    if left >= 0:
        vis &= j >= t - left
    if right >= 0:
        vis &= j <= t + right
    return vis


# ----------------------------------------------------------------------------------- layout

@dataclasses.dataclass(frozen=True)
class Layout:
    """Packed sequences of one call shape: q_index [Tq] / k_index [Tk] int64 flat positions into
    [B * Lq] / [B * Lk]; cu_q / cu_k [B + 1] int32; max_q / max_k host ints. all_q / all_k: every
    row is packed in order (no padding, no row left out): the packing is a view."""
    q_index: torch.Tensor
    k_index: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    all_q: bool
    all_k: bool


def _runs(spec: AttentionSpec):
    """Per batch row (s, e, n) of the real keys, from the Padding, or the whole row."""
    p = spec.padding
    if p is None:
        return [(0, spec.k_len, spec.k_len)] * spec.batch
    return list(zip(p.starts, p.ends, p.counts))


def unavailable(device) -> str:
    """'' when a varlen kernel runs on tensors of ``device``, else why not."""
    kern = find_kernel()
    if kern is None:
        return ("this torch has no varlen flash attention with windows "
                "(torch.nn.attention.varlen.varlen_attn or aten._flash_attention_forward)")
    if device.type not in kern.devices:
        return f"{kern.name} needs CUDA tensors; got tensors on {device}"
    return ""


def why_unsupported(q, spec: AttentionSpec) -> str:
    """'' when the varlen provider computes this call exactly, else why not."""
    why = unavailable(q.device)
    if why:
        return why
    kern = find_kernel()
    if q.dtype not in kern.dtypes:
        return f"{kern.name} takes float16 / bfloat16, got {q.dtype}"
    if spec.head_dim > MAX_HEAD_DIM or spec.head_dim % 8:
        return f"head dim must be a multiple of 8 up to {MAX_HEAD_DIM}, got {spec.head_dim}"
    if spec.key_padding_mask is not None and spec.padding is None:
        return ("the key padding mask is a tensor: pass abft_fast.Padding.of(mask) (read once on "
                "the host) to use the varlen kernel")
    p = spec.padding
    if p is not None and not p.contiguous:
        return "the key padding mask has holes (real tokens must form one run per row)"
    if spec.causal and not (p is not None and p.zero_padded_queries):
        if any(n and e != spec.k_len for _, e, n in _runs(spec)):
            return ("right padding with causal attention: the padded query rows see real keys; "
                    "use Padding.of(mask, zero_padded_queries=True) if their output is not used")
    return ""


def supports(q, spec: AttentionSpec) -> bool:
    return not why_unsupported(q, spec)


def layout(spec: AttentionSpec, device) -> Layout:
    """The packed sequences of this call (cached on the Padding per shape and device)."""
    key = (spec.batch, spec.q_len, spec.k_len, spec.causal, str(device))
    cache = spec.padding.cache if spec.padding is not None else _unpadded
    if key not in cache:
        if len(cache) >= _CACHE_SIZE:
            cache.pop(next(iter(cache)))  # the oldest shape
        cache[key] = _build_layout(spec, device)
    return cache[key]


_CACHE_SIZE = 32
_unpadded: dict = {}  # layouts without padding: (B, Lq, Lk, causal, device) -> Layout


def _build_layout(spec: AttentionSpec, device) -> Layout:
    off = spec.offset
    zero_q = spec.padding is not None and spec.padding.zero_padded_queries
    q_idx, k_idx, len_q, len_k = [], [], [], []
    for b, (s, e, n) in enumerate(_runs(spec)):
        if n == 0:
            q0 = q1 = 0
            s = e = 0
        elif zero_q:
            q0, q1 = max(0, s - off), max(0, e - off)
        elif spec.causal:
            q0, q1 = max(0, s - off), spec.q_len
        else:
            q0, q1 = 0, spec.q_len
        q_idx.append(torch.arange(q0, q1) + b * spec.q_len)
        k_idx.append(torch.arange(s, e) + b * spec.k_len)
        len_q.append(q1 - q0)
        len_k.append(e - s)
    cu = [torch.tensor([0] + lens).cumsum(0).to(torch.int32) for lens in (len_q, len_k)]
    qi, ki = torch.cat(q_idx), torch.cat(k_idx)
    return Layout(qi.to(device), ki.to(device), cu[0].to(device), cu[1].to(device), max(len_q),
                  max(len_k), sum(len_q) == spec.batch * spec.q_len,
                  sum(len_k) == spec.batch * spec.k_len)


# ----------------------------------------------------------------------------------- output

def output(q, k, v, spec: AttentionSpec):
    """[B, Hq, Lq, D] (a transposed view of [B, Lq, Hq, D]); differentiable by PyTorch. The call
    is checked by the dispatcher (``why_unsupported`` is empty), as for every engine."""
    kern = find_kernel()
    lay = layout(spec, q.device)
    b, hq, lq, d = q.shape

    def packed(t, index, every):
        flat = t.transpose(1, 2).reshape(-1, t.shape[1], d)  # a view for HF's layout
        return flat if every else flat.index_select(0, index)

    qp = packed(q, lay.q_index, lay.all_q)
    kp, vp = packed(k, lay.k_index, lay.all_k), packed(v, lay.k_index, lay.all_k)
    gqa = spec.q_heads != spec.kv_heads
    if gqa and not kern.gqa:
        kp, vp = (t.repeat_interleave(spec.group, dim=1) for t in (kp, vp))
    left = -1 if spec.window is None else spec.window - 1
    right = 0 if spec.causal else -1
    if qp.shape[0]:
        op = kern.run(qp, kp, vp, lay.cu_q, lay.cu_k, lay.max_q, lay.max_k, spec.scale,
                      (left, right), gqa and kern.gqa)
    else:  # no row sees a key: zeros, still on the graph
        op = qp
    if not lay.all_q:
        op = op.new_zeros(b * lq, hq, d).index_copy(0, lay.q_index, op)
    return op.view(b, lq, hq, d).transpose(1, 2)


@torch.library.custom_op("abft_fast::naive_varlen", mutates_args=())
def _naive_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor,
              cu_k: torch.Tensor, max_q: int, max_k: int, scale: float, left: int, right: int,
              gqa: bool) -> torch.Tensor:
    """``naive_kernel`` as an opaque op (so that torch.compile traces a call as it traces the
    vendor kernel's custom op); its backward is ``_naive_backward_op``."""
    return naive_kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale, (left, right), gqa).clone()


@_naive_op.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right, gqa):
    return torch.empty_like(q)


@torch.library.custom_op("abft_fast::naive_varlen_backward", mutates_args=())
def _naive_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int,
                       scale: float, left: int, right: int,
                       gqa: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The flash backward of ``naive_kernel``, per sequence in float32 (written out: autograd
    does not record inside a custom op)."""
    dq, dk, dv = (torch.zeros_like(t, dtype=torch.float32) for t in (q, k, v))
    g = q.shape[1] // k.shape[1]
    for n in range(cu_q.numel() - 1):
        q0, q1, k0, k1 = (int(x) for x in (cu_q[n], cu_q[n + 1], cu_k[n], cu_k[n + 1]))
        if q1 == q0 or k1 == k0:
            continue
        qs = q[q0:q1].transpose(0, 1).float()                                # [H, m, D]
        ks, vs = (t[k0:k1].transpose(0, 1).float().repeat_interleave(g, 0)
                  for t in (k, v))                                           # [H, n, D]
        do = dout[q0:q1].transpose(0, 1).float()
        vis = _visible(q1 - q0, k1 - k0, left, right, q.device)
        s = torch.where(vis, scale * qs @ ks.transpose(1, 2), float("-inf"))
        has = vis.any(-1, keepdim=True)
        p = torch.where(vis, torch.softmax(torch.where(has, s, 0.0), -1), 0.0)
        dp = do @ vs.transpose(1, 2)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        dq[q0:q1] = (scale * ds @ ks).transpose(0, 1)
        dk[k0:k1] = (scale * ds.transpose(1, 2) @ qs).unflatten(0, (-1, g)).sum(1).transpose(0, 1)
        dv[k0:k1] = (p.transpose(1, 2) @ do).unflatten(0, (-1, g)).sum(1).transpose(0, 1)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@_naive_backward_op.register_fake
def _(dout, q, k, v, cu_q, cu_k, max_q, max_k, scale, left, right, gqa):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _naive_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5])
    ctx.cfg = inputs[5:]


def _naive_grad(ctx, dout):
    q, k, v, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = _naive_backward_op(dout, q, k, v, cu_q, cu_k, *ctx.cfg)
    return (dq, dk, dv) + (None,) * 8


_naive_op.register_autograd(_naive_grad, setup_context=_naive_setup)


def _naive_run(q, k, v, cu_q, cu_k, max_q, max_k, scale, window_size, enable_gqa):
    return _naive_op(q, k, v, cu_q, cu_k, max_q, max_k, scale, *window_size, enable_gqa)


_naive = Kernel("naive_kernel", _naive_run, True, ("cpu", "cuda"),
                (torch.float16, torch.bfloat16, torch.float32))  # what tests install


def use_naive_kernel() -> Kernel:
    """Make ``find_kernel`` return :func:`naive_kernel` (any device; for tests). Returns it."""
    _found[:] = [_naive]
    return _naive


def reset_kernel() -> None:
    """Forget the kernel found (or installed by ``use_naive_kernel``)."""
    _found.clear()
