"""Dense retrieval: a FAISS index over L2-normalised passage embeddings (inner product = cosine).

``flat`` is exact search (``faiss.IndexFlatIP``); ``hnsw`` is an approximate graph index
(``faiss.IndexHNSWFlat`` with the inner-product metric) for large corpora. Relevancy and Retrieval are
fused here: FAISS scores and selects the top-k in one call and never materialises all scores.
"""

from __future__ import annotations

import numpy as np

INDEX_TYPES = ("flat", "hnsw")


def build_index(vectors: np.ndarray, kind: str = "flat", hnsw_m: int = 32, ef_construction: int = 80):
    """Prepare: add float32 [n, dim] vectors to a new FAISS index of the given kind."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = vectors.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
    else:
        raise ValueError(f"unknown index type {kind!r}: use one of {INDEX_TYPES}")
    index.add(vectors)
    return index


RESCORE_MARGIN = 8  # extra candidates a flat search fetches, so float32 noise cannot swap the k-th and (k+1)-th


def search(index, queries: np.ndarray, k: int, ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Relevancy + Retrieval: (scores [q, k], ids [q, k]) best first; ids < 0 pad when k > n.

    A flat index's scores are made exact: FAISS's float32 inner products depend on how many vectors one BLAS
    call covers (so the same passage can score differently in a shard and in the whole memory), so the top
    ``k + RESCORE_MARGIN`` candidates are scored again in float64 (products of float32 values are exact there)
    by a per-row sum that does not depend on the batch, then ranked by (score, lower id first on equal scores).
    A sharded memory's merged top-k is then the unsharded one."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None]
    k = max(1, min(k, index.ntotal))
    if ef_search is not None and hasattr(index, "hnsw"):
        index.hnsw.efSearch = max(ef_search, k)
    if hasattr(index, "hnsw"):  # approximate anyway: FAISS's own scores
        return index.search(q, k)
    vals, ids = index.search(q, min(k + RESCORE_MARGIN, index.ntotal))
    out_v = np.full((q.shape[0], k), -np.inf, dtype=np.float32)
    out_i = np.full((q.shape[0], k), -1, dtype=np.int64)
    for r in range(q.shape[0]):
        cand = ids[r][ids[r] >= 0].astype(np.int64)
        if not len(cand):
            continue
        vecs = np.stack([index.reconstruct(int(i)) for i in cand]).astype(np.float64)  # (one id at a time)
        exact = (vecs * q[r].astype(np.float64)[None, :]).sum(axis=1).astype(np.float32)
        order = np.lexsort((cand, -exact.astype(np.float64)))[:k]
        out_v[r, : len(order)], out_i[r, : len(order)] = exact[order], cand[order]
    return out_v, out_i
