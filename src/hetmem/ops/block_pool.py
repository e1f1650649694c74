"""Prepare + Relevancy ops for block sparsity (SeerAttention-R): block-pooled keys and gate scoring.

Keys are ``[B, H_kv, L, D]``; block summaries are ``[B, H_kv, n_blocks, D]``. A running per-block key
*sum* is kept so that a decode token updates one block in O(D); the mean divides by the tokens present
(the last block may be partial).
"""

from __future__ import annotations

import torch

from hetmem.ops import fast


def block_mean(keys: torch.Tensor, block_size: int) -> torch.Tensor:
    """Average of each block of ``keys`` (reference op; the last block averages only the tokens present)."""
    B, H, L, D = keys.shape
    n = -(-L // block_size)
    out = keys.new_zeros(B, H, n, D, dtype=torch.float32)
    for b in range(n):
        out[:, :, b] = keys[:, :, b * block_size : (b + 1) * block_size].float().mean(dim=2)
    return out


def block_counts(n_blocks: int, length: int, block_size: int, device=None) -> torch.Tensor:
    """Tokens present in each of the first ``n_blocks`` blocks of a ``length``-token sequence."""
    starts = torch.arange(n_blocks, device=device) * block_size
    return (length - starts).clamp(min=0, max=block_size)


def update_block_sums(sums: torch.Tensor, keys: torch.Tensor, start: int, end: int, block_size: int) -> tuple[int, int]:
    """Bring the key sums of the blocks touched by tokens ``[start, end)`` up to date, in place.

    Returns the range ``(b0, b1)`` of blocks whose sums changed. A single decode token is added to its
    block's running sum; a longer span recomputes just the blocks it touches from the cache buffer.
    """
    if end <= start:
        return 0, 0
    if end - start == 1:
        b, off = divmod(start, block_size)
        k = keys[:, :, start].float()
        if off == 0:
            sums[:, :, b] = k
        else:
            sums[:, :, b] += k
        return b, b + 1
    b0 = start // block_size
    b1 = (end - 1) // block_size + 1
    span = keys[:, :, b0 * block_size : end].float()
    B, H, n, D = span.shape
    pad = (b1 - b0) * block_size - n
    if pad:
        span = torch.cat([span, span.new_zeros(B, H, pad, D)], dim=2)
    sums[:, :, b0:b1] = span.reshape(B, H, b1 - b0, block_size, D).sum(dim=3)
    return b0, b1


def gated_block_scores(q_gated: torch.Tensor, k_gated: torch.Tensor, scale: float) -> torch.Tensor:
    """Relevancy: ``q_gated [B, H_kv, Dg]`` . ``k_gated [B, H_kv, N, Dg]`` -> ``[B, H_kv, N]`` (one GEMV per head).
    With the compiled ops (``ops.fast.block_scores``): one pass over the summaries, in place."""
    if (k_gated.dim() == 4 and k_gated.stride(-1) == 1 and k_gated.stride(0) == k_gated.shape[1] * k_gated.stride(1)
            and fast.available(q_gated, k_gated)):
        return fast.block_scores(q_gated, k_gated, scale)
    return gated_block_scores_torch(q_gated, k_gated, scale)


def gated_block_scores_torch(q_gated: torch.Tensor, k_gated: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain torch: one batched GEMV."""
    return torch.matmul(k_gated, q_gated.unsqueeze(-1)).squeeze(-1) * scale


def gated_block_scores_reference(q_gated: torch.Tensor, k_gated: torch.Tensor, scale: float) -> torch.Tensor:
    """The definition, elementwise (for tests)."""
    return (q_gated.unsqueeze(2) * k_gated).sum(-1) * scale
