"""Measurement op (not a method step): how much true attention mass a selection covers.

recall = (attention mass on the selected tokens) / (mass on the best possible selection of the same
number of tokens, i.e. the oracle top-k by true attention). Needs the dense scores, which is fine for a
measurement; no method's Apply uses this.
"""

from __future__ import annotations

import torch

from hetmem.core.types import Selection
from hetmem.ops.sparse_attention import decode_probs


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float, softcap: float | None = None,
                    sinks: torch.Tensor | None = None) -> torch.Tensor:
    """``q [B, H_kv, G, D]``, ``k [B, H_kv, L, D]`` -> true decode attention ``[B, H_kv, G, L]`` (with the
    model's logit soft-capping and sink logits, when it has them)."""
    if softcap is None and sinks is None:
        return torch.softmax(torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale, dim=-1)
    return decode_probs(q.float(), k.float(), scale, softcap=softcap, sinks=sinks)


def selection_token_mask(sel: Selection, shape: tuple[int, int], device=None) -> torch.Tensor:
    """Bool ``[B, H_kv, L]``: which tokens a Selection covers (top-k ids or a bitmap, any unit size)."""
    B, H = shape
    L = sel.length
    bitmap = sel.to_bitmap()
    if bitmap.dim() == 2:  # one selection shared by every head
        bitmap = bitmap.unsqueeze(1)
    bitmap = bitmap.expand(B, H, bitmap.shape[-1])
    tok = bitmap.repeat_interleave(sel.unit_size, dim=-1)[..., :L]
    return tok


def selection_recall(probs: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Per KV head ``[B, H_kv]``: covered mass / oracle top-n mass, n = tokens the head selected.

    ``probs [B, H_kv, G, L]`` is averaged over the GQA group (one selection serves the whole group).
    """
    mass = probs.mean(dim=2)  # [B, H, L]
    covered = (mass * token_mask).sum(-1)
    n = token_mask.sum(-1)
    ranked = mass.sort(dim=-1, descending=True).values.cumsum(-1)
    oracle = ranked.gather(-1, (n - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(n > 0, covered / oracle.clamp(min=1e-12), torch.zeros_like(covered))


def selection_recall_reference(probs, token_mask):
    B, H, G, L = probs.shape
    out = torch.zeros(B, H)
    for b in range(B):
        for h in range(H):
            m = probs[b, h].mean(0)
            n = int(token_mask[b, h].sum())
            best = m.sort(descending=True).values[:n].sum()
            out[b, h] = m[token_mask[b, h]].sum() / best
    return out
