"""The attention hook: one function registered through transformers' public ``AttentionInterface``.

Models loaded normally are switched to it with ``model.set_attn_implementation("hetmem")``. While no
hetmem run is active it is plain SDPA. Inside ``SparseRuntime.activate()`` every attention layer, in
decode, runs the method's Compute Relevancy and Retrieval on its layer's paged memory and then Apply
(attention over only the gathered pages). Prefill stays dense (its attention is timed as Apply).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from hetmem.core.types import DecodeTarget, Query

ATTN_NAME = "hetmem"
_ACTIVE: ContextVar["SparseRuntime | None"] = ContextVar("hetmem_runtime", default=None)


def hetmem_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    rt = _ACTIVE.get()
    if rt is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    return rt.attend(module, query, key, value, attention_mask, scaling, **kwargs)


AttentionInterface.register(ATTN_NAME, hetmem_attention)
AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def install(model) -> None:
    """Route the model's attention through hetmem (idempotent)."""
    if getattr(model.config, "_attn_implementation", None) != ATTN_NAME:
        model.set_attn_implementation(ATTN_NAME)


def attention_modules(model) -> list:
    """The model's attention modules (those our attention function is called with), in layer order."""
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")]
    return sorted(mods, key=lambda m: m.layer_idx)


def capture_hidden(model, cache) -> list:
    """Forward pre-hooks that hand each attention module's input hidden state to its cache layer
    (``layer.hidden``), for methods whose memory is computed from it (the DSA indexer). Returns the
    hook handles; remove them when done."""

    def hook(module, args, kwargs):
        hs = kwargs.get("hidden_states", args[0] if args else None)
        cache.layers[module.layer_idx].hidden = hs

    return [m.register_forward_pre_hook(hook, with_kwargs=True) for m in attention_modules(model)]


class SparseRuntime:
    """Binds a paged cache (whose layers hold the per-layer pipelines) to the attention hook."""

    def __init__(self, cache, device: str = "cpu", recall=None):
        self.cache = cache
        self.device = device
        self.recall = recall  # a RecallMeter measuring each decode selection's attention-mass recall, or None
        self.prefill = False  # set while prefilling: then even a 1-token chunk is prefill (dense), not decode

    @contextmanager
    def activate(self):
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

    def attend(self, module, query, key, value, attention_mask, scaling, **kwargs):
        layer = self.cache.layers[module.layer_idx]
        pipe = layer.pipeline
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if query.shape[2] != 1 or self.prefill or pipe is None:
            # Prefill (and any multi-token step): dense causal attention, timed as Apply.
            if pipe is None:
                return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scale, **kwargs)
            with pipe.timer.step("apply", self.device):
                out = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scale, **kwargs)
            observe = getattr(pipe.prepare, "observe", None)
            if observe is not None:  # Prepare steps that learn from prefill queries (H2O, SnapKV)
                with pipe.timer.step("prepare", self.device):
                    observe(layer, query, scale)
            return out
        B, H, _, D = query.shape
        Hkv = key.shape[1]
        q = query.reshape(B, Hkv, H // Hkv, D)  # [B, H_kv, G, D]: GQA groups, K/V never repeated
        query_obj = Query(vectors=q, meta={"hidden": layer.hidden, "layer": module.layer_idx, "scale": scale})
        out = pipe.query_and_apply(layer.memory, query_obj, layer, DecodeTarget(q, scale))
        if self.recall is not None:
            self.recall.measure(module.layer_idx, q, layer, getattr(pipe, "last_selection", None), scale)
        return out.reshape(B, H, 1, -1).transpose(1, 2), None
