"""``dense``: the baseline. No memory preparation, no selection; Apply attends over every token."""

from __future__ import annotations

from dataclasses import dataclass

from hetmem.core.pipeline import MemoryPipeline
from hetmem.core.types import DecodeTarget
from hetmem.methods.base import Method, register
from hetmem.ops.sparse_attention import grouped_decode_attention


@dataclass
class DenseAttentionApply:
    """Apply: decode attention over the whole KV cache (the layer's buffer up to its length; on a
    sliding-window layer, the tokens inside the window)."""

    device: str = "cpu"
    name: str = "dense-attention"

    def apply(self, raw, selection, target: DecodeTarget):
        L, ws = raw.length, raw.window_start
        return grouped_decode_attention(target.q, raw.buf_k[:, :, ws:L], raw.buf_v[:, :, ws:L], target.scale,
                                        softcap=target.softcap, sinks=target.sinks)


@register
@dataclass
class Dense(Method):
    name = "dense"
    family = "baseline"
    summary = "full attention over the whole context (the baseline)"

    def pipeline(self, device, timer, layer_idx: int = 0):
        return MemoryPipeline(None, None, None, DenseAttentionApply(device), timer)
