"""Markdown tables from bench/results/*.csv.

    python bench/table.py [--results DIR] [--run RUN_ID|latest] [--device SUBSTR] [--full]
                          [--out FILE]

Sections (for the chosen run, default the newest): fused attention with probes against the best
SDPA backend without probes (ratio, probe overhead), the probe-size sweep, the ABFT training
step (tokens/s, speed-up over eager, peak memory, longest L that fits), and, where a GPU recorded
them, wall time beside GPU time by CUDA events and by CUDA-graph replay (with the reason where
capture failed). --full adds every row.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_record as R  # noqa: E402
from plot import (  # noqa: E402
    best_sdpa,
    headline_probe_config,
    main_grid,
    mask_of,
    point_key,
)

ABFT = ("abft_auto", "abft_sdpa", "abft_triton", "abft_cuda", "abft_torch")
MODE_TITLE = {"fwd": "forward", "bwd": "backward", "both": "forward + backward"}


def _md(header, body) -> list:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(c) for c in row) + " |" for row in body]


def _ms(v):
    return f"{v:.3g} ms" if v < 100 else f"{v:.0f} ms"


def _lookup(rows):
    """(method, probes, point_key) -> row."""
    return {(r["method"], r["probes"] == "1", point_key(r)): r for r in rows}


def _cell(row, base=None):
    if row is None:
        return "–"
    if row["status"] == "oom":
        return "OOM"
    ms = R.num(row["ms"])
    if ms is None:
        return row["status"] or "–"
    return _ms(ms) + (f" ({ms / base:.2f}x)" if base else "")


def attention_section(rows, mode=None) -> list:
    grid, rc = main_grid(rows)
    if not grid:
        return []
    modes = [m for m in ("both", "fwd", "bwd") if any(r["mode"] == m for r in grid)]
    modes = [mode] if mode else modes[:1]
    best, look = best_sdpa(grid), _lookup(grid)
    methods = [m for m in ABFT if any(r["method"] == m for r in grid)]
    others = [m for m in ("flex", "eager") if any(r["method"] == m for r in grid)]
    out = []
    for md in modes:
        keys = sorted({(*point_key(r)[:4], point_key(r)[7]) for r in grid if r["mode"] == md},
                      key=lambda k: (k[4] != "none", k[4], k[0], int(k[1]), int(k[2]) // int(k[3])))
        for dtype, d, hq, hkv, mask in keys:
            pts = sorted({(int(r["L"]), r["B"]) for r in grid if r["mode"] == md
                          and (*point_key(r)[:4], point_key(r)[7]) == (dtype, d, hq, hkv, mask)})
            probe = f"R={rc[0]}, C={rc[1]}" if rc else "no probes recorded"
            out += ["", f"**{MODE_TITLE[md]}**, causal, mask {mask}, {dtype}, d={d}, Hq={hq}, "
                        f"Hkv={hkv}, "
                        f"probes {probe}. Ratios are to the best SDPA backend without probes; "
                        "overhead = with / without probes - 1 (same backend).", ""]
            header = ["L", "B", "best SDPA (no probes)"]
            for m in methods:
                header += [f"{m} +probes", f"{m} overhead"]
            header += [f"{m} +probes" for m in others] + [f"{m} (no probes)" for m in others]
            body = []
            for L, B in pts:
                k = (dtype, d, hq, hkv, md, str(L), B, mask)
                b = best.get(k)
                line = [L, B, f"{_ms(b[0])} ({b[1][5:]})" if b else "–"]
                for m in methods:
                    wp, np_ = look.get((m, True, k)), look.get((m, False, k))
                    line.append(_cell(wp, b[0] if b else None))
                    a, c = (R.num(wp["ms"]) if wp else None), (R.num(np_["ms"]) if np_ else None)
                    line.append(f"{(a / c - 1) * 100:+.0f}%" if a and c else "–")
                for m in others:
                    line.append(_cell(look.get((m, True, k)), b[0] if b else None))
                for m in others:
                    line.append(_cell(look.get((m, False, k)), b[0] if b else None))
                body.append(line)
            out += _md(header, body)
    return out


def sweep_section(rows) -> list:
    rc = headline_probe_config(rows)
    sw = [r for r in rows if r["probes"] == "1" and r["method"] in ABFT and (r["R"], r["C"]) != rc]
    if not sw:
        return []
    look = _lookup(rows)
    body = []
    for r in sorted(sw, key=lambda r: (r["mode"], int(r["L"]), int(r["R"]), r["C"], r["method"])):
        base = look.get((r["method"], False, point_key(r)))
        a, c = R.num(r["ms"]), R.num(base["ms"]) if base else None
        body.append([r["mode"], r["dtype"], r["D"], f"{r['Hq']}/{r['Hkv']}", r["L"], r["R"],
                     r["C"], r["method"], _cell(r),
                     f"{(a / c - 1) * 100:+.0f}%" if a and c else "–"])
    return ["", "**Probe sizes** (overhead against the same backend without probes)", ""] + _md(
        ["mode", "dtype", "d", "Hq/Hkv", "L", "R", "C", "method", "time", "overhead"], body)


def e2e_section(rows) -> list:
    out = []
    for model in sorted({r["model"] for r in rows}):
        rs = [r for r in rows if r["model"] == model]
        methods = [m for m in ("abft_triton", "abft_cuda", "abft_torch", "sdpa_recompute", "eager")
                   if any(r["method"] == m for r in rs)]
        look = {(r["method"], int(r["L"])): r for r in rs}
        lens = sorted({int(r["L"]) for r in rs})
        first = rs[0]
        out += ["", f"**ABFT training step, {model}** ({first['layers']} layers, "
                    f"{float(first['params_m'] or 0) / 1e3:.2f} B params, {first['dtype']}, "
                    f"B={first['B']}): tokens/s (peak GiB); speed-up = fastest abft_fast backend "
                    "/ eager.", ""]
        body = []
        for L in lens:
            line = [L]
            for m in methods:
                r = look.get((m, L))
                if r is None:
                    line.append("–")
                elif r["status"] != "ok" or R.num(r["tokens_per_s"]) is None:
                    line.append("OOM" if r["status"] == "oom" else r["status"])
                else:
                    mem = R.num(r["peak_mem_mb"])
                    line.append(f"{R.num(r['tokens_per_s']):,.0f}"
                                + (f" ({mem / 1024:.1f})" if mem else ""))
            fused = [R.num(look[(m, L)]["tokens_per_s"]) for m in ABFT if (m, L) in look
                     and look[(m, L)]["status"] == "ok"]
            fused = [f for f in fused if f]
            e = look.get(("eager", L))
            ev = R.num(e["tokens_per_s"]) if e and e["status"] == "ok" else None
            line.append(f"{max(fused) / ev:.1f}x" if fused and ev else "–")
            body.append(line)
        longest = ["longest L that ran"]
        for m in methods:
            ok = [int(r["L"]) for r in rs if r["method"] == m and r["status"] == "ok"]
            oom = [int(r["L"]) for r in rs if r["method"] == m and r["status"] == "oom"]
            s = str(max(ok)) if ok else "none"
            s += f" (OOM at {min(oom)})" if oom else (" (largest tried)" if ok else "")
            longest.append(s)
        body.append(longest + [""])
        out += _md(["L"] + methods + ["speed-up vs eager"], body)
    return out


def _gpu_ms(r, col):
    return R.num(r.get(col, ""))


def _best_sdpa_by(rows, col) -> dict:
    """point_key -> (ms, method) of the fastest SDPA backend without probes by ``col``."""
    best = {}
    for r in rows:
        ms = _gpu_ms(r, col)
        if r["method"].startswith("sdpa_") and r["probes"] != "1" and r["status"] == "ok" and ms:
            k = point_key(r)
            if k not in best or ms < best[k][0]:
                best[k] = (ms, r["method"])
    return best


def _ratio(v, best):
    return f"{v / best[0]:.2f}x" if v and best else "–"


def kernel_time_section(att, e2e, full=False) -> list:
    """Wall time beside GPU time (CUDA events) and CUDA-graph replay, with the ratio to the best
    SDPA backend without probes by the same measure; rows without either GPU figure (CPU runs,
    rows recorded before the columns existed) are left out. Default: the main grid in mode
    "both"; full: every row."""
    has = [r for r in att if _gpu_ms(r, "event_ms") or _gpu_ms(r, "graph_ms")
           or r.get("graph_reason")]
    out = []
    if has:
        rows = has if full else [r for r in main_grid(has)[0] if r["mode"] == "both"]
        by_ev, by_gr = _best_sdpa_by(rows, "event_ms"), _best_sdpa_by(rows, "graph_ms")
        body = []
        for r in sorted(rows, key=lambda r: (mask_of(r) != "none", mask_of(r), r["mode"],
                                             r["dtype"], int(r["D"]), int(r["L"]), r["method"],
                                             r["probes"])):
            k = point_key(r)
            ev, gr, wall = _gpu_ms(r, "event_ms"), _gpu_ms(r, "graph_ms"), R.num(r["ms"])
            body.append([r["mode"], mask_of(r), r["dtype"], r["D"], f"{r['Hq']}/{r['Hkv']}",
                         r["L"], r["B"], f"{r['R']} x {r['C']}" if r["probes"] == "1" else "–",
                         r["method"], _ms(wall) if wall else r["status"] or "–",
                         _ms(ev) if ev else "–", _ms(gr) if gr else "–",
                         _ratio(ev, by_ev.get(k)), _ratio(gr, by_gr.get(k)),
                         r.get("graph_reason") or ""])
        out += ["", "**Kernel time** (wall = median per call with host work and a sync; events = "
                    "GPU time by CUDA events around back-to-back calls; graph = CUDA-graph "
                    "replay, empty with the reason when capture failed; ratios to the best SDPA "
                    "backend without probes by the same measure, same mask)", ""]
        out += _md(["mode", "mask", "dtype", "d", "Hq/Hkv", "L", "B", "probes R x C", "method",
                    "wall", "events", "graph", "events / best SDPA", "graph / best SDPA",
                    "graph not captured because"], body)
    e2e_has = [r for r in e2e if _gpu_ms(r, "event_ms") or _gpu_ms(r, "graph_ms")
               or r.get("graph_reason")]
    if e2e_has:
        body = [[r["model"], r["L"], r["method"], _ms(R.num(r["ms"])) if R.num(r["ms"]) else "–",
                 _ms(_gpu_ms(r, "event_ms")) if _gpu_ms(r, "event_ms") else "–",
                 _ms(_gpu_ms(r, "graph_ms")) if _gpu_ms(r, "graph_ms") else "–",
                 r.get("graph_reason") or ""]
                for r in sorted(e2e_has, key=lambda r: (r["model"], int(r["L"]), r["method"]))]
        out += ["", "**ABFT step, kernel time** (wall and events: the whole step, Adam included; "
                    "graph: forward + loss + backward replayed, Adam outside the graph)", ""]
        out += _md(["model", "L", "method", "wall", "events", "graph (fwd + bwd)",
                    "graph not captured because"], body)
    return out


def full_section(att, e2e) -> list:
    out = []
    if att:
        out += ["", "**All attention rows**", ""] + _md(
            ["mode", "method", "probes", "dtype", "B", "Hq", "Hkv", "L", "D", "R", "C", "mask",
             "ms", "event ms", "graph ms", "TFLOP/s", "peak MiB", "status"],
            [[r["mode"], r["method"], r["probes"], r["dtype"], r["B"], r["Hq"], r["Hkv"], r["L"],
              r["D"], r["R"], r["C"], mask_of(r), r["ms"], r.get("event_ms", ""),
              r.get("graph_ms", ""), r["tflops"], r["peak_mem_mb"], r["status"]] for r in att])
    if e2e:
        out += ["", "**All ABFT step rows**", ""] + _md(
            ["model", "method", "L", "ms", "event ms", "graph ms", "tokens/s", "peak MiB",
             "status"],
            [[r["model"], r["method"], r["L"], r["ms"], r.get("event_ms", ""),
              r.get("graph_ms", ""), r["tokens_per_s"], r["peak_mem_mb"], r["status"]]
             for r in e2e])
    return out


def header_lines(rows, what) -> list:
    r = rows[0]
    return [f"_{what}: run `{r['run_id']}` on {r['device']} ({r['date']}); torch {r['torch']}"
            f"{' + CUDA ' + r['cuda'] if r['cuda'] else ''}, triton {r['triton']}, transformers "
            f"{r['transformers']}, commit `{r['commit']}`._"]


def render(results, run="latest", device=None, full=False) -> str:
    att = R.select_run(R.read_rows("attention", results), run, device)
    e2e = R.select_run(R.read_rows("e2e", results), run, device)
    lines = ["## abft-fast benchmark results", ""]
    if not att and not e2e:
        lines.append(f"No recorded rows in {results} (run {run}): no benchmark has been recorded "
                     "yet.")
        return "\n".join(lines) + "\n"
    if att:
        lines += header_lines(att, "Attention op")
        lines += attention_section(att) + sweep_section(att)
        for md in ("fwd", "bwd"):
            if full and any(r["mode"] == md for r in att):
                lines += attention_section(att, md)
    if e2e:
        lines += [""] + header_lines(e2e, "ABFT step") + e2e_section(e2e)
    lines += kernel_time_section(att, e2e, full)
    if full:
        lines += full_section(att, e2e)
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=R.results_dir())
    ap.add_argument("--run", default="latest")
    ap.add_argument("--device", default=None)
    ap.add_argument("--full", action="store_true", help="also every mode and every row")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    a = ap.parse_args(argv)
    text = render(a.results, a.run, a.device, a.full)
    print(text, end="")
    if a.out and "no benchmark has been recorded yet" not in text:
        a.out.write_text(text)
    elif a.out:
        print(f"table: nothing recorded for run {a.run}; {a.out} left as it was")
    return text


if __name__ == "__main__":
    main()
