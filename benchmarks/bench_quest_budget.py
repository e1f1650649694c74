"""Quest decode cost against its token budget, as ratios to dense attention measured in the same run.

Part 1 (kernel level, one decode step of one layer at a model's shape): time of Quest's Relevancy +
Retrieval + Apply (gather + attention) at several budgets, and of dense decode attention over the
whole context. Apply's cost must fall with the budget: it gathers only the selected pages.

Part 2 (end to end, a real model): decode time per token for dense and for quest at two budgets.

All times are measured wall time on this machine (median of repeats). Usage:
    .venv/bin/python benchmarks/bench_quest_budget.py [--length 32768] [--model smollm2] [--skip-model]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hetmem.ops.page_minmax import page_minmax
from hetmem.ops.page_score import quest_upper_bound
from hetmem.ops.sparse_attention import gather_selected_kv, grouped_decode_attention
from hetmem.ops.topk import budget_page_indices


def _median_ms(fn, repeats=15):
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def kernel_level(L: int, Hkv: int = 2, G: int = 7, D: int = 64, P: int = 16):
    torch.manual_seed(0)
    k = torch.randn(1, Hkv, L, D)
    v = torch.randn(1, Hkv, L, D)
    q = torch.randn(1, Hkv, G, D)
    kmin, kmax = page_minmax(k, P)
    n = kmin.shape[2]
    scale = D**-0.5
    dense = _median_ms(lambda: grouped_decode_attention(q, k, v, scale))
    print(f"kernel level: one decode step of one layer, L={L}, H_kv={Hkv}, G={G}, D={D}, page={P} (measured)")
    print(f"  dense attention over {L} tokens: {dense:.3f} ms")
    print(f"  {'budget':>7} {'relevancy':>10} {'retrieval':>10} {'apply':>8} {'total':>8} {'apply/dense':>12} {'total/dense':>12}")
    for budget in (256, 1024, 4096, min(16384, L // 2)):
        bp = budget // P
        rel = _median_ms(lambda: quest_upper_bound(q, kmin[:, :, 1 : n - 1], kmax[:, :, 1 : n - 1]))
        scores = quest_upper_bound(q, kmin[:, :, 1 : n - 1], kmax[:, :, 1 : n - 1])
        ret = _median_ms(lambda: budget_page_indices(scores, 1, n, bp, 1, 1))
        idx = budget_page_indices(scores, 1, n, bp, 1, 1)

        def app():
            ks, vs = gather_selected_kv(k, v, idx, P, L)
            return grouped_decode_attention(q, ks, vs, scale)

        ap = _median_ms(app)
        tot = rel + ret + ap
        print(f"  {budget:>7} {rel:>10.3f} {ret:>10.3f} {ap:>8.3f} {tot:>8.3f} {ap / dense:>12.3f} {tot / dense:>12.3f}")


def end_to_end(model_name: str, tokens: int):
    from hetmem.tasks.haystack import passkey_task
    from hetmem.llm.models import load_model
    from hetmem.llm.run import answer_question
    from hetmem.methods import get_method

    lm = load_model(model_name)
    task = passkey_task(lm.tokenizer, tokens, seed=1)
    print(f"\nend to end: {lm.name}, {tokens}-token context, 24 new tokens forced (measured)")
    base = None
    for label, m in (
        ("dense", get_method("dense")),
        ("quest budget=1024", get_method("quest", budget=1024)),
        ("quest budget=256", get_method("quest", budget=256)),
    ):
        rec = answer_question(lm, m, task.context, task.question + " Then count from 1 to 20.", 24, progress=False)
        per_tok = rec["decode_ms"] / max(1, rec["tokens"]["generated"] - 1)
        attn = rec["steps"]["apply"]["phases"].get("decode", {}).get("ms", 0.0)
        mem = sum(rec["steps"][s]["phases"].get("decode", {}).get("ms", 0.0) for s in ("prepare", "relevancy", "retrieval"))
        base = base or per_tok
        print(f"  {label:<18} decode {per_tok:7.2f} ms/token  ratio to dense {per_tok / base:5.3f}   "
              f"decode apply {attn:8.1f} ms   prepare+relevancy+retrieval {mem:7.1f} ms")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=4000)
    ap.add_argument("--skip-model", action="store_true")
    a = ap.parse_args()
    kernel_level(a.length)
    if not a.skip_model:
        end_to_end(a.model, a.tokens)
