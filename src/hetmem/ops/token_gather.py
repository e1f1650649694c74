"""Apply ops at token granularity: gather the selected tokens (or units) of K and V, then attend.

Work is proportional to what was selected; nothing of the context's size is materialised except the
index list itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_tokens(buf: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``buf [B, H, cap, D]``, ``indices [B, H, k]`` (token ids) -> ``[B, H, k, D]``."""
    idx = indices.unsqueeze(-1).expand(*indices.shape, buf.shape[-1])
    return torch.gather(buf, 2, idx)


def gather_tokens_reference(buf: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    B, H, k = indices.shape
    out = buf.new_empty(B, H, k, buf.shape[-1])
    for b in range(B):
        for h in range(H):
            out[b, h] = buf[b, h, indices[b, h]]
    return out


def bitmap_to_padded(bitmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A threshold bitmap ``[B, H, N]`` -> (unit ids ``[B, H, kmax]`` ascending, valid ``[B, H, kmax]``).

    Rows select different counts; shorter rows are padded (with valid=False) to the longest row. The
    padding repeats the row's first selected unit, so gathering the padded ids reads only selected data.
    """
    counts = bitmap.sum(-1)
    kmax = max(1, int(counts.max()))
    N = bitmap.shape[-1]
    # selected units first, each group in ascending order
    key = (~bitmap).to(torch.int64) * N + torch.arange(N, device=bitmap.device)
    order = key.argsort(dim=-1)[..., :kmax]
    valid = torch.arange(kmax, device=bitmap.device) < counts.unsqueeze(-1)
    return torch.where(valid, order, order[..., :1]), valid


def unit_token_ids(unit_ids: torch.Tensor, unit_size: int, length: int, unit_valid: torch.Tensor | None = None):
    """Units ``[B, H, k]`` -> token ids ``[B, H, k * unit_size]`` and a validity mask (ids < length, unit valid)."""
    offs = torch.arange(unit_size, device=unit_ids.device)
    tok = (unit_ids.unsqueeze(-1) * unit_size + offs).flatten(-2)
    valid = tok < length
    if unit_valid is not None:
        valid &= unit_valid.unsqueeze(-1).expand(*unit_valid.shape, unit_size).flatten(-2)
    return tok.clamp(max=length - 1), valid


def masked_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scale: float):
    """Decode attention over gathered ``k, v [B, H_kv, S, D]`` where ``valid [B, H_kv, S]`` marks real entries
    (padding of a ragged selection); ``q [B, H_kv, G, D]``."""
    mask = valid.unsqueeze(2).expand(-1, -1, q.shape[2], -1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
