"""hetmem's dense search (rag-dense's Relevancy + Retrieval) against a plain FAISS IndexFlatIP call, one run.

    ours       hetmem.ops.dense_search.build_index(vectors, "flat") + search(index, q, k)
               (what DenseRelevancy does after embedding the query), then TopKPassages cutting the list
    baseline   faiss.IndexFlatIP(d); index.add(vectors); index.search(q, k)

Both search the same L2-normalised 384-d vectors (all-MiniLM-L6-v2's size; random unit vectors, since
search cost does not depend on what the vectors mean) with the same queries, one query per call as RAG
issues them, and must return the same ids. ratio = baseline time / our time (>= 0.9 required: the
wrapper may cost at most ~10%). Also prints, for scale, one real MiniLM query embedding. Every time is
measured wall time on this machine (median over interleaved repeats).

    .venv/bin/python benchmarks/bench_dense_search.py [--passages 100000] [--queries 200] [--k 8]

Appends its record to benchmarks/results/bench_dense_search.jsonl (benchmarks/_record.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passages", type=int, default=50_000)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hnsw", action="store_true",
                    help="also time HNSW (on random vectors HNSW recall is a worst case, far below real embeddings)")
    ap.add_argument("--skip-embed", action="store_true", help="do not time a real MiniLM query embedding")
    args = ap.parse_args()
    from _record import Record

    rec = Record().setting(**vars(args))

    import faiss
    import torch

    from hetmem.core.types import Memory
    from hetmem.methods.rag_common import CandidateScores, TopKPassages
    from hetmem.ops.dense_search import build_index, search

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.passages, args.dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    print(f"{args.passages} passages x {args.dim}-d, {args.queries} queries one at a time, k={args.k}, "
          f"faiss {faiss.__version__} with {faiss.omp_get_max_threads()} threads")

    ours_index = build_index(x, "flat")
    plain = faiss.IndexFlatIP(args.dim)
    plain.add(x)
    memory = Memory(kind="dense", n_units=args.passages)
    retrieval = TopKPassages(args.k)

    def ours(qi):
        vals, ids = search(ours_index, qi, args.k)
        return retrieval.select(CandidateScores(torch.from_numpy(vals[0]), ids=ids[0].astype(np.int64)), memory).ids

    def baseline(qi):
        _, ids = plain.search(qi[None], args.k)
        return ids[0].tolist()

    rec.setting(faiss_version=faiss.__version__, faiss_threads=faiss.omp_get_max_threads())
    same = sum(ours(qi) == baseline(qi) for qi in q)
    rec.figure("same_ids", same, "queries")
    print(f"same top-{args.k} ids: {same}/{args.queries}")

    times = {"ours": [], "faiss.IndexFlatIP": []}
    fns = {"ours": ours, "faiss.IndexFlatIP": baseline}
    for f in fns.values():
        for qi in q[:10]:
            f(qi)
    for _ in range(args.repeats):
        for name, f in fns.items():
            t0 = time.perf_counter()
            for qi in q:
                f(qi)
            times[name].append((time.perf_counter() - t0) / args.queries)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    for name, ms in med.items():
        print(f"  {name:<20} {ms:8.3f} ms/query (measured)")
    ratio = med["faiss.IndexFlatIP"] / med["ours"]
    print(f"ratio (measured, same run): faiss.IndexFlatIP / ours = {ratio:.2f}  (>= 0.9 required)")

    for name, ms in med.items():
        rec.figure(f"query_ms.{name}", round(ms, 4), "ms/query")
    rec.figure("ratio", round(ratio, 3), "x", note="faiss.IndexFlatIP time / ours (>= 0.9 required)")
    if args.hnsw:
        _hnsw(args, x, q, baseline, rec)
    if not args.skip_embed:
        from hetmem.rag.embed import load_embedder

        emb = load_embedder()
        emb.encode(["warm up"])
        t0 = time.perf_counter()
        for _ in range(10):
            emb.encode(["In which town does Ranquin Tasolhal live?"])
        emb_ms = (time.perf_counter() - t0) / 10 * 1e3
        print(f"  for scale: embedding one query with all-MiniLM-L6-v2 {emb_ms:.1f} ms (measured)")
        rec.figure("embed_query_ms.all-MiniLM-L6-v2", round(emb_ms, 2), "ms/query")
    ok = same == args.queries and ratio >= 0.9
    rec.write(ok)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def _hnsw(args, x, q, baseline, rec):
    from hetmem.ops.dense_search import build_index, search

    t0 = time.perf_counter()
    hnsw = build_index(x, "hnsw")
    build_s = time.perf_counter() - t0
    print(f"  hnsw build {build_s:.1f} s (measured)")
    rec.figure("hnsw.build_s", round(build_s, 2), "s")
    hv = [search(hnsw, qi, args.k, ef_search=64)[1][0] for qi in q]
    recall = np.mean([len(set(h) & set(baseline(qi))) / args.k for h, qi in zip(hv, q)])
    t0 = time.perf_counter()
    for qi in q:
        search(hnsw, qi, args.k, ef_search=64)
    hms = (time.perf_counter() - t0) / args.queries * 1e3
    print(f"  hnsw (M=32, efSearch=64)  {hms:8.3f} ms/query (measured), recall@{args.k} vs exact {recall:.3f}")
    rec.figure("hnsw.query_ms", round(hms, 4), "ms/query").figure("hnsw.recall", round(float(recall), 4), "fraction")


if __name__ == "__main__":
    sys.exit(main())
