"""``summary.md`` and the plots of an eval directory, from its ``results.jsonl`` alone (re-runnable any time).

    summary.md               accuracy per task x length x method x budget with 95% Wilson intervals, the
                             ratio to dense on the same samples (MOVER-R interval), recall, decode ms/token,
                             KV bytes; methods ranked by accuracy and by attention-mass recall; the prefill
                             sharing; skipped lines with their reasons
    accuracy_vs_budget.png   accuracy against the budget (share of the prompt), one line per method, per length
    niah_grid.png            needle depth x length heatmap per method (niah-grid lines; else every niah line,
                             depths binned)
    recall_vs_accuracy.png   mean attention-mass recall against accuracy, one point per method x budget x task x
                             length cell
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from hetmem.eval.stats import kendall_tau, ratio_interval, wilson
from hetmem.files import write_atomic

DENSE = "dense"


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _f(x, nd=2, dash="–"):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return dash
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.{nd}f}"


def _bytes(b):
    if b is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024


def _length_sort(lengths_tokens: dict) -> list:
    return sorted(lengths_tokens, key=lambda ll: lengths_tokens[ll])


def read_jsonl(path: Path) -> list[dict]:
    out = []
    if Path(path).exists():
        for text in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                obj = json.loads(text)
            except ValueError:
                continue
            if isinstance(obj, dict):
                out.append(obj)
    return out


class Results:
    def __init__(self, lines: list[dict]):
        self.lines = lines
        self.ok = [x for x in lines if x.get("status") == "ok"]
        self.skipped = [x for x in lines if x.get("status") != "ok"]
        self.len_tokens = {x["length"]: x.get("n_tokens", 0) for x in lines}
        self.tasks = list(dict.fromkeys(x["task"] for x in lines))
        self.arms = list(dict.fromkeys((x["method"], x["budget"]) for x in lines))

    @classmethod
    def load(cls, path: Path) -> "Results":
        return cls(read_jsonl(path))

    def dense_scores(self) -> dict:
        return {(x["task"], x["length"], x["sample"]): x["score"] for x in self.ok if x["method"] == DENSE}

    def cell(self, rows: list[dict], dense: dict) -> dict:
        n = len(rows)
        s = sum(x["score"] for x in rows)
        lo, hi = wilson(s, n)
        paired = [(x["score"], dense[(x["task"], x["length"], x["sample"])]) for x in rows
                  if (x["task"], x["length"], x["sample"]) in dense and x["method"] != DENSE]
        if paired:
            r, rlo, rhi = ratio_interval(sum(a for a, _ in paired), len(paired), sum(b for _, b in paired), len(paired))
        else:
            r = rlo = rhi = None
        return {
            "n": n, "acc": s / n if n else None, "lo": lo, "hi": hi, "n_paired": len(paired),
            "ratio": r, "rlo": rlo, "rhi": rhi,
            "recall": _mean([x.get("attention_mass_recall") for x in rows]),
            "ms_tok": _mean([x.get("decode_ms_per_token") for x in rows]),
            "kv": _mean([x.get("kv_bytes") for x in rows]),
            "budget_tokens": _mean([x.get("budget_tokens") for x in rows]),
            "prompt": _mean([x.get("prompt_tokens") for x in rows]),
            "prefill": "/".join(sorted({x.get("prefill", "?") for x in rows})),
        }

    def cells(self) -> dict:
        """(task, length, method, budget) -> cell statistics."""
        dense = self.dense_scores()
        groups = defaultdict(list)
        for x in self.ok:
            groups[(x["task"], x["length"], x["method"], x["budget"])].append(x)
        return {k: self.cell(v, dense) for k, v in groups.items()}

    def by_arm(self) -> dict:
        """(method, budget) -> cell statistics over every task and length."""
        dense = self.dense_scores()
        groups = defaultdict(list)
        for x in self.ok:
            groups[(x["method"], x["budget"])].append(x)
        return {k: self.cell(v, dense) for k, v in groups.items()}


def _arm_label(method: str, budget: str) -> str:
    return method if budget in ("-",) else f"{method} @ {budget}"


def summary_markdown(res: Results, runs: list[dict], plots: list[str]) -> str:
    out = ["# hetmem eval: accuracy by task, length, method and budget", ""]
    models = sorted({x.get("model") for x in res.lines if x.get("model")})
    out.append(f"Model: {', '.join(models) or '–'}. Lines: {len(res.lines)} ({len(res.ok)} answered, "
               f"{len(res.skipped)} skipped). Times are measured wall-clock on the machine of each run.")
    out.append("")
    if runs:
        out.append("| run | date | commit | CPU | threads | command |")
        out.append("|---|---|---|---|---|---|")
        for r in runs:
            commit = (r.get("commit") or "?")[:10] + ("+dirty" if r.get("dirty") else "")
            out.append(f"| {r.get('run_id', '?')} | {r.get('date', '?')} | {commit} | {r.get('cpu', '?')} "
                       f"({r.get('cpu_count', '?')} cores) | {r.get('threads', '?')} | `{r.get('command', '?')}` |")
        out.append("")
    out += [
        "Accuracy is the mean score (RULER's string_match_all: share of the reference answers found; "
        "niah-multikey scores 0 when a distractor's value is given). **95% CI**: Wilson score interval over the "
        "n samples. **vs dense**: accuracy / dense accuracy on the same samples, with a MOVER-R 95% interval "
        "(Donner & Zou 2012; conservative for paired samples). **recall**: attention-mass recall of the "
        "method's decode selections vs the oracle top-k at the same token count (sparse attention only). "
        "**ms/tok**: measured decode time per generated token. **KV**: bytes of K/V held at the end "
        "(measured; RAG: computed from its prompt). **prefill**: shared = one dense prefill per context, "
        "copied into the method's cache; own = the method prefilled again (see notes); rag = the context is "
        "the RAG corpus.",
        "",
        "| task | length | method | budget | tokens | n | accuracy | 95% CI | vs dense | 95% CI | recall | ms/tok | KV | prefill |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    cells = res.cells()
    lengths = _length_sort(res.len_tokens)
    for task in res.tasks:
        for ll in lengths:
            for m, b in res.arms:
                c = cells.get((task, ll, m, b))
                if not c:
                    continue
                out.append(
                    f"| {task} | {ll} | {m} | {b} | {_f(c['budget_tokens'], 0)} | {c['n']} | {_f(c['acc'])} | "
                    f"[{_f(c['lo'])}, {_f(c['hi'])}] | {_f(c['ratio'])} | "
                    f"{'[' + _f(c['rlo']) + ', ' + _f(c['rhi']) + ']' if c['ratio'] is not None else '–'} | "
                    f"{_f(c['recall'], 3)} | {_f(c['ms_tok'], 1)} | {_bytes(c['kv'])} | {c['prefill']} |")
    out.append("")

    arms = res.by_arm()
    out += ["## Each method over every task and length", "",
            "| method | budget | n | accuracy | 95% CI | vs dense | 95% CI | recall | ms/tok | KV |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for (m, b), c in arms.items():
        out.append(f"| {m} | {b} | {c['n']} | {_f(c['acc'])} | [{_f(c['lo'])}, {_f(c['hi'])}] | {_f(c['ratio'])} | "
                   f"{'[' + _f(c['rlo']) + ', ' + _f(c['rhi']) + ']' if c['ratio'] is not None else '–'} | "
                   f"{_f(c['recall'], 3)} | {_f(c['ms_tok'], 1)} | {_bytes(c['kv'])} |")
    out.append("")

    ranked = [(k, c) for k, c in arms.items() if c["recall"] is not None]
    out += ["## Does attention-mass recall rank the methods as accuracy does?", ""]
    if len(ranked) >= 2:
        acc = [c["acc"] for _, c in ranked]
        rec = [c["recall"] for _, c in ranked]
        tau = kendall_tau(rec, acc)
        out.append("Sparse-attention arms (method @ budget) ordered by recall, with their accuracy; Kendall's "
                   f"tau-b between the two orders: **{_f(tau)}** over {len(ranked)} arms (1 = the same order).")
        out.append("")
        out.append("| rank by recall | arm | recall | accuracy | rank by accuracy |")
        out.append("|---|---|---|---|---|")
        # competition ranks: tied values share a rank (1 + how many arms are strictly better)
        acc_rank = {k: 1 + sum(o["acc"] > c["acc"] for _, o in ranked) for k, c in ranked}
        rec_rank = {k: 1 + sum(o["recall"] > c["recall"] for _, o in ranked) for k, c in ranked}
        for k, c in sorted(ranked, key=lambda kc: -kc[1]["recall"]):
            out.append(f"| {rec_rank[k]} | {_arm_label(*k)} | {_f(c['recall'], 3)} | {_f(c['acc'])} | {acc_rank[k]} |")
        out.append("")
        # where they disagree: pairs whose recall order is the opposite of their accuracy order
        discordant = [f"{_arm_label(*a)} (recall {_f(ca['recall'], 3)}, accuracy {_f(ca['acc'])}) vs "
                      f"{_arm_label(*b)} ({_f(cb['recall'], 3)}, {_f(cb['acc'])})"
                      for a, ca in ranked for b, cb in ranked if ca["recall"] > cb["recall"] and ca["acc"] < cb["acc"]]
        if discordant:
            out.append("Pairs where higher recall came with lower accuracy: " + "; ".join(discordant) +
                       ". (With the wide intervals above, small differences are within noise.)")
        else:
            out.append("No pair of arms has higher recall with lower accuracy: the orders agree (up to ties).")
    else:
        out.append("Fewer than two sparse-attention arms with recall: nothing to rank.")
    out.append("")

    out += ["## One prefill per context", ""]
    shared = [x for x in res.ok if x.get("prefill") == "shared"]
    own = [x for x in res.ok if x.get("prefill") == "own"]
    contexts = {}
    for x in shared:
        contexts[(x["task"], x["length"], x["sample"], x.get("run_id"))] = x["prefill_ms"]
    if shared:
        spent = sum(contexts.values()) + sum(x.get("kv_load_ms") or 0 for x in shared)
        would = sum(x["prefill_ms"] for x in shared)
        out.append(f"{len(shared)} lines shared {len(contexts)} dense prefills (measured {spent / 1e3:.1f} s "
                   f"including copying the KV and each method's Prepare over it: "
                   f"{sum(x.get('kv_load_ms') or 0 for x in shared) / 1e3:.2f} s). One prefill per line would have "
                   f"taken about {would / 1e3:.1f} s (each shared prefill's measured time, once per line that used "
                   f"it: an estimate): a saving of {(would - spent) / 1e3:.1f} s.")
    else:
        out.append("No line used a shared prefill.")
    if own:
        why = defaultdict(int)
        for x in own:
            why[x.get("prefill_note") or "?"] += 1
        out.append("")
        out.append("Lines that prefilled on their own: " + "; ".join(f"{n} × {w}" for w, n in why.items()) +
                   f" ({sum(x['prefill_ms'] for x in own) / 1e3:.1f} s measured).")
    out.append("")

    if res.skipped:
        out += ["## Skipped lines", ""]
        why = defaultdict(list)
        for x in res.skipped:
            why[x.get("reason", "?")].append(f"{x['task']}/{x['length']}/{x['sample']}/{_arm_label(x['method'], x['budget'])}")
        for w, keys in why.items():
            out.append(f"- {len(keys)} × {w} (e.g. {keys[0]})")
        out.append("")
    if plots:
        out += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(out)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_budget(res: Results, path: Path) -> bool:
    if not res.ok:
        return False
    plt = _plt()
    lengths = _length_sort(res.len_tokens)
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 4), squeeze=False)
    for ax, ll in zip(axes[0], lengths):
        rows = [x for x in res.ok if x["length"] == ll]
        by = defaultdict(lambda: defaultdict(list))
        for x in rows:
            frac = x["budget_tokens"] / x["prompt_tokens"] if x.get("budget_tokens") else None
            by[x["method"]][frac].append(x["score"])
        for j, (m, pts) in enumerate(by.items()):
            flat = pts.pop(None, None)
            if flat is not None and not pts:  # no budget: a horizontal line
                ax.axhline(sum(flat) / len(flat), linestyle="--", linewidth=1, label=f"{m} (no budget)",
                           color="black" if m == DENSE else None)
                continue
            xs = sorted(pts)
            shift = 1 + 0.025 * (j - len(by) / 2)  # a small offset so equal lines do not hide each other
            ax.plot([x * shift for x in xs], [sum(pts[v]) / len(pts[v]) for v in xs], marker="osD^v<>p*h"[j % 10],
                    linestyle=("-", "--", "-.", ":")[j % 4], alpha=0.85, label=m)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("budget (share of the prompt, log scale; points offset slightly)")
        ax.set_ylabel("accuracy (mean over tasks and samples)")
        ax.set_title(f"{ll} tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Accuracy vs budget (measured)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_niah_grid(res: Results, path: Path) -> bool:
    rows = [x for x in res.ok if x["task"] == "niah-grid"]
    binned = False
    if not rows:
        rows = [x for x in res.ok if x["task"].startswith("niah") and x.get("depth") is not None]
        binned = True
    if not rows:
        return False
    plt = _plt()
    import numpy as np

    def depth_of(x):  # binned: the fifth of the haystack the needle is in (0..4)
        d = x["depth"]
        return min(4, int(d * 5)) if binned else round(d, 2)

    def depth_label(d):
        return f"{d * 20}-{d * 20 + 20}%" if binned else f"{d:.0%}"

    lengths = [ll for ll in _length_sort(res.len_tokens) if any(x["length"] == ll for x in rows)]
    depths = sorted({depth_of(x) for x in rows})
    arms = list(dict.fromkeys((x["method"], x["budget"]) for x in rows))
    cols = min(4, len(arms))
    nrow = -(-len(arms) // cols)
    fig, axes = plt.subplots(nrow, cols, figsize=(3.4 * cols + 1.2, 2.9 * nrow + 0.8), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[len(arms):]:
        ax.axis("off")
    im = None
    for ax, arm in zip(axes.flat, arms):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for di, d in enumerate(depths):
            for li, ll in enumerate(lengths):
                sc = [x["score"] for x in rows if (x["method"], x["budget"]) == arm and x["length"] == ll
                      and depth_of(x) == d]
                if sc:
                    grid[di, li] = sum(sc) / len(sc)
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), lengths)
        ax.set_yticks(range(len(depths)), [depth_label(d) for d in depths])
        if ax.get_subplotspec().is_last_row():
            ax.set_xlabel("length (tokens)")
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel("needle depth" + (" (binned)" if binned else ""))
        ax.set_title(_arm_label(*arm), fontsize=9)
        for di in range(len(depths)):
            for li in range(len(lengths)):
                if not np.isnan(grid[di, li]):
                    ax.text(li, di, f"{grid[di, li]:.2f}", ha="center", va="center", fontsize=7)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="accuracy")
    fig.suptitle("Needle depth x length (" + ("niah-grid" if not binned else "niah tasks") + ", measured)")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_recall_vs_accuracy(res: Results, path: Path) -> bool:
    cells = [(k, c) for k, c in res.cells().items() if c["recall"] is not None]
    if not cells:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    methods = list(dict.fromkeys(k[2] for k, _ in cells))
    for m in methods:
        pts = [(c["recall"], c["acc"]) for k, c in cells if k[2] == m]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=m, alpha=0.8)
    tau = kendall_tau([c["recall"] for _, c in cells], [c["acc"] for _, c in cells])
    ax.set_xlabel("attention-mass recall (mean over decode steps, layers, heads)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(f"Recall vs accuracy per task x length x budget cell (Kendall tau-b {_f(tau)})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(out: Path) -> dict:
    """Write summary.md and the plots into ``out`` from its results; returns what was written."""
    out = Path(out)
    res = Results.load(out / "results.jsonl")
    runs = read_jsonl(out / "runs.jsonl")
    plots = []
    for name, fn in (("accuracy_vs_budget.png", plot_accuracy_vs_budget), ("niah_grid.png", plot_niah_grid),
                     ("recall_vs_accuracy.png", plot_recall_vs_accuracy)):
        tmp = out / f".{name}.tmp.png"
        if fn(res, tmp):
            tmp.replace(out / name)  # atomic, like write_atomic
            plots.append(name)
    write_atomic(out / "summary.md", summary_markdown(res, runs, plots))
    return {"summary": str(out / "summary.md"), "plots": plots, "lines": len(res.lines)}
