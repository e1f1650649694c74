"""Apply ops: gather the selected pages of K and V, then attend over only those.

The work is proportional to the tokens selected: nothing of size L (the context) is materialised.
Attention follows what the model's own attention does: its softmax scale, logit soft-capping
(Gemma2: ``tanh(s / cap) * cap``), per-head attention sinks (gpt-oss: an extra logit in the softmax
denominator) and K/V of different head dims (MLA's latent cache).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hetmem.ops import fast


def gather_pages(buf: torch.Tensor, indices: torch.Tensor, page_size: int) -> torch.Tensor:
    """Gather whole pages: ``buf [B, H, cap, D]``, ``indices [B, H, k]`` -> ``[B, H, k * page_size, D]``.

    One ``index_select`` over a (B*H*pages, P*D) view: a single copy of exactly the selected bytes.
    """
    B, H, cap, D = buf.shape
    n = cap // page_size
    k = indices.shape[-1]
    if not buf.is_contiguous():  # a view (MLA's values are a prefix of its latent keys): gather by token
        tok = (indices.unsqueeze(-1) * page_size + torch.arange(page_size, device=buf.device)).flatten(-2)
        return torch.gather(buf, 2, tok.unsqueeze(-1).expand(*tok.shape, D))
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


def paged_in_place(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether ``paged_decode_attention`` reads these buffers in place (the compiled op takes them)."""
    return keys.dim() == 4 and keys.stride(3) == 1 and values.stride(3) == 1 and fast.available(q, keys, values)


def paged_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                           page_size: int, start: int, length: int, scale: float, *, softcap: float | None = None,
                           sinks: torch.Tensor | None = None) -> torch.Tensor | None:
    """Decode attention over the selected pages ``indices [B, H_kv, k]`` (sorted) of the cache buffers
    ``keys [B, H_kv, cap, Dk]`` / ``values [B, H_kv, cap, Dv]``, read in place: no copy of the selected K/V.
    Tokens before ``start`` (a sliding window's) and from ``length`` on are left out. Returns
    ``[B, H_kv, G, Dv]``, or None when the compiled op cannot take these tensors (then gather and attend)."""
    if not paged_in_place(q, keys, values):
        return None
    out = fast.page_attention(q, keys, values, indices, page_size, start, length, scale, softcap=softcap,
                              sinks=sinks)
    return out.to(q.dtype)


def dense_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, length: int,
                           page_size: int, scale: float, *, softcap: float | None = None,
                           sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention over every cached token ``start .. length - 1`` of the buffers ``keys [B, H_kv, cap, Dk]``
    / ``values``. K/V stored in another dtype than the query's (``--kv-dtype``) are read in place by the compiled
    op (all pages selected, float32 accumulation) instead of being cast whole every step."""
    if keys.dtype != q.dtype and paged_in_place(q, keys, values):
        first, last = start // page_size, -(-length // page_size)
        pages = _all_pages(first, last, keys.device).expand(*keys.shape[:2], last - first)
        return paged_decode_attention(q, keys, values, pages, page_size, start, length, scale, softcap=softcap,
                                      sinks=sinks)
    return grouped_decode_attention(q, keys[:, :, start:length], values[:, :, start:length], scale, softcap=softcap,
                                    sinks=sinks)


_PAGES: dict = {}


def _all_pages(first: int, last: int, device) -> torch.Tensor:
    """``arange(first, last)`` (int64), kept: decode asks for the same range layer after layer."""
    key = (first, last, str(device))
    t = _PAGES.get(key)
    if t is None:
        if len(_PAGES) > 64:
            _PAGES.clear()
        t = _PAGES[key] = torch.arange(first, last, device=device)
    return t


def grouped_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *,
                             softcap: float | None = None, sinks: torch.Tensor | None = None,
                             valid: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention, GQA without repeating K/V: ``q [B, H_kv, G, Dk]`` against ``k [B, H_kv, S, Dk]``,
    ``v [B, H_kv, S, Dv]`` -> ``[B, H_kv, G, Dv]``.

    ``softcap``: logit soft-capping; ``sinks [H_kv, G]``: per-head sink logits; ``valid [B, H_kv, S]``: which
    gathered entries are real (padding of a ragged selection, tokens outside a sliding window). K/V in another
    dtype than ``q`` are cast to it (the plain path; ``dense_decode_attention`` reads them in place).
    """
    if k.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    if softcap is None and sinks is None:
        mask = None if valid is None else valid.unsqueeze(2)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    probs = decode_probs(q, k, scale, softcap=softcap, sinks=sinks, valid=valid)
    return torch.matmul(probs.to(v.dtype), v)


def decode_probs(q: torch.Tensor, k: torch.Tensor, scale: float, *, softcap: float | None = None,
                 sinks: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Attention probabilities ``[B, H_kv, G, S]`` (float32) as the model's eager attention computes them:
    ``q.k * scale``, soft-capped, masked, softmax (with the sink logit in the denominator, its column dropped)."""
    w = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        w = torch.tanh(w / softcap) * softcap
    w = w.float()
    if valid is not None:
        w = w.masked_fill(~valid.unsqueeze(2), float("-inf"))
    if sinks is None:
        return torch.softmax(w, dim=-1)
    s = sinks.float().reshape(1, *sinks.shape, 1).expand(*w.shape[:-1], 1)
    w = torch.cat([w, s], dim=-1)
    w = w - w.amax(dim=-1, keepdim=True)
    return torch.softmax(w, dim=-1)[..., :-1]


def prefill_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                      scale: float, *, softcap: float | None = None, sinks: torch.Tensor | None = None,
                      block: int = 256) -> torch.Tensor:
    """Causal attention of a chunk of queries the way transformers' eager attention computes it (for what
    SDPA cannot do: soft-capping, sinks): ``query [B, H, T, Dk]``, ``key [B, H_kv, S, Dk]``, ``value
    [B, H_kv, S, Dv]``, a boolean ``mask [B|1, 1, T, S]`` (True = attend) or None (causal, the queries being
    the last T of the S positions). Queries run in blocks of ``block`` so the score matrix stays small.
    Returns ``[B, T, H, Dv]`` (the layout attention functions return)."""
    B, H, T, _ = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    G = H // Hkv
    q = query.reshape(B, Hkv, G, T, -1)
    k = key.unsqueeze(2)
    v = value.unsqueeze(2)
    out = []
    for s in range(0, T, block):
        qb = q[:, :, :, s : s + block]
        t = qb.shape[3]
        w = torch.matmul(qb, k.transpose(-1, -2)) * scale  # [B, Hkv, G, t, S]
        if softcap is not None:
            w = torch.tanh(w / softcap) * softcap
        if mask is not None:
            m = mask[:, :, s : s + t].unsqueeze(1)  # [B, 1, 1, t, S]
        else:
            qpos = S - T + s + torch.arange(t, device=query.device)
            m = torch.arange(S, device=query.device) <= qpos.unsqueeze(-1)
        w = w.masked_fill(~m, torch.finfo(w.dtype).min)
        if sinks is not None:
            sk = sinks.reshape(1, Hkv, G, 1, 1).to(w.dtype).expand(*w.shape[:-1], 1)
            w = torch.cat([w, sk], dim=-1)
            w = w - w.amax(dim=-1, keepdim=True)
            p = torch.softmax(w, dim=-1, dtype=w.dtype)[..., :-1]
        else:
            p = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
        out.append(torch.matmul(p.to(value.dtype), v))
    o = torch.cat(out, dim=3)  # [B, Hkv, G, T, Dv]
    return o.reshape(B, H, T, -1).transpose(1, 2).contiguous()


def dense_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain softmax attention for tests."""
    w = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * scale, dim=-1)
    return (w @ v.float()).to(q.dtype)


def window_valid(indices: torch.Tensor, unit_size: int, start: int, n_tokens: int) -> torch.Tensor | None:
    """Which of the ``n_tokens`` gathered tokens of the sorted selected units ``indices [B, H, k]`` lie at or
    after ``start`` (a sliding window's first token): ``[B, H, n_tokens]`` bool, or None when all do."""
    if start % unit_size == 0 or not bool((indices[..., 0] * unit_size < start).any()):
        return None
    tok = (indices.unsqueeze(-1) * unit_size + torch.arange(unit_size, device=indices.device)).flatten(-2)
    return tok[..., :n_tokens] >= start
