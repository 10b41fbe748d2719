"""The op makes no host read of tensor values on the paths a GPU takes (sdpa and fused engines,
forward and backward, value checks as device asserts): a dispatch mode fails on every op that
reads a value back (``aten._local_scalar_dense``: ``.item()``, ``bool(t)``, ``int(t)``)."""
import pytest
import torch
from cases import NoHostReads

import abft_fast
from abft_fast.ops import spec as spec_module

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.parametrize("backend,masked", [("sdpa", False), ("triton", True), ("triton", False)])
def test_no_host_reads_forward_and_backward(backend, masked, monkeypatch):
    monkeypatch.setattr(spec_module, "checks_on_host", lambda device: False)  # the GPU policy
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, h, 20, 16, generator=g).requires_grad_() for h in (4, 2, 2))
    rows = torch.tensor([[19, 4, -1], [10, 11, 0]])
    cols = torch.tensor([[1, 3, -1, 7], [0, 2, 4, 19]])
    kpm = None
    if masked:
        kpm = torch.ones(2, 20, dtype=torch.long)  # a 0/1 integer mask: its values are checked
        kpm[1, :6] = 0
    mode = NoHostReads()
    with mode:
        out, probs = abft_fast.attention(q, k, v, key_padding_mask=kpm, probe_rows=rows,
                                         probe_cols=cols, backend=backend)
        (out.sum() + (probs * torch.arange(4.0)).sum()).backward()
    assert mode.reads == []
    assert mode.asserts >= 2  # probe_rows and probe_cols checked on the device
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_device_asserts_fire_on_bad_indices(monkeypatch):
    """With the GPU policy the checks still stop a bad call: here _assert_async raises at once
    (on a GPU it is an asynchronous device assert naming the argument)."""
    monkeypatch.setattr(spec_module, "checks_on_host", lambda device: False)
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(RuntimeError):
        abft_fast.attention(q, q, q, probe_rows=torch.tensor([[8]]), backend="torch")


def test_cpu_policy_raises_value_error_naming_the_argument():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match=r"probe_rows values must lie in \[-1, 8\)"):
        abft_fast.attention(q, q, q, probe_rows=torch.tensor([[8]]), backend="torch")


def test_the_detector_sees_host_reads():
    """The CPU policy reads the check results back (bool of a tensor): the mode must see that,
    or the sync-free test above would pass vacuously."""
    q = torch.randn(1, 2, 8, 16)
    mode = NoHostReads()
    with mode:
        abft_fast.attention(q, q, q, probe_rows=torch.tensor([[7]]), backend="sdpa")
    assert mode.reads and mode.asserts == 0
