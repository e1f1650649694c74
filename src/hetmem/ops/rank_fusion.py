"""Retrieval over passage scores: deterministic ranked top-k, and reciprocal-rank fusion of rankings."""

from __future__ import annotations

import numpy as np
import torch


def topk_ranked(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best passages, best first: (ids, scores). Ties go to the lower id, so results are stable.

    Selection finds the k-th best score with ``torch.topk`` (zero-copy on the numpy array), then two O(n)
    comparisons collect the winners; only the k winners are sorted. BM25 scores hold large classes of
    exactly equal values, on which numpy's introselect (``argpartition``) is ~10x slower than torch.topk.
    """
    n = scores.shape[0]
    k = max(0, min(k, n))
    if k == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=scores.dtype)
    if k < n:
        thr = scores.dtype.type(torch.topk(torch.from_numpy(np.ascontiguousarray(scores)), k, sorted=False).values.min().item())
        above = np.flatnonzero(scores > thr)
        ties = np.flatnonzero(scores == thr)[: k - above.size]
        cand = np.concatenate([above, ties])
    else:
        cand = np.arange(n)
    order = np.lexsort((cand, -scores[cand].astype(np.float64)))
    ids = cand[order]
    return ids.astype(np.int64), scores[ids]


def reciprocal_rank_fusion(rankings: list[np.ndarray], k: int, rrf_k: float = 60.0,
                           weights: list[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fuse ranked id lists (best first): score(d) = sum_r w_r / (rrf_k + rank_r(d)), rank from 1.

    Returns the top ``k`` fused (ids, scores), ties broken by the lower id.
    """
    weights = weights or [1.0] * len(rankings)
    fused: dict[int, float] = {}
    for w, ranking in zip(weights, rankings):
        for r, d in enumerate(ranking.tolist(), start=1):
            fused[d] = fused.get(d, 0.0) + w / (rrf_k + r)
    if not fused:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
    ids = np.fromiter(fused.keys(), dtype=np.int64)
    vals = np.fromiter(fused.values(), dtype=np.float64)
    order = np.lexsort((ids, -vals))[:k]
    return ids[order], vals[order]


def convex_fusion(rankings: list[tuple[np.ndarray, np.ndarray]], k: int,
                  weights: list[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fuse scored candidate lists by a convex combination of min-max normalised scores.

    Each list ``(ids, scores)`` is normalised to [0, 1] over its own candidates (a passage missing from a
    list gets 0 from it); fused(d) = sum_r w_r * norm_r(d). With a good lexical match (a rare name) BM25's
    normalised score stays near 1 where rank fusion would flatten it (Bruch et al., TOIS 2023).
    """
    weights = weights or [1.0 / len(rankings)] * len(rankings)
    fused: dict[int, float] = {}
    for w, (ids, scores) in zip(weights, rankings):
        if ids.size == 0:
            continue
        s = scores.astype(np.float64)
        lo, hi = float(s.min()), float(s.max())
        norm = (s - lo) / (hi - lo) if hi > lo else np.ones_like(s)
        for d, v in zip(ids.tolist(), norm.tolist()):
            fused[d] = fused.get(d, 0.0) + w * v
    if not fused:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
    out_ids = np.fromiter(fused.keys(), dtype=np.int64)
    vals = np.fromiter(fused.values(), dtype=np.float64)
    order = np.lexsort((out_ids, -vals))[:k]
    return out_ids[order], vals[order]
