"""Retrieval ops: top-k (token budget) and threshold bitmaps over unit scores."""

from __future__ import annotations

from typing import Callable

import torch

from hetmem.ops import fast


def topk_indices(scores: torch.Tensor, k: int, sort: bool = True) -> torch.Tensor:
    """Ids of the ``k`` largest scores along the last dim, ascending (``sort`` is kept for callers; the
    ids always come back ascending).

    Tie rule: among equal scores the lower id wins, i.e. the top ``k`` under (score descending, id
    ascending), the order of a stable descending sort and of the FPGA streaming unit
    (``ops.fpga_emu.streaming_topk``). NaN ranks as -inf. ``torch.topk`` alone picks an
    unspecified member of a tie; here, when the k-th best value is tied (or a NaN is among the top k),
    two O(n) passes pick the winners: every score above the k-th value, then the lowest-id scores equal
    to it. On CPU the untied case is checked first and returns torch.topk's ids; on other devices the
    exact path always runs, with no host sync.
    """
    n = scores.shape[-1]
    k = max(0, min(k, n))
    lead = scores.shape[:-1]
    dev = scores.device
    if k == 0 or k == n:
        return torch.arange(k, device=dev).expand(*lead, k)
    if scores.is_floating_point() and fast.available(scores):  # compiled: the exact rule in one pass per row
        return fast.topk_ids(scores.reshape(-1, n), k).reshape(*lead, k)
    if dev.type == "cpu":  # common case, checked on the host: no tie at the k-th value, no NaN in the top k
        vals, idx = torch.topk(scores, k, dim=-1, sorted=False)
        if bool(((scores >= vals.amin(dim=-1, keepdim=True)).sum(-1) == k).all()):
            return idx.sort(dim=-1).values
    if scores.is_floating_point():
        scores = scores.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    kth = torch.topk(scores, k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    above = scores > kth
    at = scores == kth
    take = above | (at & (at.cumsum(-1) <= k - above.sum(-1, keepdim=True)))  # exactly k per row
    # the taken ids, in ascending order: each goes to slot (its rank among the taken); the rest to slot k
    slot = torch.where(take, take.cumsum(-1) - 1, k)
    out = torch.empty(*lead, k + 1, dtype=torch.int64, device=dev)
    out.scatter_(-1, slot, torch.arange(n, device=dev).expand(*lead, n))
    return out[..., :k]


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
    first: int = 0, topk: Callable[[torch.Tensor, int], torch.Tensor] = topk_indices,
) -> torch.Tensor:
    """Page ids ``[..., budget]`` (sorted) under a page budget, always keeping sink and recent pages.

    The one sink + top-k + recent assembly: ``topk(scores, k)`` ranks the candidates and returns their
    positions ``[..., k]``, ascending (``topk_indices`` by default; the emulated FPGA passes its streaming
    top-k unit, ``runtime.fpga_steps``). Sink and recent ids are made on ``scores.device``.

    ``scores[..., j]`` scores page ``offset + j``: the candidate pages between the sink and the recent
    window. Forced pages come first in priority: the recent window, then the sink; the rest of the
    budget goes to the top candidates (ties to the lower page id, as in ``topk_indices``). With at
    least ``budget_pages`` pages and enough candidates the result holds exactly ``budget_pages``
    distinct ids; with fewer pages, all of them. Only pages ``first .. n_pages - 1`` exist for the
    query (a sliding window's); the sink starts at ``first``.
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
        parts.append(topk(scores, k) + offset)
    parts.append(torch.arange(n_pages - recent, n_pages, device=dev).expand(*lead, recent))
    return torch.cat(parts, dim=-1)
