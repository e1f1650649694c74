"""Quest decode cost against its token budget, as ratios to dense attention measured in the same run.

Part 1 (kernel level, one decode step of one layer at a model's shape): time of Quest's Relevancy +
Retrieval + Apply (gather + attention) at several budgets, and of dense decode attention over the
whole context. Apply's cost must fall with the budget: it gathers only the selected pages.

Part 2 (end to end, a real model): decode time per token for dense and for quest at two budgets, with
exactly ``--new-tokens`` tokens generated (EOS is not an end: ``eos_token_ids=set()``).

Every figure is measured wall time on this machine. Against warm-up and drift: each part warms up
first (Part 2 with a short generation per method), then repeats; in every repeat the methods run in a
rotated order (each goes first as often as the others), and the quest/dense ratio is taken within the
repeat. The ratio is reported as min / median / max over the repeats. Usage:

    .venv/bin/python benchmarks/bench_quest_budget.py [--threads 1] [--length 32768] [--model smollm2]
        [--tokens 3000] [--new-tokens 24] [--repeats 3] [--skip-model] [--json]

``--json`` prints one JSON object on stdout (progress goes to stderr).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from hetmem.ops.page_minmax import page_minmax
from hetmem.ops.page_score import quest_upper_bound
from hetmem.ops.sparse_attention import gather_selected_kv, grouped_decode_attention
from hetmem.ops.topk import budget_page_indices


def spread(xs: list[float], nd: int = 4) -> dict:
    return {"min": round(min(xs), nd), "median": round(statistics.median(xs), nd), "max": round(max(xs), nd),
            "n": len(xs)}


def _ms(fn, inner: int) -> float:
    """Mean wall ms of ``inner`` back-to-back calls."""
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) * 1e3 / inner


def _inner_for(fn, target_ms: float = 5.0) -> int:
    """Calls per sample so that one sample lasts about ``target_ms`` (after one warm-up call)."""
    fn()
    one = max(_ms(fn, 1), 1e-3)
    return max(1, min(200, round(target_ms / one)))


def kernel_level(L: int, repeats: int, log, Hkv: int = 2, G: int = 7, D: int = 64, P: int = 16) -> dict:
    torch.manual_seed(0)
    k = torch.randn(1, Hkv, L, D)
    v = torch.randn(1, Hkv, L, D)
    q = torch.randn(1, Hkv, G, D)
    kmin, kmax = page_minmax(k, P)
    n = kmin.shape[2]
    scale = D**-0.5
    cmin, cmax = kmin[:, :, 1 : n - 1], kmax[:, :, 1 : n - 1]

    def dense():
        return grouped_decode_attention(q, k, v, scale)

    log(f"kernel level: one decode step of one layer, L={L}, H_kv={Hkv}, G={G}, D={D}, page={P} (measured; "
        f"{repeats} repeats, order alternating, ratio min/median/max)")
    log(f"  {'budget':>7} {'relevancy':>10} {'retrieval':>10} {'apply':>8} {'total':>8} {'dense':>8}   {'total/dense':>24}")
    rows = []
    for budget in sorted({b for b in (256, 1024, 4096, 16384) if b <= L // 2}):
        bp = budget // P
        scores = quest_upper_bound(q, cmin, cmax)
        idx = budget_page_indices(scores, 1, n, bp, 1, 1)

        def rel():
            return quest_upper_bound(q, cmin, cmax)

        def ret():
            return budget_page_indices(scores, 1, n, bp, 1, 1)

        def app():
            ks, vs = gather_selected_kv(k, v, idx, P, L)
            return grouped_decode_attention(q, ks, vs, scale)

        def quest():  # the three steps in sequence, as one decode step runs them
            i = budget_page_indices(quest_upper_bound(q, cmin, cmax), 1, n, bp, 1, 1)
            ks, vs = gather_selected_kv(k, v, i, P, L)
            return grouped_decode_attention(q, ks, vs, scale)

        inner = {f: _inner_for(f) for f in (rel, ret, app, quest, dense)}  # also the warm-up
        parts = {f: [] for f in inner}
        ratios = []
        for r in range(repeats):
            order = (rel, ret, app, quest, dense) if r % 2 == 0 else (dense, quest, app, ret, rel)
            t = {f: _ms(f, inner[f]) for f in order}
            for f in t:
                parts[f].append(t[f])
            ratios.append(t[quest] / t[dense])
        med = {f: statistics.median(ts) for f, ts in parts.items()}
        row = {"budget": budget, "relevancy_ms": med[rel], "retrieval_ms": med[ret], "apply_ms": med[app],
               "quest_step_ms": med[quest], "dense_ms": med[dense], "apply_over_dense": med[app] / med[dense],
               "quest_over_dense": spread(ratios)}
        rows.append({k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in row.items()})
        s = row["quest_over_dense"]
        log(f"  {budget:>7} {med[rel]:>10.3f} {med[ret]:>10.3f} {med[app]:>8.3f} {med[quest]:>8.3f} {med[dense]:>8.3f}"
            f"   {s['min']:.3f} / {s['median']:.3f} / {s['max']:.3f}")
    return {"length": L, "kv_heads": Hkv, "group": G, "head_dim": D, "page_size": P, "repeats": repeats,
            "budgets": rows}


def end_to_end(model_name: str, tokens: int, new_tokens: int, repeats: int, log) -> dict:
    from hetmem.tasks.haystack import passkey_task
    from hetmem.llm.generate import generate
    from hetmem.llm.models import load_model
    from hetmem.llm.prompt import build_prompt_ids
    from hetmem.methods import get_method

    lm = load_model(model_name)
    task = passkey_task(lm.tokenizer, tokens, seed=1)
    ids = build_prompt_ids(lm.tokenizer, task.context, task.question + " Then count from 1 to 20.")
    methods = [("dense", {}), ("quest", {"budget": 1024}), ("quest", {"budget": 256})]
    labels = [name + "".join(f" {k}={v}" for k, v in p.items()) for name, p in methods]

    def run(i: int, prompt: torch.Tensor, n_new: int):
        name, params = methods[i]
        res = generate(lm.model, prompt, get_method(name, **params), n_new, eos_token_ids=set(), progress=False)
        if len(res.token_ids) != n_new:
            raise RuntimeError(f"{labels[i]} generated {len(res.token_ids)} tokens, not the {n_new} forced")
        steps = res.timer.summary()
        dec = {s: steps[s]["phases"].get("decode", {}).get("ms", 0.0) for s in steps}
        # decode_ms covers n_new tokens: the first comes from the prefill's logits, then n_new - 1 forwards
        return res.decode_ms / (n_new - 1), dec

    log(f"\nend to end: {lm.name}, {ids.shape[1]}-token prompt, exactly {new_tokens} new tokens (EOS ignored); "
        f"measured, {repeats} repeats in rotated order after a warm-up")
    for i in range(len(methods)):  # warm-up: a short generation per method
        run(i, ids[:, -256:], 4)
    per_tok = {i: [] for i in range(len(methods))}
    steps = {i: [] for i in range(len(methods))}
    for r in range(repeats):
        order = [(r + j) % len(methods) for j in range(len(methods))]
        for i in order:
            ms, dec = run(i, ids, new_tokens)
            per_tok[i].append(ms)
            steps[i].append(dec)
            log(f"  repeat {r + 1}/{repeats}: {labels[i]:<18} {ms:8.2f} ms/token")
    rows = []
    for i, label in enumerate(labels):
        ratios = [a / b for a, b in zip(per_tok[i], per_tok[0])]  # within each repeat
        med_steps = {s: round(statistics.median(d.get(s, 0.0) for d in steps[i]), 3) for s in steps[i][0]}
        rows.append({"method": label, "decode_ms_per_token": spread(per_tok[i], 3),
                     "ratio_to_dense": spread(ratios), "decode_step_ms_median": med_steps})
    for row in rows:
        s, t = row["ratio_to_dense"], row["decode_ms_per_token"]
        log(f"  {row['method']:<18} decode {t['median']:8.2f} ms/token (min {t['min']:.2f}, max {t['max']:.2f})   "
            f"ratio to dense min/median/max {s['min']:.3f} / {s['median']:.3f} / {s['max']:.3f}")
    return {"model": lm.name, "prompt_tokens": int(ids.shape[1]), "new_tokens": new_tokens, "repeats": repeats,
            "methods": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--length", type=int, default=32768, help="kernel level: context length")
    ap.add_argument("--kernel-repeats", type=int, default=7)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=3000, help="end to end: context tokens of essay filler")
    ap.add_argument("--new-tokens", type=int, default=24, help="end to end: tokens generated, exactly")
    ap.add_argument("--repeats", type=int, default=3, help="end to end: repeats of every method")
    ap.add_argument("--skip-model", action="store_true")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    a = ap.parse_args(argv)
    for name in ("threads", "length", "kernel_repeats", "tokens", "repeats"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.new_tokens < 2:
        ap.error("--new-tokens must be at least 2 (the first token comes from the prefill)")
    if a.length < 1024:
        ap.error("--length must be at least 1024")
    torch.set_num_threads(a.threads)

    def log(msg):
        print(msg, file=sys.stderr if a.json else sys.stdout, flush=True)

    t0 = time.perf_counter()
    out = {
        "benchmark": "bench_quest_budget",
        "argv": sys.argv[1:] if argv is None else list(argv),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "time_source": "measured",
        "kernel": kernel_level(a.length, a.kernel_repeats, log),
    }
    if not a.skip_model:
        out["end_to_end"] = end_to_end(a.model, a.tokens, a.new_tokens, a.repeats, log)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    log(f"\ntotal wall time {out['wall_s']} s, {out['threads']} thread(s) (measured)")
    if a.json:
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
