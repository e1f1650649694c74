"""Ops for compressed KV by eviction (StreamingLLM, H2O, SnapKV).

* ``keep_indices``: which tokens to keep under a budget (sink + top-scored + recent window), per KV head.
* ``attention_column_mass``: attention probability each key receives, summed over queries and the GQA
  group: H2O's accumulated attention and SnapKV's observation-window votes. Computed in query chunks.
* ``eviction_scores`` / ``lightest_slots`` / ``move_last_into``: H2O's in-place eviction over a cache whose
  slots are not in position order (each slot carries its token's position): score the evictable slots,
  pick the lightest, and fill its slot with the last stored token (one token moved per KV head).
"""

from __future__ import annotations

import torch

from hetmem.ops.topk import budget_page_indices


def keep_indices(scores: torch.Tensor | None, length: int, budget: int, sink: int, recent: int, lead: tuple, device=None):
    """Sorted token ids ``[*lead, min(budget, length)]`` to keep.

    ``scores[..., j]`` scores token ``sink + j`` (the candidates between the sink and the recent window);
    ``None`` keeps only sink + recent (StreamingLLM).
    """
    if scores is None:
        scores = torch.zeros(*lead, max(0, length - sink - recent), device=device)
    return budget_page_indices(scores, sink, length, budget, sink, recent)


def attention_column_mass(
    q: torch.Tensor, k: torch.Tensor, scale: float, q_pos0: int | None = None, chunk: int = 256
) -> torch.Tensor:
    """Sum over queries (and GQA group) of softmax(q.k) per key.

    ``q [B, H_kv, G, T, D]`` queries at absolute positions ``q_pos0 .. q_pos0 + T - 1`` against keys
    ``k [B, H_kv, L, D]`` at positions ``0 .. L - 1`` (causal when ``q_pos0`` is given) -> ``[B, H_kv, L]``.
    """
    B, H, G, T, D = q.shape
    L = k.shape[2]
    out = torch.zeros(B, H, L, dtype=torch.float32, device=k.device)
    kf = k.float().transpose(-1, -2).unsqueeze(2)  # [B, H, 1, D, L]
    kpos = torch.arange(L, device=k.device)
    for s in range(0, T, chunk):
        qc = q[:, :, :, s : s + chunk].float()
        logits = torch.matmul(qc, kf) * scale  # [B, H, G, t, L]
        if q_pos0 is not None:
            qpos = q_pos0 + s + torch.arange(qc.shape[3], device=k.device)
            logits = logits.masked_fill(kpos > qpos.unsqueeze(-1), float("-inf"))
        out += torch.softmax(logits, dim=-1).sum(dim=(2, 3))
    return out


def attention_column_mass_reference(q, k, scale, q_pos0=None):
    B, H, G, T, D = q.shape
    L = k.shape[2]
    out = torch.zeros(B, H, L)
    for t in range(T):
        n = L if q_pos0 is None else q_pos0 + t + 1
        for g in range(G):
            w = torch.softmax((k[:, :, :n].float() @ q[:, :, g, t].float().unsqueeze(-1)).squeeze(-1) * scale, -1)
            out[:, :, :n] += w
    return out


def eviction_scores(acc: torch.Tensor, pos: torch.Tensor, seen: int, sink: int, recent: int) -> torch.Tensor:
    """Scores ``[B, H_kv, L]`` per stored slot: the accumulated attention ``acc``, or ``+inf`` for slots that are
    never evicted (positions ``< sink`` and the last ``recent`` of the ``seen`` positions)."""
    forced = (pos < sink) | (pos >= seen - recent)
    return acc.masked_fill(forced, float("inf"))


def lightest_slots(scores: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` lowest-scored slots per row, ``[B, H_kv, n]`` (``n = 1``: the first minimum)."""
    if n == 1:
        return scores.argmin(-1, keepdim=True)
    return torch.topk(scores, n, dim=-1, largest=False).indices


def move_last_into(tensors, slots: torch.Tensor, last: int) -> None:
    """Evict one slot per row in place: overwrite ``slots [B, H_kv, 1]`` with slot ``last`` in every tensor
    ``[B, H_kv, cap, ...]`` (K, V and per-token statistics stay aligned). Moves one token per row."""
    for t in tensors:
        idx = slots.reshape(*slots.shape, *([1] * (t.dim() - 3))).expand(*slots.shape, *t.shape[3:])
        t.scatter_(2, idx, t[:, :, last : last + 1].clone())
