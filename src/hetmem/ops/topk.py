"""Retrieval ops: top-k (token budget) and threshold bitmaps over unit scores."""

from __future__ import annotations

import torch


def topk_indices(scores: torch.Tensor, k: int, sort: bool = True) -> torch.Tensor:
    """Indices of the ``k`` largest scores along the last dim, ascending by index when ``sort``."""
    k = max(0, min(k, scores.shape[-1]))
    idx = torch.topk(scores, k, dim=-1, sorted=False).indices
    return idx.sort(dim=-1).values if sort else idx


def threshold_bitmap(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """One bool per unit: score >= threshold."""
    return scores >= threshold


def candidate_range(n_pages: int, sink_pages: int, recent_pages: int, budget_pages: int,
                    first: int = 0) -> tuple[int, int]:
    """The pages ``[lo, hi)`` that Relevancy scores: those between the sink and the recent window.

    Pages before ``first`` do not exist for the query (a sliding window has passed them): the sink is the
    first pages from ``first`` on. Empty when the budget covers every page (nothing to rank)."""
    avail = n_pages - first
    lo = first + min(sink_pages, avail)
    hi = max(lo, n_pages - recent_pages)
    return (lo, lo) if budget_pages >= avail else (lo, hi)


def budget_page_indices(
    scores: torch.Tensor, offset: int, n_pages: int, budget_pages: int, sink_pages: int, recent_pages: int,
    first: int = 0,
) -> torch.Tensor:
    """Page ids ``[..., budget]`` (sorted) under a page budget, always keeping sink and recent pages.

    ``scores[..., j]`` scores page ``offset + j``: the candidate pages between the sink and the recent
    window. Forced pages come first in priority: the recent window, then the sink. Only pages
    ``first .. n_pages - 1`` exist for the query (a sliding window's); the sink starts at ``first``.
    """
    lead = scores.shape[:-1]
    dev = scores.device
    avail = n_pages - first
    if budget_pages >= avail:
        return torch.arange(first, n_pages, device=dev).expand(*lead, avail)
    recent = min(recent_pages, avail, budget_pages)
    sink = min(sink_pages, avail - recent, budget_pages - recent)
    k = budget_pages - recent - sink
    parts = []
    if sink:
        parts.append(torch.arange(first, first + sink, device=dev).expand(*lead, sink))
    if k > 0:
        parts.append(topk_indices(scores, k) + offset)
    parts.append(torch.arange(n_pages - recent, n_pages, device=dev).expand(*lead, recent))
    return torch.cat(parts, dim=-1)
