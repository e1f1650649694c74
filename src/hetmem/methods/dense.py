"""``dense``: the baseline. No memory preparation, no selection; Apply attends over every token."""

from __future__ import annotations

from dataclasses import dataclass

from hetmem.core.pipeline import MemoryPipeline
from hetmem.core.types import DecodeTarget
from hetmem.methods.base import Method, register
from hetmem.ops.sparse_attention import grouped_decode_attention


@dataclass
class DenseAttentionApply:
    """Apply: decode attention over the whole KV cache (the layer's buffer up to its length)."""

    device: str = "cpu"
    name: str = "dense-attention"

    def apply(self, raw, selection, target: DecodeTarget):
        L = raw.length
        return grouped_decode_attention(target.q, raw.buf_k[:, :, :L], raw.buf_v[:, :, :L], target.scale)


@register
@dataclass
class Dense(Method):
    name = "dense"
    family = "baseline"
    summary = "full attention over the whole context (the baseline)"

    def pipeline(self, device, timer, layer_idx: int = 0):
        return MemoryPipeline(None, None, None, DenseAttentionApply(device), timer)
