"""Retrieval ops: top-k (token budget) and threshold bitmaps over unit scores."""

from __future__ import annotations

from typing import Callable

import torch


def topk_indices(scores: torch.Tensor, k: int, sort: bool = True) -> torch.Tensor:
    """Indices of the ``k`` largest scores along the last dim, ascending by index when ``sort``."""
    k = max(0, min(k, scores.shape[-1]))
    idx = torch.topk(scores, k, dim=-1, sorted=False).indices
    return idx.sort(dim=-1).values if sort else idx


def threshold_bitmap(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """One bool per unit: score >= threshold."""
    return scores >= threshold


def candidate_range(n_pages: int, sink_pages: int, recent_pages: int, budget_pages: int) -> tuple[int, int]:
    """The pages ``[lo, hi)`` that Relevancy scores: those between the sink and the recent window.

    Empty when the budget covers every page (nothing to rank)."""
    lo = min(sink_pages, n_pages)
    hi = max(lo, n_pages - recent_pages)
    return (lo, lo) if budget_pages >= n_pages else (lo, hi)


def budget_page_indices(
    scores: torch.Tensor, offset: int, n_pages: int, budget_pages: int, sink_pages: int, recent_pages: int,
    topk: Callable[[torch.Tensor, int], torch.Tensor] = topk_indices,
) -> torch.Tensor:
    """Page ids ``[..., budget]`` (sorted) under a page budget, always keeping sink and recent pages.

    The one sink + top-k + recent assembly: ``topk(scores, k)`` ranks the candidates and returns their
    positions ``[..., k]``, ascending (``topk_indices`` by default; the emulated FPGA passes its streaming
    top-k unit, ``runtime.fpga_steps``). Sink and recent ids are made on ``scores.device``.

    ``scores[..., j]`` scores page ``offset + j``: the candidate pages between the sink and the recent
    window. Forced pages come first in priority: the recent window, then the sink.
    """
    lead = scores.shape[:-1]
    dev = scores.device
    if budget_pages >= n_pages:
        return torch.arange(n_pages, device=dev).expand(*lead, n_pages)
    recent = min(recent_pages, n_pages, budget_pages)
    sink = min(sink_pages, n_pages - recent, budget_pages - recent)
    k = budget_pages - recent - sink
    parts = []
    if sink:
        parts.append(torch.arange(sink, device=dev).expand(*lead, sink))
    if k > 0:
        parts.append(topk(scores, k) + offset)
    parts.append(torch.arange(n_pages - recent, n_pages, device=dev).expand(*lead, recent))
    return torch.cat(parts, dim=-1)
