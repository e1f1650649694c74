"""The profile's human-facing artifacts: summary.md, overhead.png, roofline.png, trace.json.

All are rendered from ``profile.json`` (plus the trace events of the runs done in this process and
those kept in ``trace_events.json`` from earlier, resumed runs).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from hetmem.files import write_atomic, write_json_atomic

STEP_COLOURS = {
    "prepare": "#4c72b0",
    "relevancy": "#dd8452",
    "retrieval": "#c44e52",
    "apply.gather": "#8172b3",
    "attention": "#55a868",
    "rest": "#b8b8b8",
}
PLOT_STEPS = ("prepare", "relevancy", "retrieval", "apply.gather", "attention", "rest")
# "context": the contextual-memory methods' whole run (profiling/contextual.py)
PHASES = ("prefill", "decode", "context")


def _fmt_len(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 and n >= 1024 else str(n)


def _idx(doc: dict) -> dict:
    out = {}
    for r in doc["records"]:
        out[(r["method"], r["length"], r["phase"], r["step"])] = r
    return out


def _phase_parts(idx: dict, method: str, length: int, phase: str) -> dict[str, float] | None:
    """ms per PLOT_STEPS for one run and phase (apply split into gather + the rest of apply, 'attention')."""
    tot = idx.get((method, length, phase, "total"))
    if tot is None or tot["status"] != "ok" or tot["ms"] is None:
        return None
    ms = {s: (idx.get((method, length, phase, s)) or {}).get("ms") or 0.0
          for s in ("prepare", "relevancy", "retrieval", "apply", "apply.gather", "rest")}
    return {"prepare": ms["prepare"], "relevancy": ms["relevancy"], "retrieval": ms["retrieval"],
            "apply.gather": ms["apply.gather"], "attention": max(0.0, ms["apply"] - ms["apply.gather"]),
            "rest": ms["rest"]}


def calibration_line(cal: dict) -> str:
    """When the calibration was measured, whether this run reused it, and the key it was cached under."""
    k = cal.get("key") or {}
    when = "measured for this run" if cal.get("cached") is False else "reused from the cache"
    return (f"calibration {when} (measured at {cal.get('measured_at')}), key {cal.get('key_id')} "
            f"(cpu {k.get('cpu')}, {k.get('cores_available')} cores available, torch {k.get('torch')}, "
            f"{k.get('threads')} threads, {k.get('device')} {k.get('dtype')})")


# ------------------------------------------------------------------------------------------------
def summary_md(doc: dict) -> str:
    idx = _idx(doc)
    cal = doc.get("calibration") or {}
    what = f"model `{doc['model']}`" if doc["mode"] == "model" else f"shape `{doc['shape']['name']}` (model-shaped kernel sweep)"
    lines = [
        f"# hetmem profile: {what}",
        "",
        f"- device `{doc['device']}`, dtype `{doc['dtype']}`, machine `{doc['machine'].get('cpu')}` "
        f"({doc['machine'].get('cpu_count')} cores, torch {doc['machine'].get('torch')})",
        f"- calibration (measured on this machine): copy bandwidth {cal.get('copy_gbps')} GB/s, "
        f"matmul {cal.get('matmul_gflops')} GFLOP/s at {cal.get('dtype')}, ridge {cal.get('ridge_flop_per_byte')} flop/byte",
        f"- {calibration_line(cal)}",
        "- all times **measured** on this machine; flops and bytes **analytic** (from shapes and dtypes)",
    ]
    if doc["mode"] == "sweep":
        s = doc["shape"]
        run0 = next((r for r in doc["runs"] if r["status"] == "ok"), None)
        timed = ", ".join(f"layer {t['layer']} x{t['scaled_to']}" for t in (run0 or {}).get("phases", {}).get("layers_timed", []))
        lines.append(f"- sweep mode: per token one decoder layer of each kind is timed and scaled to the {s['layers']} layers "
                     f"({run0['method'] + ': ' + timed if run0 else ''}); LM head timed on a vocabulary slice and scaled; "
                     "synthetic KV; prefill runs only Prepare")
    lines += [
        "- overhead = (prepare + relevancy + retrieval + apply.gather) / end-to-end; "
        "incl. apply = (prepare + relevancy + retrieval + apply) / end-to-end",
        "- phase `context` (contextual-memory methods): the whole run over the context; memory processing is "
        "prepare + relevancy + retrieval (memagent: chunk reads and memory writes; the final answer, apply, is "
        "inference)",
        "",
        "## Runs",
        "",
        "| method | length | status | phase | end-to-end ms | ms/token | overhead | overhead incl. apply |",
        "|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for run in sorted(doc["runs"], key=lambda r: (r["method"], r["length"])):
        if run["status"] != "ok":
            lines.append(f"| {run['method']} | {_fmt_len(run['length'])} | skipped: {run['reason']} | | | | | |")
            continue
        for ph in PHASES:
            p = run["phases"].get(ph) or {}
            if p.get("total_ms") is None:
                continue
            pct = lambda v: "" if v is None else f"{100 * v:.1f}%"  # noqa: E731
            lines.append(f"| {run['method']} | {_fmt_len(run['length'])} | ok | {ph} | {p['total_ms']:.1f} | "
                         f"{p.get('ms_per_token', '') or ''} | {pct(p.get('overhead'))} | {pct(p.get('overhead_incl_apply'))} |")
    notes = [f"- {r['method']} @ {_fmt_len(r['length'])}: {r['note']}"
             for r in sorted(doc["runs"], key=lambda r: (r["method"], r["length"])) if r.get("note")]
    if notes:
        lines += ["", "Shortened contexts (a length names the context; the tokens generated after it must fit the window):", ""]
        lines += notes
    lines += ["", "## Steps", "",
              "| method | length | phase | step | ms | calls | GFLOP | MB read | MB written | flop/byte | achieved GFLOP/s | achieved GB/s |",
              "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    order = {s: i for i, s in enumerate(("prepare", "relevancy", "retrieval", "apply", "apply.gather", "rest", "total"))}
    for r in sorted(doc["records"], key=lambda r: (r["method"], r["length"], r["phase"], order.get(r["step"], 9))):
        if r["status"] != "ok":
            continue
        ms = r["ms"] or 0.0
        f, br, bw = r["flops"], r["bytes_read"], r["bytes_written"]
        num = lambda v, d=1e9, p=3: "" if v is None else f"{v / d:.{p}f}"  # noqa: E731
        ach_f = num(f / (ms / 1e3), 1e9, 2) if f is not None and ms > 0 else ""
        ach_b = num((br + bw) / (ms / 1e3), 1e9, 2) if br is not None and ms > 0 else ""
        inten = "" if r["intensity"] is None else f"{r['intensity']:.3g}"
        lines.append(f"| {r['method']} | {_fmt_len(r['length'])} | {r['phase']} | {r['step']} | {ms:.3f} | {r['calls']} | "
                     f"{num(f)} | {num(br, 1e6, 1)} | {num(bw, 1e6, 1)} | {inten} | {ach_f} | {ach_b} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def overhead_png(doc: dict, path: Path) -> None:
    plt = _plt()
    idx = _idx(doc)
    runs = sorted((r for r in doc["runs"] if r["status"] == "ok"), key=lambda r: (r["length"], r["method"]))
    phases = [ph for ph in PHASES if any(_phase_parts(idx, r["method"], r["length"], ph) for r in runs)]
    phases = phases or ["decode"]
    fig, axes = plt.subplots(1, len(phases), figsize=(max(8.5, 1.1 * max(len(runs), 1) * len(phases) + 3), 4.8), squeeze=False)
    for ax, ph in zip(axes[0], phases):
        labels, bottoms = [], []
        parts_all = [(r, _phase_parts(idx, r["method"], r["length"], ph)) for r in runs]
        parts_all = [(r, p) for r, p in parts_all if p]
        per_tok = ph == "decode"
        for i, (r, parts) in enumerate(parts_all):
            div = (r["phases"][ph]["tokens"] or 1) if per_tok else 1
            bottom = 0.0
            for s in PLOT_STEPS:
                v = parts[s] / div
                ax.bar(i, v, bottom=bottom, color=STEP_COLOURS[s], label=s if i == 0 else None, width=0.7)
                bottom += v
            ov = r["phases"][ph].get("overhead")
            if ov is not None:
                ax.text(i, bottom, f"{100 * ov:.0f}%", ha="center", va="bottom", fontsize=8)
            labels.append(f"{r['method']}\n{_fmt_len(r['length'])}")
            bottoms.append(bottom)
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_ylabel("ms per decode token (measured)" if per_tok else f"{ph} ms (measured)")
        ax.set_title(f"{ph}: time per step (bar label: memory-processing overhead)", fontsize=9)
        if parts_all:
            ax.set_ylim(0, max(bottoms) * 1.12)
    handles, leg = axes[0][0].get_legend_handles_labels()
    name = doc["model"] if doc["mode"] == "model" else f"{doc['shape']['name']} shape"
    note = "" if doc["mode"] == "model" else f", one layer of each kind timed, scaled to {doc['shape']['layers']}"
    fig.suptitle(f"hetmem profile: {name}, {doc['device']} {doc['dtype']}{note}", fontsize=10)
    fig.legend(handles, ["rest of inference" if h == "rest" else ("apply (attention)" if h == "attention" else h) for h in leg],
               loc="center left", fontsize=8, ncol=1, bbox_to_anchor=(1 - 1.7 / fig.get_figwidth(), 0.5), frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 1.8 / fig.get_figwidth(), 0.94))  # 1.8 inches on the right for the legend
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


STEP_MARKERS = {"prepare": "s", "relevancy": "o", "retrieval": "v", "apply": "D", "rest": "P"}
METHOD_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
                  "#bcbd22")
ROOF_COLOURS = ("#444444", "#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00")


def _num(v: float) -> str:
    return f"{v:,.0f}" if v >= 1000 else f"{v:.3g}"


def roofs(doc: dict) -> list[dict]:
    """The roofs drawn on roofline.png: the profile device's measured calibration first, then the
    datasheet figures of any ``--roofline-devices`` (``doc["roofline_devices"]``), each with its ridge."""
    out = []
    cal = doc.get("calibration") or {}
    if cal.get("copy_gbps") and cal.get("matmul_gflops"):
        out.append({"name": cal.get("device") or doc.get("device"), "bw": float(cal["copy_gbps"]),
                    "peak": float(cal["matmul_gflops"]), "dtype": cal.get("dtype"), "source": "measured",
                    "what": "copy, matmul"})
    for d in doc.get("roofline_devices") or []:
        out.append({"name": d["name"], "bw": float(d["mem_bw_gbs"]), "peak": float(d["peak_gflops"]),
                    "dtype": d.get("dtype"), "source": "datasheet", "what": "memory, peak"})
    return out


def _decode_points(doc: dict) -> tuple[dict, dict]:
    """(method, step) -> [(length, intensity, GFLOP/s)] for decode records with flops > 0, and
    method -> [achieved GB/s] of the zero-flop steps (pure data movement: off the roofline)."""
    series: dict[tuple[str, str], list] = {}
    moves: dict[tuple[str, str], list] = {}
    for r in doc["records"]:
        if r["status"] != "ok" or r["phase"] not in ("decode", "context") or r["step"] == "total":
            continue
        ms, f, br, bw = r["ms"], r["flops"], r["bytes_read"], r["bytes_written"]
        if not ms or f is None or br is None or br + bw <= 0:
            continue
        if f <= 0:
            moves.setdefault((r["method"], r["step"]), []).append((br + bw) / (ms / 1e3) / 1e9)
            continue
        series.setdefault((r["method"], r["step"]), []).append((r["length"], f / (br + bw), f / (ms / 1e3) / 1e9))
    return series, moves


def roofline_png(doc: dict, path) -> None:
    """Each decode step at (analytic intensity, analytic flops / measured time), one series per (method, step):
    colour = method, marker = step, marker size = context length (series joined across lengths). Every
    device gets its own roof and ridge line; the legend sits outside the axes."""
    import numpy as np
    from matplotlib.lines import Line2D

    plt = _plt()
    series, moves = _decode_points(doc)
    methods = sorted({m for m, _ in series} | {m for m, _ in moves})
    colour = {m: METHOD_COLOURS[i % len(METHOD_COLOURS)] for i, m in enumerate(methods)}
    steps = [s for s in STEP_MARKERS if any(st == s for _, st in series)]
    lengths = sorted({L for pts in series.values() for L, *_ in pts})
    lo_l, hi_l = (math.log2(lengths[0]), math.log2(lengths[-1])) if lengths else (0.0, 0.0)

    def size(L: int) -> float:
        return 60.0 if hi_l == lo_l else 20.0 + 90.0 * (math.log2(L) - lo_l) / (hi_l - lo_l)

    fig = plt.figure(figsize=(9.6, 6.0))
    ax = fig.add_axes((0.085, 0.175, 0.6, 0.745))
    xs, ys = [], []
    for (m, st), pts in sorted(series.items(), key=lambda kv: (kv[0][0], list(STEP_MARKERS).index(kv[0][1]) if kv[0][1] in STEP_MARKERS else 9)):
        pts.sort()
        x = [p[1] for p in pts]
        y = [p[2] for p in pts]
        xs += x
        ys += y
        if len(pts) > 1:
            ax.plot(x, y, "-", color=colour[m], lw=0.8, alpha=0.45, zorder=2)
        ax.scatter(x, y, s=[size(p[0]) for p in pts], marker=STEP_MARKERS.get(st, "X"), facecolors=colour[m],
                   edgecolors="white", linewidths=0.6, alpha=0.9, zorder=3)
    rs = roofs(doc)
    x_lo = min(xs + [r["peak"] / r["bw"] for r in rs] or [0.1]) / 4
    x_hi = max(xs + [r["peak"] / r["bw"] for r in rs] or [10.0]) * 6
    y_lo = min(ys or [0.01]) / 4
    y_hi = max([r["peak"] for r in rs] + ys or [1.0]) * 3
    xx = np.logspace(math.log10(x_lo), math.log10(x_hi), 300)
    roof_handles = []
    for i, r in enumerate(rs):
        c = ROOF_COLOURS[i % len(ROOF_COLOURS)]
        ls = "-" if r["source"] == "measured" else "--"
        ridge = r["peak"] / r["bw"]
        ax.plot(xx, np.minimum(r["peak"], r["bw"] * xx), ls, color=c, lw=1.6, zorder=1)
        ax.axvline(ridge, color=c, ls=":", lw=1.0, zorder=1)
        ax.annotate(f"{r['name']} ridge\n{ridge:.3g} flop/B", (ridge, r["peak"]), xytext=(4, -4),
                    textcoords="offset points", fontsize=7, color=c, va="top")
        roof_handles.append(Line2D([], [], color=c, ls=ls, lw=1.6,
                                   label=f"{r['name']} ({r['source']}): {_num(r['bw'])} GB/s {r['what'].split(', ')[0]},\n"
                                         f"{_num(r['peak'])} GFLOP/s {r['what'].split(', ')[1]} {r['dtype'] or ''}".rstrip()))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(y_lo, y_hi)
    ax.set_xlabel("arithmetic intensity [flop/byte]  (analytic flops / analytic bytes read + written)")
    ax.set_ylabel("performance [GFLOP/s]  (analytic flops / measured time)")
    ax.grid(True, which="major", alpha=0.3)
    ax.grid(True, which="minor", alpha=0.08)
    name = doc["model"] if doc["mode"] == "model" else f"{doc['shape']['name']} shape"
    note = "" if doc["mode"] == "model" else f", one layer of each kind timed, scaled to {doc['shape']['layers']}"
    ax.set_title(f"decode steps measured on {doc['device']} ({doc['dtype']}), {name}{note}", fontsize=9)

    def header(text):
        return Line2D([], [], ls="none", label=text)

    handles = [header("roof (ridge: dotted)")] + roof_handles
    handles += [header("method (colour)")] + [Line2D([], [], ls="none", marker="o", color=colour[m], markersize=7, label=m)
                                             for m in methods]
    handles += [header("step (marker)")] + [Line2D([], [], ls="none", marker=STEP_MARKERS[s], color="#555555",
                                                   markersize=7, label="rest of the layer" if s == "rest" else s)
                                            for s in steps]
    if lengths:
        shown = lengths if len(lengths) <= 4 else [lengths[0], lengths[len(lengths) // 2], lengths[-1]]
        handles += [header("context length (size)")] + [
            Line2D([], [], ls="none", marker="o", color="#999999", markersize=math.sqrt(size(L)), label=_fmt_len(L))
            for L in shown]
    leg = fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.7, 0.92), fontsize=7.5, frameon=False,
                     handlelength=2.2, borderaxespad=0.0)
    for h, t in zip(handles, leg.get_texts()):
        if h.get_marker() in (None, "None", "none", "") and h.get_linestyle() in ("None", "none", ""):
            t.set_fontweight("bold")
    foot = ["One point per decode step, method and context length (contextual-memory methods: per step of the whole "
            "run, phase 'context'); times measured, flops and bytes analytic."]
    for st in sorted({st for _, st in moves}):
        per = ", ".join(f"{m} {min(g):.2g}-{max(g):.2g}" if len(g) > 1 else f"{m} {g[0]:.2g}"
                        for (m, s_), g in sorted(moves.items()) if s_ == st)
        foot.append(f"Not plotted, 0 flops (data movement only): {st}, achieved GB/s (measured): {per}.")
    if rs and moves:
        foot[-1] += f" Copy roof: {rs[0]['bw']:.3g} GB/s."
    fig.text(0.085, 0.015, "\n".join(foot[:6]), fontsize=7, va="bottom", ha="left", color="#333333")
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
def trace_events(run_label: str, pid: int, events: list[tuple], t_base: float) -> list[dict]:
    """Chrome trace 'X' events (µs) for one run's step calls; one process per run, one thread per phase."""
    out = [{"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": run_label}}]
    tids = {"prefill": 1, "decode": 2, "memory": 3, "answer": 4, "context": 5}
    for ph, tid in tids.items():
        out.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": ph}})
    for name, phase, t0, t1, device in events:
        out.append({"name": name, "cat": phase, "ph": "X", "pid": pid, "tid": tids.get(phase, 3),
                    "ts": round((t0 - t_base) * 1e6, 3), "dur": round((t1 - t0) * 1e6, 3), "args": {"device": device}})
    return out


def write_all(doc: dict, out_dir: Path, trace: list[dict]) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [write_atomic(out_dir / "summary.md", summary_md(doc))]
    for name, fn in (("overhead.png", overhead_png), ("roofline.png", roofline_png)):
        buf = io.BytesIO()
        fn(doc, buf)
        paths.append(write_atomic(out_dir / name, buf.getvalue()))
    paths.append(write_json_atomic(out_dir / "trace.json", {
        "traceEvents": trace, "displayTimeUnit": "ms", "otherData": {"source": "hetmem profile", "times": "measured"}},
        indent=None))
    return paths
