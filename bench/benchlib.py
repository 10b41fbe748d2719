"""Shared pieces of the benchmark suite: size sets, FLOP counts, timing and memory helpers.

Size sets (``--bench-sizes`` or ``$ABFT_BENCH_SIZES``):
  smoke  tiny float32 shapes; the default without CUDA or with --benchmark-disable (CI).
  quick  one GPU shape per table (bf16, d 128, GQA 4, L 4k; Llama-1B step at L 512 and 4k).
  gpu    the full grid; the default on CUDA with timing on.
Narrow any set with ``$ABFT_BENCH_METHODS`` / ``$ABFT_BENCH_MODES`` / ``$ABFT_BENCH_L`` /
``$ABFT_BENCH_MODELS`` / ``$ABFT_BENCH_MASKS`` (comma lists) or with ``pytest -k``.
"""
from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass

import torch

SIZE_SETS = ("smoke", "quick", "gpu")
MODES = ("fwd", "bwd", "both")
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "both": 3.5}
ABFT_METHODS = ("abft_auto", "abft_sdpa", "abft_varlen", "abft_triton", "abft_cuda", "abft_torch")
MASKS = ("none", "pad-left", "pad-right", "window")  # every attention row names its mask
SDPA_METHODS = ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math")
OP_METHODS = ABFT_METHODS + SDPA_METHODS + ("flex", "eager")
E2E_METHODS = ("abft_auto", "abft_varlen", "abft_triton", "abft_cuda", "abft_torch", "eager",
               "sdpa_recompute")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def choose_sizes(config) -> str:
    """The size set of this session (see module docstring)."""
    name = config.getoption("--bench-sizes", default=None) or os.environ.get("ABFT_BENCH_SIZES")
    if name:
        if name not in SIZE_SETS:
            raise ValueError(f"bench sizes must be one of {SIZE_SETS}, got {name!r}")
        return name
    return "gpu" if torch.cuda.is_available() and timing_enabled(config) else "smoke"


def timing_enabled(config) -> bool:
    return not (config.getoption("benchmark_disable", default=False)
                or config.getoption("benchmark_skip", default=False))


def _env_list(name):
    v = os.environ.get(name, "").strip()
    return [s.strip() for s in v.split(",") if s.strip()] or None


def _keep(values, env):
    wanted = _env_list(env)
    return [v for v in values if wanted is None or str(v) in wanted]


# ------------------------------------------------------------------------------- op shapes

@dataclass(frozen=True)
class OpShape:
    dtype: str
    B: int
    Hq: int
    Hkv: int
    L: int
    D: int
    R: int
    C: int | None  # None = full probe rows (C = L)
    causal: bool = True
    mask: str = "none"      # none | pad-left | pad-right (real lengths 50-100% of L) | window
    window: int | None = None

    @property
    def id(self):
        c = "all" if self.C is None else self.C
        m = "" if self.mask == "none" else f"-{self.mask}" + (
            f"{self.window}" if self.mask == "window" else "")
        return (f"{self.dtype}-B{self.B}-H{self.Hq}-kv{self.Hkv}-L{self.L}-d{self.D}-R{self.R}"
                f"-C{c}{m}")

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]


def attention_flops(s: OpShape, mode: str) -> float:
    """4 B H L^2 d for the forward (halved when causal); backward 2.5x, both 3.5x."""
    f = 4.0 * s.B * s.Hq * s.L * s.L * s.D
    if s.causal:
        f /= 2
    return f * MODE_FLOP_FACTOR[mode]


def _gpu_shape(L, D, gqa, R=1, C=64, dtype="bf16", mask="none", window=None):
    hq = 2048 // D  # model width 2048
    return OpShape(dtype, max(1, 16384 // L), hq, hq // gqa, L, D, R, C, mask=mask, window=window)


def _masked_shapes(Ls, D=128, gqa=4):
    """Padded batches (left and right, random real lengths) and a sliding window (L / 4)."""
    return ([_gpu_shape(L, D, gqa, mask=m) for L in Ls for m in ("pad-left", "pad-right")]
            + [_gpu_shape(max(Ls), D, gqa, mask="window", window=max(Ls) // 4)])


def op_cases(sizes: str) -> list:
    """[(method, mode, probes, OpShape)] of a size set, in run order."""
    if sizes == "smoke":
        main = [OpShape("fp32", 1, 2, 1, 32, 16, 2, 4), OpShape("fp32", 2, 2, 2, 24, 16, 1, None),
                OpShape("fp32", 2, 2, 1, 32, 16, 2, 4, mask="pad-left"),
                OpShape("fp32", 2, 2, 1, 32, 16, 2, 4, mask="pad-right"),
                OpShape("fp32", 1, 2, 1, 32, 16, 1, 4, mask="window", window=8)]
        sweep = []
    elif sizes == "quick":
        main = [_gpu_shape(4096, 128, 4), _gpu_shape(16384, 128, 4)] + _masked_shapes([4096])
        sweep = [_gpu_shape(4096, 128, 4, R=16, C=1024)]
    else:
        dts = _env_list("ABFT_BENCH_DTYPES") or ["bf16"]
        main = [_gpu_shape(L, D, g, dtype=dt) for dt in dts for D in (64, 128) for g in (1, 4)
                for L in (1024, 4096, 16384, 32768)] + _masked_shapes([4096, 16384])
        sweep = [_gpu_shape(L, 128, 4, R=R, C=C) for L in (4096, 16384) for R in (1, 4, 16, 64)
                 for C in (64, 256, 1024, None) if (R, C) != (1, 64)]
    lens = _env_list("ABFT_BENCH_L")
    main = [s for s in main if lens is None or str(s.L) in lens]
    sweep = [s for s in sweep if lens is None or str(s.L) in lens]
    methods, modes = _keep(OP_METHODS, "ABFT_BENCH_METHODS"), _keep(MODES, "ABFT_BENCH_MODES")
    cases = [(m, mode, p, s) for s in main for mode in modes for m in methods for p in (False, True)
             if not (m.startswith("sdpa_") and p)  # SDPA + probe recompute = abft_torch
             and not (m == "abft_sdpa" and s.mask != "none")  # the sdpa engine takes no mask
             and not (m == "abft_varlen" and s.mask == "none")]  # varlen: for masked batches
    # probe sweep: fused backends with probes, forward + backward
    cases += [(m, "both", True, s) for s in sweep for m in methods if m in ABFT_METHODS
              and "both" in modes]
    masks = _env_list("ABFT_BENCH_MASKS")
    return [c for c in cases if masks is None or c[3].mask in masks]


def op_case_id(case) -> str:
    m, mode, p, s = case
    return f"{mode}-{m}{'+probes' if p else ''}-{s.id}"


# ------------------------------------------------------------------------------ e2e shapes

LLAMA_CONFIGS = {
    # Llama 3.2 1B and Llama 3.1 8B architecture sizes (random weights).
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                     vocab_size=128256, tie_word_embeddings=True),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     vocab_size=128256, tie_word_embeddings=False),
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16, vocab_size=128, tie_word_embeddings=True),
}


@dataclass(frozen=True)
class E2EShape:
    model: str
    dtype: str
    B: int
    L: int
    k: int = 4  # demonstrations: probe columns = their label positions; probe row = last token
    padded: bool = False  # right-padded prompts, real lengths 50-100% of L (ABFT's batches)

    @property
    def id(self):
        return f"{self.model}-{self.dtype}-B{self.B}-L{self.L}" + ("-padded" if self.padded else "")


def e2e_cases(sizes: str) -> list:
    """[(method, E2EShape)] of a size set, in run order (model, then L ascending)."""
    if sizes == "smoke":
        shapes = [E2EShape("tiny", "fp32", 1, 32)]
        shapes.append(E2EShape("tiny", "fp32", 3, 32, padded=True))
    elif sizes == "quick":
        shapes = [E2EShape("llama-1b", "bf16", 1, L) for L in (512, 4096)]
        shapes.append(E2EShape("llama-1b", "bf16", 8, 1024, padded=True))
    else:
        shapes = [E2EShape(m, "bf16", 1, 512 * 2 ** i) for m in ("llama-1b", "llama-8b")
                  for i in range(9)]  # 512 .. 128k
        shapes += [E2EShape("llama-1b", "bf16", 8, L, padded=True) for L in (1024, 4096)]
    models, lens = _env_list("ABFT_BENCH_MODELS"), _env_list("ABFT_BENCH_L")
    shapes = [s for s in shapes if (models is None or s.model in models)
              and (lens is None or str(s.L) in lens)]
    methods = _keep(E2E_METHODS, "ABFT_BENCH_METHODS")
    return [(m, s) for s in shapes for m in methods]


def e2e_case_id(case) -> str:
    m, s = case
    return f"{m}-{s.id}"


# ------------------------------------------------------------------------ timing and memory

def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def wall(fn, dev) -> float:
    """Seconds of one synchronised call of fn()."""
    sync(dev)
    t = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - t


def rounds_for(seconds_per_call, budget_env, default_budget, lo, hi) -> int:
    budget = float(os.environ.get(budget_env, default_budget))
    return int(max(lo, min(hi, budget / max(seconds_per_call, 1e-6))))


def timed_pedantic(benchmark, target, setup, dev, rounds, warmup_rounds, above_current=False):
    """benchmark.pedantic with the peak CUDA memory over the timed rounds.

    peak_mem_mb is max_memory_allocated over the rounds; with above_current, minus what was
    allocated before them (inputs and caches). Returns (last result, stats dict with ms / ms_min /
    rounds / peak_mem_mb, or None when pytest-benchmark timing is off)."""
    base = 0
    if dev.type == "cuda":
        sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        if above_current:
            base = torch.cuda.memory_allocated(dev)
    res = benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=warmup_rounds,
                             iterations=1)
    if benchmark.disabled or benchmark.stats is None:
        return res, None
    st = benchmark.stats.stats
    out = {"ms": st.median * 1e3, "ms_min": st.min * 1e3, "rounds": st.rounds,
           "peak_mem_mb": None}
    if dev.type == "cuda":
        sync(dev)
        out["peak_mem_mb"] = (torch.cuda.max_memory_allocated(dev) - base) / 2 ** 20
    return res, out


# ------------------------------------------------------------------ GPU kernel time (CUDA only)
#
# Wall time (timed_pedantic) includes host work and a synchronisation per call. Two more figures
# per case, both None without CUDA (the columns stay empty on the CPU):
#   event_ms  GPU time of the work: CUDA events recorded around ``iters`` back-to-back calls
#             after warm-up, no host synchronisation in between (mean per call). Where each call
#             needs an untimed preparation (the forward before a timed backward), one event pair
#             per call, around the timed part only.
#   graph_ms  the work captured once in a torch.cuda.CUDAGraph and replayed ``iters`` times (mean
#             per replay): the GPU time without any launch overhead. Where capture fails (a host
#             synchronisation, a host read of a tensor value, an op that cannot be captured), None
#             and the reason; never an exception.
# ``work(*prepare())`` must not synchronise: it is what a training step launches.

def _args(prepare):
    return prepare() if prepare is not None else ()


def event_ms(work, dev, iters: int, prepare=None, warmup: int = 2) -> float | None:
    """Mean GPU ms of work() by CUDA events (see above); None without CUDA."""
    if dev.type != "cuda":
        return None
    for _ in range(warmup):
        work(*_args(prepare))
    sync(dev)
    iters = max(1, int(iters))
    if prepare is None:
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        for _ in range(iters):
            work()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    pairs = []
    for _ in range(iters):
        args = prepare()
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        work(*args)
        end.record()
        pairs.append((start, end))
        del args
    sync(dev)
    return sum(s.elapsed_time(e) for s, e in pairs) / iters


def capture_failure(e: BaseException) -> str:
    """The graph_reason of a failed capture: one line, at most 200 characters."""
    if is_oom(e):
        return "capture failed: out of memory"
    first = (str(e).strip().splitlines() or [""])[0]
    return f"capture failed: {type(e).__name__}: {first}"[:200]


def graph_ms(work, dev, iters: int, prepare=None, warmup: int = 3,
             cleanup=None) -> tuple[float | None, str]:
    """(mean ms per CUDA-graph replay of work(*prepare()), reason when capture failed).

    prepare() runs eagerly before the capture (on the capture stream, so that a backward captured
    from it runs there too); work is captured once, replayed once untimed, then ``iters`` times
    between two events. (None, "") without CUDA. cleanup() runs at the end whatever happened
    (e.g. drop the gradients the graph's memory pool holds)."""
    if dev.type != "cuda":
        return None, ""
    graph = args = None
    stream = torch.cuda.Stream(dev)
    try:
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                work(*_args(prepare))
            args = _args(prepare)
        torch.cuda.current_stream(dev).wait_stream(stream)
        sync(dev)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            work(*args)
        graph.replay()
        sync(dev)
        iters = max(1, int(iters))
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        for _ in range(iters):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters, ""
    except Exception as e:  # noqa: BLE001 - any capture failure becomes a reason, never a crash
        return None, capture_failure(e)
    finally:
        graph = args = None
        if cleanup is not None:
            cleanup()
        try:
            sync(dev)
        except Exception:  # noqa: BLE001 - an invalidated capture may surface here once
            pass
        free_memory()
