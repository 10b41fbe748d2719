"""Opt-in tile autotuning of the fused kernels: ``ABFT_FAST_AUTOTUNE=1``.

The first call of a case (pass, GPU generation, dtype, padded head dim, mask kind, probes, GQA
group, Lq and Lk rounded up to powers of two) times every candidate of a small set on the call's
own tensors and keeps the fastest; later calls of the case launch it with no timing. A candidate
is dropped when the compiler rejects it (shared memory, registers) or when the compiled kernel
spills (its ``n_spills``, read from the compiled binary): the set is pruned by the compiler, not
by a list kept by hand. The backward is tuned in two steps, its dK/dV tile (with the shipped dQ
blocks) and then its dQ blocks (with the chosen dK/dV tile), because it is one launch whose warps
and stages are the dK/dV programs'.

Candidates start from the shipped tiles and the anchors (FlexAttention's sm_90 backward
64 / 128 / 128 / 64, 3 stages, 8 warps; Triton's tutorial 32 / 128 / 128 / 32, 4 warps, 5
stages). Every candidate is a valid tiling (the kernels take any power-of-two blocks >= 16), so
the choice changes speed, never results beyond float summation order.

Tuning synchronises with the GPU (CUDA events, median of 3 launches after 1 warm-up), once per
case; never during CUDA-graph capture or torch.compile tracing (the shipped tiles run there), and
not for a pass forced by ``attention.tiles``. The choices live in this process (``cache()``);
``clear()`` forgets them. No autograd here.
"""
from __future__ import annotations

import logging
import os
import statistics
import time

import torch

log = logging.getLogger("abft_fast.autotune")

_cache: dict = {}
_FORCE: list = []  # tests: [(enabled, timer)] forces tuning on (e.g. in the interpreter)

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per pass and family; the shipped tile is tried first.
# dq candidates give only the dQ programs' blocks: the backward's warps and stages are dkdv's.
CANDIDATES = {
    "16": {
        "fwd": [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 4), (128, 32, 4, 4),
                (64, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 2), (64, 64, 4, 4)],
        "dkdv": [(64, 128, 8, 3), (32, 128, 4, 5), (32, 128, 4, 3), (64, 64, 4, 3),
                 (64, 64, 8, 3), (32, 64, 4, 3), (128, 64, 8, 2), (32, 128, 8, 4)],
        "dq": [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2),
               (64, 32, 4, 3), (64, 128, 4, 2)],
    },
    "16-d256": {
        "fwd": [(64, 64, 8, 2), (64, 32, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2)],
        "dkdv": [(16, 32, 8, 2), (32, 32, 8, 2), (16, 64, 8, 2), (64, 64, 8, 2)],
        "dq": [(32, 16, 8, 2), (32, 32, 8, 2), (64, 16, 8, 2), (64, 32, 8, 2)],
    },
    "fp32": {
        "fwd": [(16, 64, 8, 2), (16, 32, 8, 2), (32, 32, 8, 2), (16, 16, 8, 2)],
        "dkdv": [(16, 32, 8, 2), (16, 32, 4, 2), (32, 32, 8, 2), (16, 16, 8, 2)],
        "dq": [(32, 16, 8, 2), (16, 32, 8, 2), (32, 32, 8, 2)],
    },
}


def enabled(device: torch.device) -> bool:
    """Whether calls on ``device`` tune now: ABFT_FAST_AUTOTUNE=1, a CUDA device, no CUDA-graph
    capture and no torch.compile tracing in progress (or a test forcing it)."""
    if _FORCE:
        return _FORCE[-1][0]
    if os.environ.get("ABFT_FAST_AUTOTUNE") != "1" or device.type != "cuda" \
            or not torch.cuda.is_available():
        return False
    if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        return False
    return True


def family(dtype: torch.dtype, block_d: int) -> str:
    if dtype == torch.float32:
        return "fp32"
    return "16-d256" if block_d > 128 else "16"


def candidates(kind: str, dtype: torch.dtype, block_d: int, shipped: tuple) -> list[tuple]:
    """The shipped tile, then the family's candidates (duplicates removed; for dq the shipped
    warps and stages, which do not apply to the dQ blocks)."""
    out = [tuple(shipped)]
    for c in CANDIDATES[family(dtype, block_d)][kind]:
        c = (*c[:2], *shipped[2:]) if kind == "dq" else c
        if c not in out:
            out.append(c)
    return out


def _cuda_timer(fn) -> float:
    """Median ms of 3 launches of fn after one warm-up, by CUDA events (synchronises)."""
    fn()
    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def wall_timer(fn) -> float:
    """Median ms of 3 wall-clock calls (CPU / interpreter tests)."""
    fn()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def pick(key: tuple, cands: list[tuple], launch) -> tuple:
    """The cached choice for ``key``, or the fastest of ``cands`` timed with ``launch(cfg)``
    (which launches the kernel with tile cfg and returns the compiled kernel, or None in the
    interpreter). The first candidate (the shipped tile) must launch; others that fail to
    compile or that spill are dropped. Logs one INFO line per tuned case."""
    if key in _cache:
        return _cache[key]
    timer = _FORCE[-1][1] if _FORCE else _cuda_timer
    times, dropped = {}, {}
    for i, cfg in enumerate(cands):
        try:
            kernel = launch(cfg)
        except Exception as e:  # noqa: BLE001 - a rejected candidate is a result here
            if i == 0:
                raise
            dropped[cfg] = type(e).__name__
            continue
        spills = getattr(kernel, "n_spills", 0) or 0
        if spills and i > 0:
            dropped[cfg] = f"{spills} spills"
            continue
        times[cfg] = timer(lambda cfg=cfg: launch(cfg))
    best = min(times, key=times.get)
    _cache[key] = best
    log.info("autotune %s: %s (%.4g ms; shipped %s %.4g ms; %d timed, dropped %s)", key, best,
             times[best], cands[0], times[cands[0]], len(times), dropped or "none")
    return best


def cache() -> dict:
    """The choices made in this process: {case key: tile}."""
    return dict(_cache)


def clear() -> None:
    _cache.clear()


__all__ = ["CANDIDATES", "cache", "candidates", "clear", "enabled", "pick", "wall_timer"]
