"""Opt-in tile autotuning of the fused kernels (kernels/autotune.py, ABFT_FAST_AUTOTUNE=1): the
choice is the fastest candidate by the timer, made once per case and reused, candidates that fail
to compile or spill are dropped, a pass forced by ``tiles`` is not tuned, tuning is off by default
and under torch.compile, and tuned results stay within the 2x rule of the float64 reference.
Interpreter on the CPU, with a scripted timer (nothing here times anything)."""
import types

import pytest
import torch
from cases import Case, attention_fn, check_rule, make_inputs, reference, run
from cases import fresh_generator as _fresh

from abft_fast.kernels import attention as kernels
from abft_fast.kernels import autotune

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = {"fwd": [(32, 16, 4, 1), (16, 32, 4, 1)], "dkdv": [(32, 16, 4, 1), (16, 32, 4, 1)],
         "dq": [(32, 16, 4, 1), (16, 32, 4, 1)]}


class _Timer:
    """Runs fn once and returns scripted times in call order, so the choice is known."""

    def __init__(self, times):
        self.times, self.calls = list(times), 0

    def __call__(self, fn):
        fn()
        self.calls += 1
        return self.times[(self.calls - 1) % len(self.times)]


@pytest.fixture
def forced(monkeypatch):
    """Tuning forced on (interpreter / CPU), small candidate sets, an empty cache."""
    timer = _Timer([3.0, 1.0, 2.0])  # of [shipped, SMALL[0], SMALL[1]]: SMALL[0] wins
    for fam in autotune.CANDIDATES:
        monkeypatch.setitem(autotune.CANDIDATES, fam, SMALL)
    monkeypatch.setattr(autotune, "_FORCE", [(True, timer)])
    autotune.clear()
    yield timer
    autotune.clear()


def test_tuned_fused_call_picks_the_fastest_once_and_stays_correct(forced):
    case = Case(2, 4, 2, 40, 40, 32, padding="left", r=2, c=5)
    inp = make_inputs(case, _fresh())
    got = run(attention_fn("triton"), case, inp, torch.float32)
    chosen = autotune.cache()
    kinds = sorted(k[0] + (f"/{k[-1]}" if k[0] == "bwd" and k[-1] == "dkdv" else "")
                   for k in chosen)
    assert len(chosen) == 3 and kinds == ["bwd", "bwd/dkdv", "fwd"], chosen
    fwd = next(v for k, v in chosen.items() if k[0] == "fwd")
    assert fwd == SMALL["fwd"][0]
    dkdv = next(v for k, v in chosen.items() if k[0] == "bwd" and k[-1] == "dkdv")
    dq = next(v for k, v in chosen.items() if k[0] == "bwd" and k[-1] != "dkdv")
    assert dkdv[:4] == SMALL["dkdv"][0] and dq[:4] == SMALL["dkdv"][0]
    assert dq[4:] == SMALL["dq"][0][:2]
    assert forced.calls == 3 * 3  # fwd, dkdv, dq: 3 candidates each
    ref = reference(case, inp)
    tor = run(attention_fn("torch"), case, inp, torch.float32)
    check_rule(got, tor, ref, floor=1e-6)
    again = run(attention_fn("triton"), case, inp, torch.float32)
    assert forced.calls == 9, "a tuned case was timed again"
    for n in got:  # the same tiles again: the same bits
        assert torch.equal(got[n], again[n]), n


def test_pick_drops_candidates_that_fail_or_spill():
    timer = _Timer([5.0, 1.0])
    launched = []

    def launch(cfg):
        launched.append(cfg)
        if cfg == "rejected":
            raise RuntimeError("out of shared memory")
        return types.SimpleNamespace(n_spills=12 if cfg == "spills" else 0)

    autotune._FORCE.append((True, timer))
    try:
        best = autotune.pick(("unit",), ["shipped", "rejected", "spills", "fast"], launch)
        assert best == "fast" and timer.calls == 2  # only shipped and fast were timed
        assert autotune.pick(("unit",), ["shipped"], launch) == "fast"  # cached
        with pytest.raises(RuntimeError, match="shared memory"):  # the shipped tile must run
            autotune.pick(("unit", 2), ["rejected", "fast"], launch)
    finally:
        autotune._FORCE.pop()
        autotune.clear()


def test_tiles_override_is_not_tuned(forced):
    case = Case(1, 2, 1, 24, 24, 16)
    inp = make_inputs(case, _fresh())
    with kernels.tiles(fwd=(16, 16, 4, 1), dkdv=(16, 16, 4, 1)):
        run(attention_fn("triton"), case, inp, torch.float32)
    keys = list(autotune.cache())
    assert [k[0] for k in keys] == ["bwd"] and keys[0][-5] == "dq", keys  # only dq was free
    assert keys[0][-4:] == (16, 16, 4, 1)  # tuned against the forced dK/dV tile


def test_off_unless_asked_on_cuda_and_outside_compile(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.delenv("ABFT_FAST_AUTOTUNE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert not autotune.enabled(cuda)
    monkeypatch.setenv("ABFT_FAST_AUTOTUNE", "1")
    assert autotune.enabled(cuda) and not autotune.enabled(torch.device("cpu"))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not autotune.enabled(cuda)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not autotune.enabled(cuda)


def test_candidates_start_with_the_shipped_tile_and_fit_the_kernels():
    for fam, kinds in autotune.CANDIDATES.items():
        assert set(kinds) == set(kernels.TILE_KINDS), fam
        for kind, cands in kinds.items():
            for c in cands:
                ok = len(c) == 4 and all(x >= 16 and not x & (x - 1) for x in c[:2])
                assert ok and c[2] in (4, 8) and c[3] >= 1, (fam, kind, c)
    shipped = kernels._cfg_for(128, 9, "fwd")
    got = autotune.candidates("fwd", torch.bfloat16, 128, shipped)
    assert got[0] == shipped and len(got) == len(set(got))
    dq = autotune.candidates("dq", torch.bfloat16, 128, (128, 64, 8, 2))
    assert all(c[2:] == (8, 2) for c in dq)  # dQ blocks only: the launch's warps are dK/dV's
