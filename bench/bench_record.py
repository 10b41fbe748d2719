"""Result rows of the benchmark suite: run metadata, CSV append and CSV read.

Two tables live in ``bench/results/`` (or ``$ABFT_BENCH_RESULTS``): ``attention.csv`` (one row per
op case) and ``e2e.csv`` (one row per ABFT training-step case). A run only appends; rows of one
pytest session share a ``run_id`` (set ``ABFT_BENCH_RUN_ID`` to give several sessions one id).

Times: ``ms`` / ``ms_min`` wall clock per call (median / min, host work and a synchronisation
included); ``event_ms`` GPU time by CUDA events; ``graph_ms`` CUDA-graph replay, empty with
``graph_reason`` when the work could not be captured (benchlib, "GPU kernel time"). The two GPU
columns are empty on the CPU and in rows recorded before they existed (older CSV files, whose
header differs, are read alongside: ``read_rows`` gives their rows these keys as "").
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import subprocess
import uuid
from pathlib import Path

META_COLUMNS = ["run_id", "date", "device", "torch", "cuda", "triton", "transformers", "commit",
                "flags"]
# the opt-in switches that change what the kernels run; a row names those that were on
FLAG_VARS = ("ABFT_FAST_TMA", "ABFT_FAST_AUTOTUNE")
COLUMNS = {
    "attention": META_COLUMNS + [
        "method", "mode", "probes", "dtype", "B", "Hq", "Hkv", "L", "D", "R", "C", "causal",
        "mask", "window", "ms", "ms_min", "event_ms", "graph_ms", "rounds", "tflops",
        "peak_mem_mb", "status", "graph_reason", "note"],
    "e2e": META_COLUMNS + [
        "model", "method", "dtype", "B", "L", "layers", "params_m", "ms", "ms_min", "event_ms",
        "graph_ms", "rounds", "tokens_per_s", "peak_mem_mb", "status", "graph_reason", "note"],
}
HERE = Path(__file__).resolve().parent


def results_dir() -> Path:
    return Path(os.environ.get("ABFT_BENCH_RESULTS") or HERE / "results")


def _git_commit() -> str:
    if os.environ.get("ABFT_BENCH_COMMIT"):
        return os.environ["ABFT_BENCH_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=HERE, text=True,
                              capture_output=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=HERE,
                               capture_output=True, timeout=10).returncode != 0
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:
        return ""


def run_metadata() -> dict:
    """Metadata shared by every row of this session."""
    import torch
    now = _dt.datetime.now(_dt.timezone.utc)
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"cpu ({platform.machine()}, {os.cpu_count()} threads)"
    run_id = os.environ.get("ABFT_BENCH_RUN_ID") or (
        now.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6])
    return {"run_id": run_id, "date": now.isoformat(timespec="seconds"), "device": device,
            "torch": torch.__version__, "cuda": torch.version.cuda or "",
            "triton": _version("triton"), "transformers": _version("transformers"),
            "commit": _git_commit(),
            "flags": " ".join(f"{v}=1" for v in FLAG_VARS if os.environ.get(v) == "1")}


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def append_rows(table: str, rows: list, directory: Path | None = None) -> Path:
    """Append ``rows`` (dicts keyed by COLUMNS[table]) to ``<directory>/<table>.csv``.

    A file whose header differs from the current columns is left alone; the rows then go to
    ``<table>-v<n>.csv``. Returns the path written."""
    cols = COLUMNS[table]
    for r in rows:
        extra = set(r) - set(cols)
        if extra:
            raise ValueError(f"{table}: unknown columns {sorted(extra)}")
    directory = Path(directory or results_dir())
    directory.mkdir(parents=True, exist_ok=True)
    path, n = directory / f"{table}.csv", 1
    while path.exists():
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        if header == cols:
            break
        n += 1
        path = directory / f"{table}-v{n}.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({c: _fmt(r.get(c)) for c in cols})
    return path


def read_rows(table: str, directory: Path | None = None) -> list:
    """All rows of ``<table>*.csv`` in ``directory``, as dicts of strings."""
    directory = Path(directory or results_dir())
    rows = []
    for path in sorted(directory.glob(f"{table}*.csv")):
        with open(path, newline="") as f:
            rows.extend({**dict.fromkeys(COLUMNS[table], ""), **r} for r in csv.DictReader(f))
    return rows


def select_run(rows: list, run: str | None = None, device: str | None = None) -> list:
    """Rows of one run: ``run`` (an id, or None / "latest" for the run with the newest date),
    optionally restricted to devices whose name contains ``device``."""
    if device:
        rows = [r for r in rows if device.lower() in r["device"].lower()]
    if not rows:
        return []
    if run in (None, "latest"):
        run = max(rows, key=lambda r: (r["date"], r["run_id"]))["run_id"]
    return [r for r in rows if r["run_id"] == run]


def num(v, default=None):
    """float of a CSV cell ('' -> default)."""
    try:
        return float(v) if v not in ("", None) else default
    except ValueError:
        return default
