"""RAG kernels against plain reference implementations."""

import math
import random

import numpy as np
import pytest

from hetmem.ops.bm25 import bm25_scores, bm25_scores_batch, build_bm25, reweight, tokenize
from hetmem.ops.dense_search import build_index, search
from hetmem.ops.rank_fusion import convex_fusion, reciprocal_rank_fusion, topk_ranked

WORDS = "apple banana cherry delta echo fox golf hotel india juliet kilo lima mike november oscar papa".split()


def _docs(n=60, seed=0):
    rng = random.Random(seed)
    return [[rng.choice(WORDS) for _ in range(rng.randint(0, 25))] for _ in range(n)]


def _reference_bm25(docs, query, k1, b):
    """Lucene BM25, term by term, passage by passage."""
    N = len(docs)
    avgdl = sum(map(len, docs)) / N
    out = []
    for d in docs:
        s = 0.0
        for t in query:
            df = sum(1 for x in docs if t in x)
            if df == 0:
                continue
            idf = math.log(1 + (N - df + 0.5) / (df + 0.5))
            tf = d.count(t)
            if tf == 0:
                continue
            s += idf * tf / (tf + k1 * (1 - b + b * len(d) / avgdl))
        out.append(s)
    return np.array(out)


@pytest.mark.parametrize("k1,b", [(1.2, 0.75), (1.2, 0.0), (2.0, 1.0), (0.5, 0.3)])
def test_bm25_matches_reference(k1, b):
    docs = _docs()
    stats = build_bm25(docs, k1, b)
    for query in (["apple"], ["apple", "kilo", "zulu"], ["echo", "echo", "mike"], [], ["zulu"]):
        got = bm25_scores(stats, stats.term_ids(query))
        np.testing.assert_allclose(got, _reference_bm25(docs, query, k1, b), rtol=1e-5, atol=1e-6)


def test_bm25_is_sparse_and_reweights():
    docs = _docs()
    stats = build_bm25(docs, 1.2, 0.75)
    nnz = sum(len(set(d)) for d in docs)
    assert stats.weights.nnz == nnz  # one stored weight per (term, passage) that occurs, nothing else
    other = reweight(stats, 1.2, 0.0)
    q = stats.term_ids(["golf", "hotel"])
    np.testing.assert_allclose(bm25_scores(other, q), _reference_bm25(docs, ["golf", "hotel"], 1.2, 0.0), rtol=1e-5)


def test_bm25_batch_equals_single():
    stats = build_bm25(_docs(), 1.2, 0.75)
    queries = [stats.term_ids(q) for q in (["apple", "fox"], ["oscar"], ["papa", "papa", "lima"])]
    batch = bm25_scores_batch(stats, queries)
    for row, q in zip(batch, queries):
        np.testing.assert_allclose(row, bm25_scores(stats, q), rtol=1e-5, atol=1e-6)


def test_tokenize_lowercases_and_drops_stopwords():
    assert tokenize("The Clockmaker of Vellmoor, born in 1774!") == ["clockmaker", "vellmoor", "born", "1774"]


def test_topk_ranked_matches_sort_with_ties():
    rng = np.random.default_rng(0)
    for n, k in [(50, 5), (10, 10), (10, 20), (1000, 64), (7, 1)]:
        scores = rng.integers(0, 6, n).astype(np.float32)  # many ties
        ids, vals = topk_ranked(scores, k)
        ref = sorted(range(n), key=lambda i: (-scores[i], i))[:k]
        assert ids.tolist() == ref
        np.testing.assert_array_equal(vals, scores[ref])


def test_rrf_matches_reference():
    a, b = np.array([3, 1, 2]), np.array([2, 5, 3])
    ids, vals = reciprocal_rank_fusion([a, b], 10, rrf_k=60)
    ref = {3: 1 / 61 + 1 / 63, 1: 1 / 62, 2: 1 / 63 + 1 / 61, 5: 1 / 62}
    order = sorted(ref, key=lambda d: (-ref[d], d))
    assert ids.tolist() == order
    np.testing.assert_allclose(vals, [ref[d] for d in order])


def test_convex_fusion_keeps_a_decisive_match():
    bm = (np.array([7, 1, 2]), np.array([9.0, 1.0, 0.9]))  # BM25: passage 7 by a wide margin
    de = (np.array([1, 2, 7, 4]), np.array([0.60, 0.59, 0.55, 0.49]))
    ids, vals = convex_fusion([bm, de], 3, [0.5, 0.5])
    assert ids[0] == 7
    assert reciprocal_rank_fusion([bm[0], de[0]], 3)[0][0] == 1  # rank fusion loses the margin
    # reference: min-max normalise each list, missing = 0, weighted sum
    nb = {7: 1.0, 1: (1.0 - 0.9) / 8.1, 2: 0.0}
    nd = {1: 1.0, 2: (0.59 - 0.49) / 0.11, 7: (0.55 - 0.49) / 0.11, 4: 0.0}
    ref = {d: 0.5 * nb.get(d, 0) + 0.5 * nd.get(d, 0) for d in set(nb) | set(nd)}
    np.testing.assert_allclose(vals, sorted(ref.values(), reverse=True)[:3])


def test_dense_search_flat_is_exact_and_hnsw_close():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = rng.standard_normal((8, 32)).astype(np.float32)
    ref = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :10]
    vals, ids = search(build_index(x, "flat"), q, 10)
    assert (ids == ref).mean() > 0.99  # exact up to float rounding ties
    np.testing.assert_allclose(vals, np.take_along_axis(q @ x.T, ids, 1), rtol=1e-5)
    _, hids = search(build_index(x, "hnsw"), q, 10, ef_search=128)
    recall = np.mean([len(set(h) & set(r)) / 10 for h, r in zip(hids, ref)])
    assert recall >= 0.9
