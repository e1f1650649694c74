"""Sharding pages across memory nodes, and the head's two merges.

Pages are assigned by position, striped: global page ``p`` lives on node ``p % N`` as that node's local
page ``p // N``. Striping keeps the nodes balanced as decode appends pages, and maps each node's local
order monotonically onto global order, so a node breaking ties by its lower local id breaks them by the
lower global id too (the rule of ``ops.topk.topk_indices``).

* ``merge_candidates``: every node returns its local top ``m`` pages (ids and scores) over all its pages;
  the head scatters them into the candidate range ``[lo, hi)`` the method's Relevancy would have scored
  in-process (the rest stays ``-inf``) and runs the method's own Retrieval on that. With ``m`` at least
  the budget, every page of the global top ``k`` (``k = budget - sink - recent`` candidates) is among the
  returned ones: a node's top ``m`` holds at most ``sink + recent`` pages outside the range, so it holds
  its ``k`` best in-range pages. The selection is therefore identical to the in-process one.
* ``merge_partials``: each node attends over the selected pages it holds and returns its partial output
  and log-sum-exp; ``out = sum_i exp(lse_i - lse) out_i`` with ``lse = logsumexp_i lse_i`` (and the
  model's per-head sink logit, if any, in the denominator), as in FlashAttention's split-KV / flash-decoding
  (Dao et al. 2023, https://crfm.stanford.edu/2023/10/12/flashdecoding.html).
"""

from __future__ import annotations

import torch

from hetmem.ops.topk import topk_indices


def owner(page: int | torch.Tensor, n_nodes: int):
    return page % n_nodes


def local_page(page: int | torch.Tensor, n_nodes: int):
    return page // n_nodes


def split_tokens(start: int, end: int, page_size: int, n_nodes: int) -> dict[int, list[tuple[int, int]]]:
    """Global tokens ``[start, end)`` cut at page boundaries: ``{node: [(g0, g1), ...]}`` in global order."""
    out: dict[int, list[tuple[int, int]]] = {}
    t = start
    while t < end:
        p = t // page_size
        t1 = min(end, (p + 1) * page_size)
        out.setdefault(p % n_nodes, []).append((t, t1))
        t = t1
    return out


def local_tokens(node: int, length: int, page_size: int, n_nodes: int) -> int:
    """How many of the first ``length`` global tokens node ``node`` holds."""
    full, rem = divmod(length, page_size)
    n = (full // n_nodes + (1 if node < full % n_nodes else 0)) * page_size
    if rem and full % n_nodes == node:
        n += rem
    return n


def local_topk(values: torch.Tensor, offset: int, m: int, node: int, n_nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A node's top ``m`` of its local scores ``values[..., j]`` (local page ``offset + j``): (global ids,
    scores), ``[..., min(m, n)]``. Same rule as ``ops.topk.topk_indices`` (higher score, then lower id)."""
    idx = topk_indices(values, m)
    return (idx + offset) * n_nodes + node, values.gather(-1, idx)


def merge_candidates(ids: list[torch.Tensor], vals: list[torch.Tensor], lo: int, hi: int) -> torch.Tensor:
    """Scores ``[..., hi - lo]`` of the candidate range from every node's candidates (absent ones: -inf)."""
    lead = ids[0].shape[:-1]
    out = torch.full((*lead, max(0, hi - lo)), float("-inf"), dtype=torch.float32)
    if hi <= lo:
        return out
    gi = torch.cat(ids, dim=-1)
    gv = torch.cat(vals, dim=-1).float()
    keep = (gi >= lo) & (gi < hi)
    pos = torch.where(keep, gi - lo, hi - lo)  # out-of-range candidates go to a spill column
    wide = torch.cat([out, out[..., :1]], dim=-1)
    wide.scatter_(-1, pos, torch.where(keep, gv, float("-inf")))
    return wide[..., :-1].contiguous()


def merge_partials(outs: list[torch.Tensor], lses: list[torch.Tensor], sinks: torch.Tensor | None = None,
                   dtype=None) -> torch.Tensor:
    """Merge partial attention outputs ``[B, H_kv, G, Dv]`` by their log-sum-exp ``[B, H_kv, G]``."""
    lse = torch.stack(lses)  # [N, B, H, G]
    terms = lse
    if sinks is not None:  # the sink logit joins the softmax denominator, with no value
        s = sinks.float().reshape(1, 1, *sinks.shape).expand(1, *lse.shape[1:])
        terms = torch.cat([lse, s], dim=0)
    total = torch.logsumexp(terms, dim=0)  # [B, H, G]
    w = torch.exp(lse - total)  # [N, B, H, G]; a node with no selected page has lse -inf, weight 0
    w = torch.nan_to_num(w, nan=0.0)
    out = (w.unsqueeze(-1) * torch.stack(outs).float()).sum(0)
    return out.to(dtype or outs[0].dtype)


def merge_page_partials(pages: torch.Tensor, outs: torch.Tensor, lses: torch.Tensor, selected: torch.Tensor,
                        sinks: torch.Tensor | None = None, dtype=None) -> torch.Tensor | None:
    """The single-round ``attention`` layout's merge: the nodes attended every page the head could select,
    each page on its own (``pages [B, H, C]`` global ids, -1: padding; ``outs [B, H, C, G, Dv]``, ``lses
    [B, H, C, G]``); the head merges the partials of exactly the ``selected [B, H, k]`` pages, as
    ``merge_partials`` merges nodes. None when a selected page is not among ``pages`` (the caller then asks
    the nodes to attend over the selection)."""
    match = pages.unsqueeze(-1) == selected.unsqueeze(-2)  # [B, H, C, k]
    if not bool(match.any(-2).all()):
        return None
    chosen = match.any(-1)  # [B, H, C]
    lse = lses.float().masked_fill(~chosen.unsqueeze(-1), float("-inf"))  # [B, H, C, G]
    terms = lse
    if sinks is not None:
        s = sinks.float().reshape(1, sinks.shape[0], 1, sinks.shape[1]).expand(lse.shape[0], -1, 1, -1)
        terms = torch.cat([lse, s], dim=2)
    total = torch.logsumexp(terms, dim=2, keepdim=True)  # [B, H, 1, G]
    w = torch.nan_to_num(torch.exp(lse - total), nan=0.0)  # [B, H, C, G]
    out = (w.unsqueeze(-1) * outs.float()).sum(2)  # [B, H, G, Dv]
    return out.to(dtype or outs.dtype)
