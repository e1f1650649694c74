"""Steps shared by several attention methods. Method files import from here (and from base.py), never from
each other: the independence contract in pyproject.toml checks that.

    DenseAttentionApply  Apply of the dense baseline, and of any layer a method keeps dense
    GatherAttention      Apply of every top-k selection: gather the selected pages/tokens of K and V (one
                         index_select per tensor) and attend over only those; with everything selected it
                         slices instead of gathering
"""

from __future__ import annotations

from dataclasses import dataclass

from hetmem.core.pipeline import MemoryPipeline
from hetmem.core.registry import register_impl
from hetmem.core.timer import substep
from hetmem.core.types import DecodeTarget, PrefillTarget, Selection
from hetmem.llm.arch import describe
from hetmem.ops import counts as C
from hetmem.ops.sparse_attention import (dense_decode_attention, gather_selected_kv, grouped_decode_attention,
                                         paged_decode_attention, paged_in_place, window_valid)


def model_dims(model) -> tuple[int, int, int]:
    """(layers, cached KV heads, cached key dim) of a transformers causal LM (``llm.arch.describe``: for MLA
    one latent head of dim kv_lora_rank + qk_rope_head_dim, which is where gates and indexers act)."""
    a = describe(model)
    return a.n_layers, a.kv_heads, a.key_dim


class DensePrefill:
    """Prefill of an in-model Apply step: the chunk's causal attention over every key, exactly as the model's
    own attention computes it (decode-time methods select only in decode; compressed-KV methods evict then)."""

    def prefill(self, raw, target: PrefillTarget):
        return target.dense()


@register_impl("dense-attention", role="apply")
@dataclass
class DenseAttentionApply(DensePrefill):
    """Apply: decode attention over the whole KV cache (the layer's buffer up to its length; on a
    sliding-window layer, the tokens inside the window)."""

    device: str = "cpu"
    name: str = "dense-attention"

    def apply(self, raw, selection, target: DecodeTarget):
        return dense_decode_attention(target.q, raw.buf_k, raw.buf_v, raw.window_start, raw.length,
                                      getattr(raw, "page_size", 16),
                                      target.scale, softcap=target.softcap, sinks=target.sinks)

    def op_counts(self, raw, selection, target):
        B, Hkv, G, D = target.q.shape
        return {"apply": [C.decode_attention(B, Hkv, G, raw.length - raw.window_start, D, raw.buf_k.element_size())]}


def dense_pipeline(device: str, timer) -> MemoryPipeline:
    """The pipeline of a layer a sparse method keeps dense: no memory, no selection, full attention."""
    return MemoryPipeline(None, None, None, DenseAttentionApply(device), timer)


@register_impl("gather-attention", role="apply")
@dataclass
class GatherAttention(DensePrefill):
    """Apply: attend over only the selected units' K and V (pages of ``selection.unit_size`` tokens, or single
    tokens). With the compiled ops (``ops.fast``) they are read in place from the cache buffers; otherwise they
    are gathered first (timed as ``apply.gather``) and attended with SDPA."""

    device: str = "cpu"
    name: str = "gather-attention"

    def apply(self, raw, selection: Selection, target: DecodeTarget):
        L, P, ws = selection.length, selection.unit_size, selection.start
        if selection.indices.shape[-1] >= selection.n_units - ws // P:  # everything selected: no gather needed
            return dense_decode_attention(target.q, raw.buf_k, raw.buf_v, ws, L, P, target.scale,
                                          softcap=target.softcap, sinks=target.sinks)
        out = paged_decode_attention(target.q, raw.buf_k, raw.buf_v, selection.indices, P, ws, L, target.scale,
                                     softcap=target.softcap, sinks=target.sinks)
        if out is not None:  # in place: the selected pages are read from the cache, never copied
            return out
        with substep("gather", self.device):  # timed as apply.gather (inside apply)
            k, v = gather_selected_kv(raw.buf_k, raw.buf_v, selection.indices, P, L)
        valid = window_valid(selection.indices, P, ws, k.shape[2])  # a window's partial first page
        return grouped_decode_attention(target.q, k, v, target.scale, softcap=target.softcap, sinks=target.sinks,
                                        valid=valid)

    def op_counts(self, raw, selection, target):
        B, Hkv, G, D = target.q.shape
        e = raw.buf_k.element_size()
        k = selection.indices.shape[-1]
        if k >= selection.n_units - selection.start // selection.unit_size:
            return {"apply": [C.decode_attention(B, Hkv, G, selection.length - selection.start, D, e)]}
        if paged_in_place(target.q, raw.buf_k, raw.buf_v):  # read in place: no gather
            return {"apply": [C.decode_attention(B, Hkv, G, selection.selected_tokens, D, e)]}
        return gather_attention_counts(B, Hkv, G, D, e, selection.selected_tokens, k)


def gather_attention_counts(B: int, Hkv: int, G: int, D: int, e: int, n_tokens: int, n_index: int) -> dict:
    """Op counts of gathering ``n_tokens`` tokens (``n_index`` indices) of K and V, then attending over them."""
    g = C.gather_pages(B, Hkv, n_tokens, D, n_index, e)
    return {"apply": [g, C.decode_attention(B, Hkv, G, n_tokens, D, e)], "apply.gather": [g]}
