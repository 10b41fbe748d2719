"""Every argument check names the argument and what was expected."""
import importlib

import pytest
import torch

import abft_fast


def qkv(b=2, hq=4, hkv=2, l=8, d=16, dtype=torch.float32):
    return (torch.randn(b, hq, l, d, dtype=dtype), torch.randn(b, hkv, l, d, dtype=dtype),
            torch.randn(b, hkv, l, d, dtype=dtype))


BAD = [
    ("q must be a torch.Tensor", lambda q, k, v: dict(q=[1.0])),
    ("q must be 4-D", lambda q, k, v: dict(q=q[0])),
    ("k must be 4-D", lambda q, k, v: dict(k=k[0])),
    ("v must be float16, bfloat16, float32 or float64", lambda q, k, v: dict(v=v.int())),
    ("q, k, v must share one dtype", lambda q, k, v: dict(k=k.double())),
    ("k and v must have the same shape", lambda q, k, v: dict(v=v[:, :, :4])),
    ("k batch size", lambda q, k, v: dict(k=k[:1], v=v[:1])),
    ("k head dim", lambda q, k, v: dict(k=k[..., :8], v=v[..., :8])),
    ("multiple of k/v heads", lambda q, k, v: dict(q=q[:, :3])),
    ("non-zero sizes", lambda q, k, v: dict(q=q[:, :, :0])),
    ("causal must be a bool", lambda q, k, v: dict(causal=1)),
    ("scale must be a finite real", lambda q, k, v: dict(scale=float("nan"))),
    ("scale must be a finite real", lambda q, k, v: dict(scale="0.1")),
    ("window must be a positive int", lambda q, k, v: dict(window=0)),
    ("window (sliding-window attention) requires causal=True",
     lambda q, k, v: dict(window=3, causal=False)),
    ("key_padding_mask must have shape", lambda q, k, v: dict(key_padding_mask=torch.ones(2, 7,
                                                                                      dtype=bool))),
    ("key_padding_mask must be bool", lambda q, k, v: dict(key_padding_mask=torch.zeros(2, 8))),
    ("key_padding_mask integer values must be 0 or 1",
     lambda q, k, v: dict(key_padding_mask=torch.full((2, 8), 2))),
    ("probe_cols given without probe_rows", lambda q, k, v: dict(probe_cols=torch.zeros(2, 1,
                                                                                    dtype=torch.long))),
    ("probe_rows must be int64", lambda q, k, v: dict(probe_rows=torch.zeros(2, 1,
                                                                              dtype=torch.int32))),
    ("probe_rows must have shape [B, n]", lambda q, k, v: dict(probe_rows=torch.zeros(3, 1,
                                                                                       dtype=torch.long))),
    ("probe_rows values must lie in [-1, 8)", lambda q, k, v: dict(probe_rows=torch.tensor([[8],
                                                                                             [0]]))),
    ("probe_rows values must lie in [-1, 8)", lambda q, k, v: dict(probe_rows=torch.tensor([[-2],
                                                                                             [0]]))),
    ("probe_cols values must lie in [-1, 8)",
     lambda q, k, v: dict(probe_rows=torch.zeros(2, 1, dtype=torch.long),
                          probe_cols=torch.tensor([[9], [0]]))),
    ("backend must be one of", lambda q, k, v: dict(backend="xla")),
]


def _reads_values(msg):
    """The checks that read tensor values (they synchronise a GPU); attention_prechecked skips
    them."""
    return "values must lie in" in msg or "integer values must be 0 or 1" in msg


@pytest.mark.parametrize("entry", ["attention", "attention_prechecked"])
@pytest.mark.parametrize("msg,mod", BAD, ids=[m for m, _ in BAD])
def test_bad_argument_is_named(msg, mod, entry):
    if entry == "attention_prechecked" and _reads_values(msg):
        pytest.skip("a value check: attention_prechecked leaves it to its caller")
    fn = getattr(importlib.import_module("abft_fast.ops.attention"), entry)
    q, k, v = qkv()
    kw = dict(q=q, k=k, v=v, backend="torch")
    kw.update(mod(q, k, v))
    a = (kw.pop("q"), kw.pop("k"), kw.pop("v"))
    with pytest.raises((ValueError, TypeError)) as e:
        fn(*a, **kw)
    assert msg in str(e.value)


def test_cuda_backend_on_cpu_tensors_is_refused():
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match="backend='cuda' is not available"):
        abft_fast.attention(q, k, v, backend="cuda")


def test_triton_refuses_float64():
    q, k, v = qkv(dtype=torch.float64)
    with pytest.raises(TypeError, match="backend='triton' supports float16"):
        abft_fast.attention(q, k, v, backend="triton")


def test_integer_mask_is_accepted_like_bool():
    q, k, v = qkv()
    m = torch.ones(2, 8, dtype=torch.long)
    m[0, :3] = 0
    a, _ = abft_fast.attention(q, k, v, key_padding_mask=m, backend="torch")
    b, _ = abft_fast.attention(q, k, v, key_padding_mask=m.bool(), backend="torch")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_auto_on_cpu_is_torch():
    q, k, v = qkv()
    a, pa = abft_fast.attention(q, k, v, probe_rows=torch.tensor([[7], [3]]))
    b, pb = abft_fast.attention(q, k, v, probe_rows=torch.tensor([[7], [3]]), backend="torch")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_prechecked_path_matches_attention():
    from abft_fast.ops.attention import attention_prechecked
    q, k, v = qkv()
    m = torch.ones(2, 8, dtype=torch.long)
    m[1, :2] = 0
    kw = dict(key_padding_mask=m, window=5, probe_rows=torch.tensor([[7, -1], [3, 6]]),
              probe_cols=torch.tensor([[0, 6, 2], [-1, 5, 4]]), backend="torch")
    a, pa = abft_fast.attention(q, k, v, **kw)
    b, pb = attention_prechecked(q, k, v, **kw)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(pa, pb, rtol=0, atol=0)
