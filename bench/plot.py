"""Comparison plots (PNG) from bench/results/*.csv.

    python bench/plot.py [--results DIR] [--out DIR] [--run RUN_ID|latest] [--device SUBSTR]

Writes, for the chosen run (default: the newest one):
  attention_ratio_<dtype>.png   time / best SDPA backend without probes, vs L (per mode x shape)
  attention_tflops_<dtype>.png  TFLOP/s vs L
  e2e.png                       ABFT step tokens/s and peak memory vs L (x = out of memory)
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_record as R  # noqa: E402

MODE_TITLE = {"fwd": "forward", "bwd": "backward", "both": "forward + backward"}


def label(r) -> str:
    return r["method"] + (" +probes" if r["probes"] == "1" else "")


def headline_probe_config(rows):
    """(R, C) of most probe rows: the configuration of the main grid."""
    c = Counter((r["R"], r["C"]) for r in rows if r["probes"] == "1")
    return c.most_common(1)[0][0] if c else None


def main_grid(rows):
    """Rows without probes plus probe rows of the main (R, C)."""
    rc = headline_probe_config(rows)
    return [r for r in rows if r["probes"] != "1" or (r["R"], r["C"]) == rc], rc


def mask_of(r) -> str:
    """The row's mask ("none" for rows recorded before the column existed)."""
    m = r.get("mask") or "none"
    return m + (r.get("window") or "") if m == "window" else m


def shape_key(r):
    return (r["dtype"], r["D"], r["Hq"], r["Hkv"], mask_of(r))


def point_key(r):
    """Rows with equal keys are comparable: same shape, mode and mask."""
    return (r["dtype"], r["D"], r["Hq"], r["Hkv"], r["mode"], r["L"], r["B"], mask_of(r))


def best_sdpa(rows) -> dict:
    """point_key -> (ms, method) of the fastest SDPA backend without probes."""
    best = {}
    for r in rows:
        ms = R.num(r["ms"])
        if r["method"].startswith("sdpa_") and r["probes"] != "1" and r["status"] == "ok" and ms:
            k = point_key(r)
            if k not in best or ms < best[k][0]:
                best[k] = (ms, r["method"])
    return best


def _fmt_L(x, _pos=None):
    return f"{x / 1024:g}k" if x >= 1024 else f"{x:g}"


def _axes_style(ax, xs, log_y):
    """log2 L axis labelled 512, 1k, ...; plain numbers on a log y axis."""
    from matplotlib.ticker import FuncFormatter, NullFormatter, ScalarFormatter
    ax.set_xscale("log", base=2)
    if xs:
        ax.set_xticks(sorted(set(xs)))
    ax.xaxis.set_major_formatter(FuncFormatter(_fmt_L))
    ax.xaxis.set_minor_formatter(NullFormatter())
    if log_y:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        def minor(y, _p):  # label minor ticks only on a short range
            lo, hi = ax.get_ylim()
            return f"{y:g}" if lo > 0 and hi / lo < 20 else ""
        ax.yaxis.set_minor_formatter(FuncFormatter(minor))
        ax.tick_params(axis="y", which="minor", labelsize=6)
    ax.grid(True, which="both", alpha=0.3)


def panel_title(key):
    dtype, d, hq, hkv = key[:4]
    mask = key[4] if len(key) > 4 else "none"
    return f"{dtype}, d={d}, Hq={hq}, Hkv={hkv}" + ("" if mask == "none" else f", {mask}")


METHOD_COLORS = {m: f"C{i}" for i, m in enumerate(
    ("abft_auto", "abft_sdpa", "abft_triton", "abft_cuda", "abft_torch", "sdpa_flash",
     "sdpa_cudnn", "sdpa_efficient", "sdpa_math", "flex", "eager", "sdpa_recompute"))}


def _style(lab):
    """Colour per method; solid with probes, dashed without."""
    method = lab.split(" ")[0]
    return {"linestyle": "-" if "+probes" in lab else "--", "marker": "o", "markersize": 3,
            "color": METHOD_COLORS.get(method, "black")}


def attention_plots(rows, out: Path, run_desc: str) -> list:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, rc = main_grid(rows)
    best = best_sdpa(rows)
    written = []
    for dtype in sorted({r["dtype"] for r in rows}):
        rs = [r for r in rows if r["dtype"] == dtype]
        shapes = sorted({shape_key(r) for r in rs},
                        key=lambda k: (int(k[1]), int(k[2]) // int(k[3])))
        modes = [m for m in ("fwd", "bwd", "both") if any(r["mode"] == m for r in rs)]
        for kind in ("ratio", "tflops"):
            fig, axes = plt.subplots(len(modes), len(shapes), squeeze=False,
                                     figsize=(max(9.0, 4.2 * len(shapes)), 3.4 * len(modes) + 1.2))
            for i, mode in enumerate(modes):
                for j, sk in enumerate(shapes):
                    ax = axes[i][j]
                    lines = defaultdict(list)
                    for r in rs:
                        if r["mode"] != mode or shape_key(r) != sk or r["status"] != "ok":
                            continue
                        ms, lab = R.num(r["ms"]), label(r)
                        if kind == "ratio":
                            b = best.get(point_key(r))
                            if b is None or not ms:
                                continue
                            lines[lab].append((int(r["L"]), ms / b[0]))
                        elif R.num(r["tflops"]):
                            lines[lab].append((int(r["L"]), R.num(r["tflops"])))
                    for lab in sorted(lines):
                        pts = sorted(lines[lab])
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=lab,
                                **_style(lab))
                    xs = [p[0] for v in lines.values() for p in v]
                    _axes_style(ax, xs, log_y=kind == "ratio" and bool(lines))
                    if kind == "ratio":
                        ax.axhline(1.0, color="black", linewidth=0.8)
                        ax.axhline(1.1, color="gray", linewidth=0.8, linestyle=":")
                        ax.set_ylabel("time / best SDPA (no probes)")
                    else:
                        ax.set_ylabel("TFLOP/s")
                    ax.set_title(f"{MODE_TITLE[mode]}\n{panel_title(sk)}", fontsize=9)
                    ax.set_xlabel("L")
            handles = {}
            for ax in axes.flat:
                for h, lab in zip(*ax.get_legend_handles_labels()):
                    handles.setdefault(lab, h)
            if handles:
                fig.legend(handles.values(), handles.keys(), loc="lower center",
                           ncol=min(5, len(handles)), fontsize=8)
            probe_desc = f"probes R={rc[0]}, C={rc[1]}" if rc else "no probe rows"
            fig.suptitle(f"abft-fast attention, causal, {probe_desc}\n{run_desc}", fontsize=10)
            fig.tight_layout(rect=(0, 0.1, 1, 0.95))
            path = out / f"attention_{kind}_{dtype}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def e2e_plot(rows, out: Path, run_desc: str) -> list:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = sorted({r["model"] for r in rows})
    if not models:
        return []
    fig, axes = plt.subplots(2, len(models), squeeze=False,
                             figsize=(max(8.0, 5 * len(models)), 7.5))
    for j, model in enumerate(models):
        rs = [r for r in rows if r["model"] == model]
        for i, (col, ylab, scale) in enumerate((("tokens_per_s", "tokens / s", 1.0),
                                                ("peak_mem_mb", "peak memory (GiB)", 1 / 1024))):
            ax = axes[i][j]
            for method in sorted({r["method"] for r in rs}):
                pts = sorted((int(r["L"]), R.num(r[col]) * scale) for r in rs
                             if r["method"] == method and r["status"] == "ok"
                             and R.num(r[col]) is not None)
                line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                               markersize=3, label=method,
                               color=METHOD_COLORS.get(method, "black"))[0]
                ooms = [int(r["L"]) for r in rs if r["method"] == method and r["status"] == "oom"]
                if ooms:  # x on the axis at the first L that ran out of memory
                    ax.plot([min(ooms)], [0.03], marker="x", markersize=9, linestyle="none",
                            color=line.get_color(), transform=ax.get_xaxis_transform())
            has = [x for ln in ax.get_lines() if ln.get_transform() is ax.transData
                   for x, y in zip(ln.get_xdata(), ln.get_ydata()) if y > 0]
            _axes_style(ax, has + [int(r["L"]) for r in rs], log_y=bool(has))
            if not has:
                ax.text(0.5, 0.5, "not recorded on this device", ha="center",
                        transform=ax.transAxes, fontsize=8)
            ax.set_xlabel("L (tokens per sequence)")
            ax.set_ylabel(ylab)
            ax.set_title(f"{model}: ABFT step ({'x = out of memory' if i == 0 else 'peak'})",
                         fontsize=9)
            if i == 0:
                ax.legend(fontsize=8)
    fig.suptitle(f"abft-fast ABFT training step (random weights)\n{run_desc}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    path = out / "e2e.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def run_description(rows) -> str:
    r = rows[0]
    return (f"{r['device']}, torch {r['torch']}, triton {r['triton']}, commit {r['commit']}, "
            f"{r['date'][:10]}")


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=R.results_dir())
    ap.add_argument("--out", type=Path, default=None, help="default: the results directory")
    ap.add_argument("--run", default="latest")
    ap.add_argument("--device", default=None)
    a = ap.parse_args(argv)
    out = a.out or a.results
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for table, fn in (("attention", attention_plots), ("e2e", e2e_plot)):
        rows = R.select_run(R.read_rows(table, a.results), a.run, a.device)
        if not rows:
            print(f"plot: no {table} rows in {a.results} (run {a.run})")
            continue
        print(f"plot: {table}: run {rows[0]['run_id']}, {len(rows)} rows")
        written += fn(rows, out, run_description(rows))
    for p in written:
        print(f"plot: wrote {p}")
    return written


if __name__ == "__main__":
    main()
