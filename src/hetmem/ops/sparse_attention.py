"""Apply ops: gather the selected pages of K and V, then attend over only those.

The work is proportional to the tokens selected: nothing of size L (the context) is materialised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_pages(buf: torch.Tensor, indices: torch.Tensor, page_size: int) -> torch.Tensor:
    """Gather whole pages: ``buf [B, H, cap, D]``, ``indices [B, H, k]`` -> ``[B, H, k * page_size, D]``.

    One ``index_select`` over a (B*H*pages, P*D) view: a single copy of exactly the selected bytes.
    """
    B, H, cap, D = buf.shape
    n = cap // page_size
    k = indices.shape[-1]
    flat = buf[:, :, : n * page_size].reshape(B * H * n, page_size * D)
    base = torch.arange(B * H, device=buf.device).unsqueeze(-1) * n
    rows = (indices.reshape(B * H, k) + base).reshape(-1)
    return flat.index_select(0, rows).reshape(B, H, k * page_size, D)


def gather_selected_kv(
    keys: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, page_size: int, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the selected pages, ``[B, H, S, D]`` with S <= k * page_size.

    The last selected page must be the last page of the context (possibly partial): the buffers hold
    whole pages, so it is gathered whole and its unused tail, at the end of every row, is sliced off.
    """
    pad = -(-length // page_size) * page_size - length
    if keys.shape[2] < length + pad:
        raise ValueError("KV buffers must hold whole pages (capacity a multiple of the page size)")
    k_sel = gather_pages(keys, indices, page_size)
    v_sel = gather_pages(values, indices, page_size)
    if pad:
        k_sel, v_sel = k_sel[:, :, :-pad], v_sel[:, :, :-pad]
    return k_sel, v_sel


def grouped_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Decode attention, GQA without repeating K/V: ``q [B, H_kv, G, D]`` against ``k, v [B, H_kv, S, D]``."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def dense_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain softmax attention for tests."""
    w = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * scale, dim=-1)
    return (w @ v.float()).to(q.dtype)
