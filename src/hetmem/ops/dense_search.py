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


def search(index, queries: np.ndarray, k: int, ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Relevancy + Retrieval: (scores [q, k], ids [q, k]) best first; ids < 0 pad when k > n."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None]
    k = max(1, min(k, index.ntotal))
    if ef_search is not None and hasattr(index, "hnsw"):
        index.hnsw.efSearch = max(ef_search, k)
    return index.search(q, k)
