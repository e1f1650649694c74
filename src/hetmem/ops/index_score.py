"""Relevancy op for the DSA lightning indexer: score_t = sum_h w_h * ReLU(q_h . k_t).

One small index key per token (shared by all heads), ``H_i`` index query heads with per-head weights.
"""

from __future__ import annotations

import torch

from hetmem.ops import fast


def index_scores(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``q [B, H_i, D_i]``, ``w [B, H_i]``, ``k [B, L, D_i]`` -> scores ``[B, L]`` (float32).

    With the compiled ops (``ops.fast``): one pass over the index keys, every index head per key row, no
    ``[B, H_i, L]`` intermediate. Otherwise ``index_scores_torch``.
    """
    if k.dim() == 3 and k.stride(-1) == 1 and fast.available(q, w, k):
        return fast.index_scores(q, w, k)
    return index_scores_torch(q, w, k)


def index_scores_torch(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Plain torch: one GEMM ``[H_i, D_i] x [D_i, L]``, a ReLU, and a weighted reduction over the index heads."""
    s = torch.relu(torch.matmul(q, k.transpose(-1, -2)))  # [B, H_i, L]
    return torch.matmul(w.unsqueeze(1), s).squeeze(1)


def index_scores_all(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Every query position at once (training): ``q [B, T, H_i, D_i]``, ``w [B, T, H_i]``, ``k [B, S, D_i]`` -> ``[B, T, S]``."""
    s = torch.relu(torch.einsum("bthd,bsd->bths", q, k))
    return torch.einsum("bth,bths->bts", w, s)


def index_scores_reference(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The definition, one head at a time (for tests)."""
    out = torch.zeros(q.shape[0], k.shape[1], dtype=torch.float32)
    for h in range(q.shape[1]):
        dots = (k.float() * q[:, h].float().unsqueeze(1)).sum(-1)  # [B, L]
        out += w[:, h : h + 1].float() * dots.clamp(min=0)
    return out
