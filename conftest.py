import os

import torch

# Shared by tests/ and bench/. Without a GPU the Triton kernels run in Triton's interpreter; it must
# be on before any kernel is defined, i.e. before abft_fast.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _cases():
    try:
        import cases  # tests/cases.py (pytest's pythonpath)
    except ImportError:  # pragma: no cover - run without tests/ on the path
        return None
    return cases


def pytest_runtest_setup(item):
    c = _cases()
    if c is not None:
        c.SEEDS.clear()
        c.REPLAY[:] = [int(x) for x in os.environ.get("ABFT_FAST_TEST_SEEDS", "").split(",") if x]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test that drew random inputs (cases.fresh_generator) reports its seeds and the
    command that replays it."""
    rep = (yield).get_result()
    c = _cases()
    if rep.failed and c is not None and c.SEEDS:
        seeds = ",".join(map(str, c.SEEDS))
        rep.sections.append(("random inputs", f"seeds drawn: {seeds}\nreplay: "
                             f"ABFT_FAST_TEST_SEEDS={seeds} python -m pytest '{item.nodeid}'"))
