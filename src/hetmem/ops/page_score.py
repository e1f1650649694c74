"""Relevancy op for page sparsity: the Quest upper bound of q.k over each page.

For one query head and page p with key bounds m_p <= k <= M_p (elementwise),
    ub_p = sum_i max(q_i * M_p,i , q_i * m_p,i) = q+ . M_p + q- . m_p
where q+ = max(q, 0) and q- = min(q, 0): two small matmuls instead of an elementwise max.

GQA: the ``G`` query heads that share a KV head are scored together and reduced (max by default:
a page is kept for the KV head if any of its query heads may attend to it strongly).
"""

from __future__ import annotations

import torch

from hetmem.ops import fast


def quest_upper_bound(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, group_reduce: str = "max") -> torch.Tensor:
    """Page scores ``[B, H_kv, N]`` for queries ``q [B, H_kv, G, D]`` and page bounds ``[B, H_kv, N, D]``.

    With the compiled ops (``ops.fast``) and ``group_reduce="max"``: one pass over the bounds, the group max
    taken per page, no ``[G, N]`` intermediate; otherwise ``quest_upper_bound_torch``."""
    if group_reduce == "max" and kmin.dim() == 4 and fast.available(q, kmin, kmax):
        return fast.quest_scores(q, kmin, kmax)
    return quest_upper_bound_torch(q, kmin, kmax, group_reduce)


def quest_upper_bound_torch(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor,
                            group_reduce: str = "max") -> torch.Tensor:
    """The same bound with two batched matmuls (q+ . M + q- . m) and a reduction over the group."""
    qf = q.float()
    ub = torch.matmul(qf.clamp(min=0), kmax.float().transpose(-1, -2)) + torch.matmul(
        qf.clamp(max=0), kmin.float().transpose(-1, -2)
    )  # [B, H_kv, G, N]
    if group_reduce == "max":
        return ub.amax(dim=2)
    if group_reduce == "sum":
        return ub.sum(dim=2)
    raise ValueError(f"unknown group_reduce '{group_reduce}'")


def quest_upper_bound_reference(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """The definition, elementwise (slow; for tests)."""
    qe = q.float().unsqueeze(3)  # [B, H, G, 1, D]
    ub = torch.maximum(qe * kmax.float().unsqueeze(2), qe * kmin.float().unsqueeze(2)).sum(-1)
    return ub.amax(dim=2)
