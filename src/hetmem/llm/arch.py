"""What hetmem needs to know about a model's attention, found in one place for every family.

* ``attention_modules``: the attention modules, in layer order (those the attention hook is called with).
* ``describe``: per layer its sliding window (from transformers' own ``get_layer_types_and_kwargs``), and
  the geometry of what the KV cache holds: KV heads and key/value dims. For MLA (DeepSeek-V2/V3) the
  cache holds the latent: one shared "head" whose key is ``c_kv (kv_lora_rank) ++ k_rope (qk_rope_head_dim)``
  and whose value is ``c_kv`` -- what transformers itself caches, and where hetmem's methods select.
* ``MLA`` attention runs on that latent cache with the projections absorbed (DeepSeek-V2, arXiv 2405.04434,
  sec. 2.1.2; FlashMLA): a query head's ``q_nope`` is mapped through that head's ``W_UK`` into latent
  space, scored against ``c_kv`` (and ``q_rope`` against ``k_rope``), and the attention output over
  ``c_kv`` is mapped through ``W_UV``. The scores equal those against the decompressed keys.
* ``qk_projections``: the linear maps from the attention input ``h`` to each query head and each cached
  key head, in the space relevancy is computed in, whatever the module layout: separate ``q_proj`` /
  ``k_proj``, a fused ``qkv_proj`` (Phi3), or MLA's ``q_proj`` | ``q_a_proj``+``q_b_proj`` and
  ``kv_a_proj_with_mqa`` (latent space; norms between the factors are left out). Used by DSA's indexer
  and seer's gates and by ``hetmem train``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetmem.errors import HetmemError


def text_config(config):
    """The decoder's config (a multimodal config's text part; a plain namespace as it is)."""
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if get is not None else config


def attention_modules(model) -> list:
    """The model's attention modules (those our attention function is called with), in layer order."""
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj")]
    mods = sorted(mods, key=lambda m: m.layer_idx)
    n = text_config(model.config).num_hidden_layers
    if len(mods) != n or [m.layer_idx for m in mods] != list(range(n)):
        raise HetmemError(f"model type '{getattr(model.config, 'model_type', '?')}': found {len(mods)} attention "
                          f"modules with an o_proj for {n} layers; hetmem cannot place its attention hook")
    return mods


def is_mla(module) -> bool:
    return hasattr(module, "kv_b_proj") and hasattr(module, "kv_a_proj_with_mqa")


@dataclass(frozen=True)
class AttentionArch:
    model_type: str
    n_layers: int
    windows: tuple[int | None, ...]  # sliding window per layer (None: full attention)
    kv_heads: int  # heads of the cached keys (1 for MLA's latent)
    key_dim: int  # dim of a cached key (MLA: kv_lora_rank + qk_rope_head_dim)
    value_dim: int  # dim of a cached value (MLA: kv_lora_rank)
    mla_rank: int | None = None  # kv_lora_rank for MLA, else None

    @property
    def sliding_layers(self) -> list[int]:
        return [i for i, w in enumerate(self.windows) if w is not None]


def layer_windows(config) -> tuple[int | None, ...]:
    """The sliding window of each layer, as transformers' own cache decides it (``get_layer_types_and_kwargs``)."""
    from transformers import PreTrainedConfig
    from transformers.cache_utils import get_layer_types_and_kwargs

    text = text_config(config)
    if not isinstance(text, PreTrainedConfig):  # a bare shape (profiling sweeps): one window for all, if any
        return (getattr(text, "sliding_window", None),) * text.num_hidden_layers
    types, kwargs = get_layer_types_and_kwargs(text)
    return tuple(kw.get("sliding_window") if t == "sliding_attention" else None for t, kw in zip(types, kwargs))


def describe(model) -> AttentionArch:
    cfg = text_config(model.config)
    mods = attention_modules(model)
    m = mods[0]
    if is_mla(m):
        r, dr = m.kv_lora_rank, m.qk_rope_head_dim
        kv, dk, dv, mla = 1, r + dr, r, r
    else:
        head_dim = getattr(m, "head_dim", None) or getattr(cfg, "head_dim", None) \
            or cfg.hidden_size // cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        dk = dv = head_dim
        mla = None
    return AttentionArch(getattr(cfg, "model_type", "?"), len(mods), layer_windows(model.config), kv, dk, dv, mla)


# -- MLA, absorbed ----------------------------------------------------------------------------------------------
def mla_absorb(module) -> tuple[torch.Tensor, torch.Tensor]:
    """``W_UK [H, d_nope, r]`` and ``W_UV [H, d_v, r]`` from ``kv_b_proj`` (rows: per head, nope then v)."""
    H, dn, dv = module.num_heads, module.qk_nope_head_dim, module.v_head_dim
    w = module.kv_b_proj.weight.reshape(H, dn + dv, -1)
    return w[:, :dn], w[:, dn:]


def mla_latent_query(module, query: torch.Tensor, w_uk: torch.Tensor | None = None) -> torch.Tensor:
    """``query [B, H, T, d_nope + d_rope]`` -> latent queries ``[B, H, T, r + d_rope]`` (``q_nope W_UK ++ q_rope``)."""
    w_uk = mla_absorb(module)[0] if w_uk is None else w_uk
    dn = module.qk_nope_head_dim
    q_nope, q_rope = query[..., :dn], query[..., dn:]
    q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk.to(query.dtype))
    return torch.cat([q_lat, q_rope], dim=-1)


def mla_output(out_latent: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
    """Attention output over ``c_kv`` ``[B, H, T, r]`` -> per-head values ``[B, H, T, d_v]``."""
    return torch.einsum("bhtr,hvr->bhtv", out_latent, w_uv.to(out_latent.dtype))


# -- q/k projections ---------------------------------------------------------------------------------------------
def _wb(linear, rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    w = linear.weight.detach().float().cpu()
    b = linear.bias.detach().float().cpu() if getattr(linear, "bias", None) is not None else torch.zeros(w.shape[0])
    if rows is not None:
        w, b = w[rows], b[rows]
    return w, b


def qk_projections(module, config) -> dict[str, torch.Tensor]:
    """Linear maps from the attention input ``h [hidden]`` to pre-RoPE queries and cached keys, per head:
    ``wq [H, d, hidden]``, ``bq [H, d]``, ``wk [H_kv, d, hidden]``, ``bk [H_kv, d]`` (float32, on the CPU).

    ``d`` is the head dim, or for MLA the latent rank ``r``: query head ``i`` is ``W_UK_i^T q_nope_i`` (its
    score against ``c_kv``) and the key is ``c_kv`` before its RMSNorm. Norms inside a projection (q/k norm,
    MLA's ``q_a_layernorm``) and RoPE are left out: these are starting points that training adapts.
    """
    cfg = text_config(config)
    H = cfg.num_attention_heads
    if is_mla(module):
        dn, r = module.qk_nope_head_dim, module.kv_lora_rank
        qd = module.qk_head_dim
        if getattr(module, "q_proj", None) is not None:
            wq, bq = _wb(module.q_proj)
        else:  # low-rank q: q_b_proj(q_a_layernorm(q_a_proj(h))), the norm left out
            wa, ba = _wb(module.q_a_proj)
            wb, bb = _wb(module.q_b_proj)
            wq, bq = wb @ wa, wb @ ba + bb
        wq = wq.reshape(H, qd, -1)[:, :dn]
        bq = bq.reshape(H, qd)[:, :dn]
        w_uk = mla_absorb(module)[0].detach().float().cpu()  # [H, dn, r]
        wq_lat = torch.einsum("hdr,hdx->hrx", w_uk, wq)
        bq_lat = torch.einsum("hdr,hd->hr", w_uk, bq)
        wk, bk = _wb(module.kv_a_proj_with_mqa, slice(0, r))
        return {"wq": wq_lat, "bq": bq_lat, "wk": wk.unsqueeze(0), "bk": bk.unsqueeze(0)}
    kv = getattr(cfg, "num_key_value_heads", None) or H
    d = getattr(module, "head_dim", None) or cfg.hidden_size // H
    if hasattr(module, "q_proj") and hasattr(module, "k_proj"):
        wq, bq = _wb(module.q_proj)
        wk, bk = _wb(module.k_proj)
    elif hasattr(module, "qkv_proj"):  # fused (Phi3): rows are [q (H*d) | k (kv*d) | v (kv*d)]
        wq, bq = _wb(module.qkv_proj, slice(0, H * d))
        wk, bk = _wb(module.qkv_proj, slice(H * d, (H + kv) * d))
    else:
        raise HetmemError(f"model type '{getattr(cfg, 'model_type', '?')}': no q/k projections found in "
                          f"{type(module).__name__}")
    hidden = wq.shape[1]
    return {"wq": wq.reshape(H, d, hidden), "bq": bq.reshape(H, d),
            "wk": wk.reshape(kv, d, hidden), "bk": bk.reshape(kv, d)}
