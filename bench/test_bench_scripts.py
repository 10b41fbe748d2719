"""The recorder, size sets, plot and table scripts, on made-up rows in a temporary directory.

The numbers below are invented to exercise the scripts; they are never written to bench/results.
"""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import bench_record as R
import benchlib
import pytest

HERE = Path(__file__).resolve().parent


def _load(name):
    spec = importlib.util.spec_from_file_location(f"abft_bench_{name}", HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


META = {"run_id": "run-b", "date": "2030-01-02T00:00:00+00:00", "device": "made-up device",
        "torch": "0", "cuda": "0", "triton": "0", "transformers": "0", "commit": "abc",
        "flags": ""}


def made_up_rows():
    """Attention rows: sdpa_flash 1 ms/unit, cudnn 0.9, abft_triton 1.0 without and 1.1 with
    probes, eager OOM at L = 2048. E2E: abft_triton 5x eager tokens/s, eager OOM at L = 2048."""
    att, e2e = [], []
    for L in (512, 1024, 2048):
        u = (L / 512) ** 2
        base = dict(META, mode="both", dtype="bf16", B=16384 // L, Hq=16, Hkv=4, L=L, D=128,
                    causal=1, status="ok", note="")
        for method, probes, ms in (("sdpa_flash", 0, 1.0), ("sdpa_cudnn", 0, 0.9),
                                   ("abft_triton", 0, 1.0), ("abft_triton", 1, 1.1),
                                   ("eager", 1, 4.0)):
            r = dict(base, method=method, probes=probes, R=1 if probes else "",
                     C=64 if probes else "", ms=ms * u, ms_min=ms * u, rounds=5, tflops=100 / ms,
                     peak_mem_mb=1000 * u)
            if method == "eager" and L == 2048:
                r.update(ms="", ms_min="", rounds="", tflops="", peak_mem_mb="", status="oom")
            att.append(r)
        for method, tps in (("abft_triton", 5000.0), ("eager", 1000.0)):
            r = dict(META, model="llama-1b", method=method, dtype="bf16", B=1, L=L, layers=16,
                     params_m=1236.0, ms=1e3 * L / tps, ms_min=1e3 * L / tps, rounds=2,
                     tokens_per_s=tps, peak_mem_mb=2000.0 * u, status="ok", note="")
            if method == "eager" and L == 2048:
                r.update(ms="", ms_min="", rounds="", tokens_per_s="", peak_mem_mb="",
                         status="oom")
            e2e.append(r)
    return att, e2e


def test_rows_name_the_opt_in_kernel_switches(monkeypatch):
    """A row says which ABFT_FAST_* switches were on, so TMA / autotuned rows are never read as
    the default kernels' (and the other way round)."""
    for v in R.FLAG_VARS:
        monkeypatch.delenv(v, raising=False)
    assert R.run_metadata()["flags"] == ""
    monkeypatch.setenv("ABFT_FAST_AUTOTUNE", "1")
    monkeypatch.setenv("ABFT_FAST_TMA", "0")
    assert R.run_metadata()["flags"] == "ABFT_FAST_AUTOTUNE=1"
    monkeypatch.setenv("ABFT_FAST_TMA", "1")
    assert R.run_metadata()["flags"] == "ABFT_FAST_TMA=1 ABFT_FAST_AUTOTUNE=1"


def test_flops_formula():
    s = benchlib.OpShape("bf16", 2, 3, 3, 8, 4, 1, 1, causal=True)
    assert benchlib.attention_flops(s, "fwd") == 4 * 2 * 3 * 8 * 8 * 4 / 2
    assert benchlib.attention_flops(s, "bwd") == 2.5 * benchlib.attention_flops(s, "fwd")
    assert benchlib.attention_flops(s, "both") == 3.5 * benchlib.attention_flops(s, "fwd")


def test_size_sets(monkeypatch):
    for var in ("ABFT_BENCH_METHODS", "ABFT_BENCH_MODES", "ABFT_BENCH_L", "ABFT_BENCH_MODELS",
                "ABFT_BENCH_DTYPES"):
        monkeypatch.delenv(var, raising=False)
    gpu = benchlib.op_cases("gpu")
    ids = [benchlib.op_case_id(c) for c in gpu]
    assert len(ids) == len(set(ids))
    main = {s for m, mode, p, s in gpu if s.R == 1 and s.C == 64}
    assert {s.L for s in main} == {1024, 4096, 16384, 32768}
    assert {s.D for s in main} == {64, 128} and {s.dtype for s in main} == {"bf16"}
    assert all(s.B * s.L == max(16384, s.L) for s in main)
    assert {(m, mode, p) for m, mode, p, _ in gpu} >= {
        (m, mode, p) for m in benchlib.ABFT_METHODS + ("flex", "eager") for mode in benchlib.MODES
        for p in (False, True)}
    assert {m for m, *_ in gpu} == set(benchlib.OP_METHODS)
    e2e = benchlib.e2e_cases("gpu")
    assert {s.L for _, s in e2e} == {512 * 2 ** i for i in range(9)}
    assert {s.model for _, s in e2e} == {"llama-1b", "llama-8b"}
    monkeypatch.setenv("ABFT_BENCH_METHODS", "abft_triton,sdpa_flash")
    monkeypatch.setenv("ABFT_BENCH_L", "4096")
    sub = benchlib.op_cases("gpu")
    assert sub and {m for m, *_ in sub} == {"abft_triton", "sdpa_flash"}
    assert {s.L for *_, s in sub} == {4096}


def test_recorder_appends(tmp_path):
    att, _ = made_up_rows()
    p1 = R.append_rows("attention", att[:2], tmp_path)
    p2 = R.append_rows("attention", att[2:4], tmp_path)
    assert p1 == p2 == tmp_path / "attention.csv"
    text = p1.read_text().splitlines()
    assert text[0].split(",") == R.COLUMNS["attention"] and len(text) == 5
    (tmp_path / "e2e.csv").write_text("some,old,header\n")
    p3 = R.append_rows("e2e", [dict(META, model="x", method="eager", L=1)], tmp_path)
    assert p3.name == "e2e-v2.csv"
    assert (tmp_path / "e2e.csv").read_text() == "some,old,header\n"
    with pytest.raises(ValueError):
        R.append_rows("attention", [dict(META, no_such_column=1)], tmp_path)


def test_select_run(tmp_path):
    att, _ = made_up_rows()
    older = [dict(r, run_id="run-a", date="2029-01-01T00:00:00+00:00") for r in att[:3]]
    R.append_rows("attention", older + att, tmp_path)
    rows = R.read_rows("attention", tmp_path)
    assert {r["run_id"] for r in R.select_run(rows)} == {"run-b"}
    assert len(R.select_run(rows, "run-a")) == 3
    assert R.select_run(rows, device="no such device") == []


def test_plot_and_table(tmp_path):
    att, e2e = made_up_rows()
    R.append_rows("attention", att, tmp_path)
    R.append_rows("e2e", e2e, tmp_path)
    written = _load("plot").main(["--results", str(tmp_path), "--out", str(tmp_path / "png")])
    names = sorted(p.name for p in written)
    assert names == ["attention_ratio_bf16.png", "attention_tflops_bf16.png", "e2e.png"]
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
    text = _load("table").render(tmp_path)
    assert "made-up device" in text
    # L = 1024: best SDPA = cudnn 3.6 ms; abft_triton +probes 4.4 ms = 1.22x; overhead +10%
    line = next(ln for ln in text.splitlines() if ln.startswith("| 1024 | 16 |"))
    assert "3.6 ms (cudnn)" in line and "4.4 ms (1.22x)" in line and "+10%" in line
    line = next(ln for ln in text.splitlines() if ln.startswith("| 2048 | 8 |"))
    assert "OOM" in line
    e2e_line = next(ln for ln in text.splitlines() if ln.startswith("| 1024 | 5,000"))
    assert e2e_line.rstrip().endswith("| 5.0x |")
    assert "| longest L that ran | 2048 (largest tried) | 1024 (OOM at 2048) |" in text
    out = tmp_path / "summary.md"
    _load("table").main(["--results", str(tmp_path), "--out", str(out), "--full"])
    assert "All attention rows" in out.read_text()


def test_table_without_results(tmp_path):
    assert "no benchmark has been recorded yet" in _load("table").render(tmp_path)


class _Bench:
    """Stand-in for the pytest-benchmark fixture with timing off."""
    disabled, stats, group = True, None, None

    def __init__(self):
        self.extra_info = {}

    def pedantic(self, target, setup=None, rounds=1, warmup_rounds=0, iterations=1):
        args = setup() if setup else None
        return target(*args[0]) if args else target()


class _Rec:
    sizes, timing, enabled = "smoke", False, True

    def __init__(self):
        self.rows = []

    def add(self, table, **row):
        self.rows.append((table, row))


def test_attention_oom_is_recorded(monkeypatch):
    import test_bench_attention as TA
    import torch

    def oom(self):
        raise torch.OutOfMemoryError("CUDA out of memory (made up)")
    monkeypatch.setattr(TA.OpCase, "forward", oom)
    rec = _Rec()
    s = benchlib.OpShape("fp32", 1, 2, 1, 32, 16, 1, 4)
    with pytest.raises(pytest.skip.Exception, match="out of memory"):
        TA.test_attention(("eager", "both", True, s), _Bench(), rec)
    assert rec.rows == [("attention", rec.rows[0][1])] and rec.rows[0][1]["status"] == "oom"
    assert rec.rows[0][1]["L"] == 32 and rec.rows[0][1]["method"] == "eager"


def test_e2e_oom_skips_longer_sequences(monkeypatch):
    import test_bench_e2e as TE
    import torch

    def probe_forward(method, model):
        def fn(ids, rows, cols, am=None):
            raise torch.OutOfMemoryError("CUDA out of memory (made up)")
        return fn
    monkeypatch.setattr(TE, "probe_forward", probe_forward)
    monkeypatch.setattr(TE, "_first_oom", {})
    rec = _Rec()
    with pytest.raises(pytest.skip.Exception, match="out of memory"):
        TE.test_abft_step(("eager", benchlib.E2EShape("tiny", "fp32", 1, 32)), _Bench(), rec)
    assert [r["status"] for _, r in rec.rows] == ["oom"] and rec.rows[0][0] == "e2e"
    with pytest.raises(pytest.skip.Exception, match="at L=32 already"):
        TE.test_abft_step(("eager", benchlib.E2EShape("tiny", "fp32", 1, 64)), _Bench(), rec)
    assert len(rec.rows) == 1


def test_tune_tiles_smoke(tmp_path, monkeypatch):
    """bench/tune_tiles.py --smoke: every pass has its default and its candidates; a candidate whose
    outputs are off is listed as wrong and not timed, one that fails is listed as rejected."""
    tune = _load("tune_tiles")
    K = tune.K
    real_fwd, real_bwd = K.attention_fwd, K.attention_bwd

    def fwd(*a, **kw):
        out, lse = real_fwd(*a, **kw)
        if K._tile_override.get("fwd") == (16, 32, 4, 1):
            out = out * 1.01  # a wrong kernel configuration
        return out, lse

    def bwd(*a, **kw):
        if K._tile_override.get("dq") == (32, 16, 4, 1):
            raise RuntimeError("out of resources (made up)")
        return real_bwd(*a, **kw)
    monkeypatch.setattr(K, "attention_fwd", fwd)
    monkeypatch.setattr(K, "attention_bwd", bwd)
    out = tmp_path / "tiles.csv"
    tune.main(["--smoke", "--out", str(out)])
    rows = list(csv.DictReader(open(out)))
    by = {(r["pass"], int(r["BLOCK_M"]), int(r["BLOCK_N"]), r["default"]): r for r in rows}
    assert len(rows) == 9 and {r["pass"] for r in rows} == set(K.TILE_KINDS)
    for kind in K.TILE_KINDS:
        d = by[(kind, 16, 16, "1")]
        assert d["status"] == "ok" and float(d["vs_default"]) == 1.0
        assert float(d["rel_err"]) < 1e-5  # float32 kernels against the float32 reference
    assert by[("fwd", 16, 32, "0")]["status"] == "wrong" and by[("fwd", 16, 32, "0")]["ms"] == ""
    assert by[("fwd", 32, 16, "0")]["status"] == "ok" and float(by[("fwd", 32, 16, "0")]["ms"]) > 0
    assert by[("dq", 32, 16, "0")]["status"] == "rejected: RuntimeError"
    assert by[("dkdv", 32, 16, "0")]["status"] == "ok"


# ------------------------------------------------------------ GPU kernel time columns (made up)

def _with_gpu_times(att, e2e):
    """The made-up rows with GPU columns: events = 0.8 x wall, graph = 0.7 x wall, except
    abft_triton with probes, whose capture 'failed' (no graph figure, a reason instead)."""
    reason = "capture failed: RuntimeError: operation not permitted when stream is capturing"
    for r in att + e2e:
        if r["status"] != "ok":
            continue
        r.update(event_ms=0.8 * r["ms"], graph_ms=0.7 * r["ms"], graph_reason="")
        if r.get("method") == "abft_triton" and r.get("probes") == 1:
            r.update(graph_ms="", graph_reason=reason)
    return att, e2e, reason


def test_gpu_time_columns_round_trip(tmp_path):
    att, e2e, reason = _with_gpu_times(*made_up_rows())
    for table in ("attention", "e2e"):
        cols = R.COLUMNS[table]
        assert {"ms", "event_ms", "graph_ms", "graph_reason"} <= set(cols)
    assert "mask" in R.COLUMNS["attention"]
    R.append_rows("attention", att, tmp_path)
    R.append_rows("e2e", e2e, tmp_path)
    rows = R.read_rows("attention", tmp_path)
    tri = next(r for r in rows if r["method"] == "abft_triton" and r["probes"] == "1")
    assert tri["graph_ms"] == "" and tri["graph_reason"] == reason and R.num(tri["event_ms"])
    oom = next(r for r in rows if r["status"] == "oom")
    assert oom["event_ms"] == oom["graph_ms"] == oom["graph_reason"] == ""


def test_rows_of_an_older_header_read_with_empty_gpu_columns(tmp_path):
    """A CSV written before the GPU columns existed (and before the mask column) is read beside
    the new one: its rows get the new keys as "" and stay out of the kernel-time section."""
    att, _ = made_up_rows()
    old_cols = [c for c in R.COLUMNS["attention"]
                if c not in ("event_ms", "graph_ms", "graph_reason", "mask", "window")]
    with open(tmp_path / "attention.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old_cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(att)
    new_path = R.append_rows("attention", [dict(att[0], run_id="run-c")], tmp_path)
    assert new_path.name == "attention-v2.csv"
    rows = R.read_rows("attention", tmp_path)
    assert len(rows) == len(att) + 1
    assert all(r["event_ms"] == "" and r["graph_reason"] == "" for r in rows)
    table = _load("table")
    text = table.render(tmp_path, run="run-b")
    assert "Kernel time" not in text and "3.6 ms (cudnn)" in text


def test_kernel_time_table(tmp_path):
    att, e2e, reason = _with_gpu_times(*made_up_rows())
    cpu = [dict(r, run_id="run-cpu", date="2031-01-01T00:00:00+00:00", device="cpu",
                event_ms="", graph_ms="", graph_reason="") for r in made_up_rows()[0]]
    R.append_rows("attention", att + cpu, tmp_path)
    R.append_rows("e2e", e2e, tmp_path)
    table = _load("table")
    assert "Kernel time" not in table.render(tmp_path)  # newest run: CPU rows, columns empty
    text = table.render(tmp_path, run="run-b")
    lines = text.splitlines()
    assert any("**Kernel time**" in ln for ln in lines)
    # L = 1024 (u = 4): best SDPA by events = cudnn 0.8 x 3.6 = 2.88 ms; abft_triton +probes
    # events 0.8 x 4.4 = 3.52 ms = 1.22x; its graph failed: no figure, the reason instead
    tri = next(ln for ln in lines if ln.startswith("| both | none | bf16 | 128 | 16/4 | 1024 |")
               and "| abft_triton |" in ln and "| 1 x 64 |" in ln)
    cells = [c.strip() for c in tri.strip("|").split("|")]
    assert cells[9:] == ["4.4 ms", "3.52 ms", "–", "1.22x", "–", reason]
    cud = next(ln for ln in lines if ln.startswith("| both | none | bf16 | 128 | 16/4 | 1024 |")
               and "| sdpa_cudnn |" in ln)
    cells = [c.strip() for c in cud.strip("|").split("|")]
    assert cells[9:] == ["3.6 ms", "2.88 ms", "2.52 ms", "1.00x", "1.00x", ""]
    assert not any("| OOM" in ln and "Kernel" in ln for ln in lines)
    step = next(ln for ln in lines if ln.startswith("| llama-1b | 512 | abft_triton |"))
    assert [c.strip() for c in step.strip("|").split("|")][3:6] == [
        "102 ms", "81.9 ms", "71.7 ms"]
    full = table.render(tmp_path, run="run-b", full=True)
    assert "| event ms | graph ms |" in full


def test_kernel_timers_are_empty_without_cuda():
    import torch
    cpu = torch.device("cpu")
    assert benchlib.event_ms(lambda: None, cpu, 3) is None
    assert benchlib.graph_ms(lambda: None, cpu, 3) == (None, "")
    msg = benchlib.capture_failure(RuntimeError("CUDA error: operation not permitted when stream "
                                                "is capturing\nmore lines"))
    assert msg == ("capture failed: RuntimeError: CUDA error: operation not permitted when stream "
                   "is capturing")
    assert benchlib.capture_failure(torch.OutOfMemoryError("x")) == "capture failed: out of memory"
    assert len(benchlib.capture_failure(RuntimeError("y" * 500))) == 200


@pytest.mark.parametrize("mode", ["fwd", "bwd", "both"])
def test_sync_free_callables_do_the_timed_work(mode):
    """OpCase.kernel_callables (what event_ms / graph_ms time) does what the wall-timed callables
    do: same outputs and gradients, on the CPU; kernel_times gives no GPU figure there."""
    import test_bench_attention as TA
    import torch
    s = benchlib.OpShape("fp32", 1, 2, 1, 32, 16, 2, 4, mask="pad-left")
    case = TA.OpCase("abft_torch", mode, True, s, torch.device("cpu"))
    ref = case.once()
    ref = [t.clone() for t in case.last] if mode == "fwd" else [g.clone() for g in ref]
    prepare, work = case.kernel_callables(graph=True)
    work(*(prepare() if prepare else ()))
    got = case.last if mode == "fwd" else case.grads()
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    case.release()
    assert case.last is None and case.q.grad is None
    assert TA.kernel_times(case, torch.device("cpu"), 3) == {}
