"""The attention hook: one function registered through transformers' public ``AttentionInterface``.

Models loaded normally are switched to it with ``model.set_attn_implementation("hetmem")``. While no
hetmem run is active it computes what the model's own attention computes: SDPA, or, for what SDPA
cannot do (Gemma2's logit soft-capping, gpt-oss-style sinks), the same arithmetic as transformers'
eager attention. Inside ``SparseRuntime.activate()`` every attention layer, in decode, runs the method's
Compute Relevancy and Retrieval on its layer's paged memory and then Apply (attention over only the
gathered pages). Prefill stays dense (its attention is timed as Apply).

What the model passes is honoured: its ``scaling`` (``query_pre_attn_scalar``, ``attention_multiplier``,
MLA's mscale), ``softcap``, sinks (``s_aux``) and ``sliding_window`` (checked against the cache layer,
which keeps the window: see ``paged_cache``). MLA layers attend on the latent cache with absorbed
projections (``arch``).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from hetmem.core.types import DecodeTarget, PrefillTarget, Query
from hetmem.errors import HetmemError
from hetmem.llm.arch import attention_modules, mla_absorb, mla_latent_query, mla_output
from hetmem.ops.sparse_attention import prefill_attention

ATTN_NAME = "hetmem"
_ACTIVE: ContextVar["SparseRuntime | None"] = ContextVar("hetmem_runtime", default=None)

__all__ = ["ATTN_NAME", "SparseRuntime", "attention_modules", "capture_hidden", "dense_attention", "install"]


def _sinks(kwargs) -> torch.Tensor | None:
    return kwargs.get("s_aux", kwargs.get("sinks"))


def dense_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Full attention exactly as the model's own attention function would compute it (K/V stored in another
    dtype, ``PagedKVLayer.kv_dtype``, are cast to the query's first)."""
    if key.dtype != query.dtype:
        key, value = key.to(query.dtype), value.to(query.dtype)
    softcap, sinks = kwargs.pop("softcap", None), kwargs.pop("s_aux", None)
    sinks = kwargs.pop("sinks", sinks)
    if softcap is None and sinks is None:
        if (query.device.type == "cpu" and attention_mask is not None and key.shape[1] != query.shape[1]
                and kwargs.get("position_bias") is None):
            # Prefill with a mask: transformers would repeat K/V to every query head first (a full-context copy
            # per layer); the CPU kernel takes the groups itself, with the same result.
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                                 scale=scaling, enable_gqa=True)
            return out.transpose(1, 2).contiguous(), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return prefill_attention(query, key, value, attention_mask, scale, softcap=softcap, sinks=sinks), None


def hetmem_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    rt = _ACTIVE.get()
    if rt is None:
        return dense_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    return rt.attend(module, query, key, value, attention_mask, scaling, **kwargs)


AttentionInterface.register(ATTN_NAME, hetmem_attention)
AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def install(model) -> None:
    """Route the model's attention through hetmem (idempotent)."""
    if getattr(model.config, "_attn_implementation", None) != ATTN_NAME:
        model.set_attn_implementation(ATTN_NAME)


def capture_hidden(model, cache) -> list:
    """Forward pre-hooks that hand each attention module's input hidden state to its cache layer
    (``layer.hidden``), for methods whose memory is computed from it (the DSA indexer). Returns the
    hook handles; remove them when done."""

    def hook(module, args, kwargs):
        hs = kwargs.get("hidden_states", args[0] if args else None)
        cache.layers[module.layer_idx].hidden = hs

    return [m.register_forward_pre_hook(hook, with_kwargs=True) for m in attention_modules(model)]


def check_window(module, layer, kwargs) -> None:
    """The model's own ``sliding_window`` for this call must be the cache layer's window."""
    w = kwargs.get("sliding_window")
    if w != layer.sliding_window:
        raise HetmemError(f"model type '{module.config.model_type}' layer {module.layer_idx}: the model attends with "
                          f"sliding_window={w}, hetmem's cache layer with {layer.sliding_window}")


class SparseRuntime:
    """Binds a paged cache (whose layers hold the per-layer pipelines) to the attention hook."""

    def __init__(self, cache, device: str = "cpu", recall=None):
        self.cache = cache
        self.device = device
        self.recall = recall  # a RecallMeter measuring each decode selection's attention-mass recall, or None
        self.prefill = False  # set while prefilling: then even a 1-token chunk is prefill (dense), not decode
        self._mla: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @contextmanager
    def activate(self):
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

    def mla_weights(self, module) -> tuple[torch.Tensor, torch.Tensor]:
        w = self._mla.get(module.layer_idx)
        if w is None:
            w = self._mla[module.layer_idx] = tuple(t.detach() for t in mla_absorb(module))
        return w

    def latent_query(self, module, layer, query):
        """The query in the space of what the layer caches (MLA: absorbed into latent space)."""
        if layer.mla_rank is None:
            return query
        return mla_latent_query(module, query, self.mla_weights(module)[0])

    def attend(self, module, query, key, value, attention_mask, scaling, **kwargs):
        layer = self.cache.layers[module.layer_idx]
        check_window(module, layer, kwargs)
        pipe = layer.pipeline
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        softcap, sinks = kwargs.get("softcap"), _sinks(kwargs)
        if query.shape[2] != 1 or self.prefill or pipe is None:
            # Prefill (and any multi-token step): dense causal attention, timed as Apply.
            if pipe is None:
                return dense_attention(module, query, key, value, attention_mask, scaling=scale, **kwargs)
            target = PrefillTarget(lambda: dense_attention(module, query, key, value, attention_mask, scaling=scale,
                                                           **kwargs))
            out = pipe.prefill_apply(layer, target)  # the method's Apply step, timed as apply
            observe = getattr(pipe.prepare, "observe", None)
            if observe is not None:  # Prepare steps that learn from prefill queries (H2O, SnapKV)
                with pipe.timer.step("prepare", self.device):
                    observe(layer, self.latent_query(module, layer, query), scale)
            return out
        B, H, _, _ = query.shape
        qc = self.latent_query(module, layer, query)  # [B, H, 1, Dk of the cache]
        Hkv = layer.buf_k.shape[1] if layer.buf_k is not None else layer.kv_shape[1]
        G = H // Hkv
        q = qc.reshape(B, Hkv, G, qc.shape[-1])  # [B, H_kv, G, D]: GQA groups, K/V never repeated
        sk = sinks.reshape(Hkv, G) if sinks is not None else None
        query_obj = Query(vectors=q, meta={"hidden": layer.hidden, "layer": module.layer_idx, "scale": scale,
                                           "softcap": softcap, "sinks": sk})
        target = DecodeTarget(q, scale, softcap=softcap, sinks=sk)
        out = pipe.query_and_apply(layer.memory, query_obj, layer, target)  # [B, H_kv, G, Dv of the cache]
        if self.recall is not None:
            self.recall.measure(module.layer_idx, target, layer, getattr(pipe, "last_selection", None))
        out = out.reshape(B, H, 1, -1)
        if layer.mla_rank is not None:
            out = mla_output(out, self.mla_weights(module)[1])
        return out.transpose(1, 2), None
