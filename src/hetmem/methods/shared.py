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
from hetmem.core.types import DecodeTarget, Selection
from hetmem.ops import counts as C
from hetmem.ops.sparse_attention import gather_selected_kv, grouped_decode_attention


def model_dims(model) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) of a transformers causal LM."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads, head_dim


@register_impl("dense-attention", role="apply")
@dataclass
class DenseAttentionApply:
    """Apply: decode attention over the whole KV cache (the layer's buffer up to its length)."""

    device: str = "cpu"
    name: str = "dense-attention"

    def apply(self, raw, selection, target: DecodeTarget):
        L = raw.length
        return grouped_decode_attention(target.q, raw.buf_k[:, :, :L], raw.buf_v[:, :, :L], target.scale)

    def op_counts(self, raw, selection, target):
        B, Hkv, G, D = target.q.shape
        return {"apply": [C.decode_attention(B, Hkv, G, raw.length, D, raw.buf_k.element_size())]}


def dense_pipeline(device: str, timer) -> MemoryPipeline:
    """The pipeline of a layer a sparse method keeps dense: no memory, no selection, full attention."""
    return MemoryPipeline(None, None, None, DenseAttentionApply(device), timer)


@register_impl("gather-attention", role="apply")
@dataclass
class GatherAttention:
    """Apply: gather the selected units' K and V (pages of ``selection.unit_size`` tokens, or single tokens)
    and attend over only those tokens. The gather is timed as ``apply.gather``."""

    device: str = "cpu"
    name: str = "gather-attention"

    def apply(self, raw, selection: Selection, target: DecodeTarget):
        L = selection.length
        if selection.indices.shape[-1] >= selection.n_units:  # everything selected: no gather needed
            k, v = raw.buf_k[:, :, :L], raw.buf_v[:, :, :L]
        else:
            with substep("gather", self.device):  # timed as apply.gather (inside apply)
                k, v = gather_selected_kv(raw.buf_k, raw.buf_v, selection.indices, selection.unit_size, L)
        return grouped_decode_attention(target.q, k, v, target.scale)

    def op_counts(self, raw, selection, target):
        B, Hkv, G, D = target.q.shape
        e = raw.buf_k.element_size()
        k = selection.indices.shape[-1]
        if k >= selection.n_units:
            return {"apply": [C.decode_attention(B, Hkv, G, selection.length, D, e)]}
        return gather_attention_counts(B, Hkv, G, D, e, selection.selected_tokens, k)


def gather_attention_counts(B: int, Hkv: int, G: int, D: int, e: int, n_tokens: int, n_index: int) -> dict:
    """Op counts of gathering ``n_tokens`` tokens (``n_index`` indices) of K and V, then attending over them."""
    g = C.gather_pages(B, Hkv, n_tokens, D, n_index, e)
    return {"apply": [g, C.decode_attention(B, Hkv, G, n_tokens, D, e)], "apply.gather": [g]}
