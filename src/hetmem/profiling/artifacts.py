"""The profile's human-facing artifacts: summary.md, overhead.png, roofline.png, trace.json.

All are rendered from ``profile.json`` (plus the trace events of the runs done in this process and
those kept in ``trace_events.json`` from earlier, resumed runs).
"""

from __future__ import annotations

import io
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
    return (f"calibration {when}, measured at {cal.get('measured_at')}, key {cal.get('key_id')} "
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
        f"matmul {cal.get('matmul_gflops')} GFLOP/s at {cal.get('dtype')}, ridge {cal.get('ridge_flop_per_byte')} flop/byte; "
        + calibration_line(cal),
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
        for ph in ("prefill", "decode"):
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
    phases = [ph for ph in ("prefill", "decode") if any(_phase_parts(idx, r["method"], r["length"], ph) for r in runs)]
    phases = phases or ["decode"]
    fig, axes = plt.subplots(1, len(phases), figsize=(max(6.0, 1.1 * max(len(runs), 1) * len(phases) + 2), 4.6), squeeze=False)
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
        ax.set_ylabel("ms per decode token (measured)" if per_tok else "prefill ms (measured)")
        ax.set_title(f"{ph}: time per step (label: memory-processing overhead)", fontsize=9)
        if parts_all:
            ax.set_ylim(0, max(bottoms) * 1.12)
    handles, leg = axes[0][0].get_legend_handles_labels()
    name = doc["model"] if doc["mode"] == "model" else f"{doc['shape']['name']} shape"
    note = "" if doc["mode"] == "model" else f", one layer of each kind timed, scaled to {doc['shape']['layers']}"
    fig.suptitle(f"hetmem profile: {name}, {doc['device']} {doc['dtype']}{note}", fontsize=10)
    fig.legend(handles, ["rest of inference" if h == "rest" else ("apply (attention)" if h == "attention" else h) for h in leg],
               loc="upper right", fontsize=7, ncol=1, bbox_to_anchor=(0.995, 0.9))
    fig.tight_layout(rect=(0, 0, 0.84, 0.95))
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def roofline_png(doc: dict, path: Path) -> None:
    plt = _plt()
    cal = doc.get("calibration") or {}
    bw, peak = cal.get("copy_gbps"), cal.get("matmul_gflops")
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    xs_all = []
    markers = {"prepare": "s", "relevancy": "o", "retrieval": "v", "apply": "D", "apply.gather": "X", "rest": "P"}
    colours = {**STEP_COLOURS, "apply": STEP_COLOURS["attention"]}
    floor = 1e-3
    methods = sorted({r["method"] for r in doc["records"]})
    fills = {m: ("full" if i == 0 else "none") for i, m in enumerate(methods)}
    seen = set()
    for r in doc["records"]:
        if r["status"] != "ok" or r["phase"] != "decode" or r["step"] == "total":
            continue
        ms, f, br, bw_ = r["ms"], r["flops"], r["bytes_read"], r["bytes_written"]
        if not ms or f is None or br is None:
            continue
        byt = br + bw_
        if byt <= 0:
            continue
        gfs = f / (ms / 1e3) / 1e9
        inten = f / byt
        if inten <= 0:  # pure data movement (gather): placed at the floor, height = achieved bandwidth x floor
            inten, gfs = floor, byt / (ms / 1e3) / 1e9 * floor
        xs_all.append(inten)
        key = (r["step"], r["method"])
        ax.scatter(inten, gfs, marker=markers[r["step"]], s=46, facecolors=colours[r["step"]] if fills[r["method"]] == "full" else "none",
                   edgecolors=colours[r["step"]], label=f"{r['step']} ({r['method']})" if key not in seen else None)
        seen.add(key)
        ax.annotate(_fmt_len(r["length"]), (inten, gfs), fontsize=6, xytext=(3, 2), textcoords="offset points")
    lo = min([floor] + xs_all) / 2
    hi = max([100.0] + xs_all) * 2
    if bw and peak:
        import numpy as np

        x = np.logspace(np.log10(lo), np.log10(hi), 200)
        ax.plot(x, np.minimum(peak, bw * x), "k-", lw=1.5,
                label=f"measured roof: {bw:.1f} GB/s copy, {peak:.0f} GFLOP/s matmul ({cal.get('dtype')})")
        ax.axvline(peak / bw, color="k", ls=":", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_xlabel("arithmetic intensity, flop/byte (analytic)")
    ax.set_ylabel("achieved GFLOP/s (analytic flops / measured time)")
    name = doc["model"] if doc["mode"] == "model" else f"{doc['shape']['name']} shape"
    ax.set_title(f"decode steps on this machine's measured roofline: {name}, {doc['device']}\n"
                 f"(gather moves data only: plotted at x={floor:g}, height = achieved GB/s x {floor:g}; filled = {methods[0] if methods else ''})",
                 fontsize=8)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
def trace_events(run_label: str, pid: int, events: list[tuple], t_base: float) -> list[dict]:
    """Chrome trace 'X' events (µs) for one run's step calls; one process per run, one thread per phase."""
    out = [{"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": run_label}}]
    tids = {"prefill": 1, "decode": 2}
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
