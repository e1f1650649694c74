"""Apply ops: gather the selected pages of K and V, then attend over only those.

The work is proportional to the tokens selected: nothing of size L (the context) is materialised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_pages(buf: torch.Tensor, indices: torch.Tensor, page_size: int) -> torch.Tensor:
    """Gather full pages: ``buf [B, H, cap, D]``, ``indices [B, H, k]`` -> ``[B, H, k * page_size, D]``."""
    B, H, cap, D = buf.shape
    pages = buf[:, :, : (cap // page_size) * page_size].reshape(B * H, cap // page_size, page_size, D)
    k = indices.shape[-1]
    rows = torch.arange(B * H, device=buf.device).unsqueeze(-1)
    out = pages[rows, indices.reshape(B * H, k)]  # [B*H, k, P, D]
    return out.reshape(B, H, k * page_size, D)


def gather_selected_kv(
    keys: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, page_size: int, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the selected pages. The last selected page must be the last page (possibly partial)."""
    n_pages = -(-length // page_size)
    full = indices[..., :-1]
    last_start = (n_pages - 1) * page_size
    k_sel = torch.cat([gather_pages(keys, full, page_size), keys[:, :, last_start:length]], dim=2)
    v_sel = torch.cat([gather_pages(values, full, page_size), values[:, :, last_start:length]], dim=2)
    return k_sel, v_sel


def grouped_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Decode attention, GQA without repeating K/V: ``q [B, H_kv, G, D]`` against ``k, v [B, H_kv, S, D]``."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def dense_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain softmax attention for tests."""
    w = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * scale, dim=-1)
    return (w @ v.float()).to(q.dtype)
