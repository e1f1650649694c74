"""Prepare op for page sparsity (Quest/LServe): per-page elementwise key min and max.

Keys are ``[B, H_kv, L, D]``; summaries are ``[B, H_kv, n_pages, D]`` with ``n_pages = ceil(L / P)``.
The last page may be partial: its min/max cover only the tokens present.
"""

from __future__ import annotations

import torch


def page_minmax(keys: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of each page of ``keys`` (reference op, also used for whole-prefill preparation)."""
    B, H, L, D = keys.shape
    n_full = L // page_size
    mins, maxs = [], []
    if n_full:
        pages = keys[:, :, : n_full * page_size].reshape(B, H, n_full, page_size, D)
        mins.append(pages.amin(dim=3))
        maxs.append(pages.amax(dim=3))
    if L > n_full * page_size:
        tail = keys[:, :, n_full * page_size :]
        mins.append(tail.amin(dim=2, keepdim=True))
        maxs.append(tail.amax(dim=2, keepdim=True))
    if not mins:
        empty = keys.new_empty(B, H, 0, D)
        return empty, empty.clone()
    return torch.cat(mins, dim=2), torch.cat(maxs, dim=2)


def update_page_minmax(
    kmin: torch.Tensor, kmax: torch.Tensor, keys: torch.Tensor, start: int, end: int, page_size: int
) -> None:
    """Bring the summaries of the pages touched by tokens ``[start, end)`` up to date, in place.

    ``keys`` is the cache buffer, already holding tokens ``[0, end)``. A single decode token is folded
    into its page's running min/max; a longer span recomputes just the pages it touches.
    """
    if end <= start:
        return
    if end - start == 1:
        p, off = divmod(start, page_size)
        k = keys[:, :, start]
        if off == 0:
            kmin[:, :, p] = k
            kmax[:, :, p] = k
        else:
            torch.minimum(kmin[:, :, p], k, out=kmin[:, :, p])
            torch.maximum(kmax[:, :, p], k, out=kmax[:, :, p])
        return
    p0 = start // page_size
    p1 = (end - 1) // page_size + 1
    mn, mx = page_minmax(keys[:, :, p0 * page_size : end], page_size)
    kmin[:, :, p0:p1] = mn
    kmax[:, :, p0:p1] = mx
