"""Steps shared by the compressed-KV methods (streaming, h2o, snapkv): they keep a bounded set of tokens
and evict the rest from the KV cache. Each method's own file adds what ranks the tokens.

    StoredTokensPrepare / LeadPrepare  the memory follows the layer's stored tokens
    KeepSetRetrieval                   sink + top-scored candidates + recent window, when over budget
    EvictAttend                        evict all but the keep-set (memory really shrinks), attend over the rest
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetmem.core.registry import register_impl
from hetmem.core.types import DecodeTarget, Memory, Scores, Selection
from hetmem.llm.arch import describe
from hetmem.methods.base import Method
from hetmem.methods.shared import DensePrefill
from hetmem.ops.evict import keep_indices
from hetmem.ops.sparse_attention import grouped_decode_attention


@register_impl("stored-tokens", role="prepare")
@dataclass
class StoredTokensPrepare:
    """Prepare: the memory just follows the layer's stored tokens."""

    device: str = "cpu"
    name: str = "stored-tokens"

    def prepare(self, raw, memory: Memory | None = None) -> Memory:
        layer, start, end = raw
        memory = memory or Memory(kind="kv-keep-set", unit_size=1)
        memory.n_units = layer.length
        memory.meta["length"] = layer.length
        memory.meta.setdefault("evicted", 0)
        return memory


@register_impl("keep-set", role="retrieval")
@dataclass
class KeepSetRetrieval:
    """Retrieval: the tokens to keep (sink + top-scored candidates + recent window) when the cache holds
    more than ``budget``; ``None`` (keep everything) otherwise."""

    budget: int
    sink: int
    recent: int
    device: str = "cpu"
    name: str = "keep-set"

    def select(self, scores: Scores | None, memory: Memory) -> Selection | None:
        L = memory.n_units
        if L <= self.budget:
            return None
        lead = tuple(memory.meta["lead"])
        vals = scores.values if scores is not None else None
        keep = keep_indices(vals, L, self.budget, self.sink, self.recent, lead, memory.meta.get("device"))
        return Selection(indices=keep, n_units=L, unit_size=1, length=L)


@register_impl("evict-attend", role="apply")
@dataclass
class EvictAttend(DensePrefill):
    """Apply: evict all but the keep-set from the KV cache (really freeing memory), then attend over the
    kept tokens. Per-token statistics the method keeps (``memory.tensors``) are compacted alongside."""

    device: str = "cpu"
    name: str = "evict-attend"

    def apply(self, raw, selection: Selection | None, target: DecodeTarget):
        mem = raw.memory
        if selection is not None:
            keep = selection.indices
            raw.compact(keep)
            for name, t in mem.tensors.items():  # [B, H_kv, cap] per-token statistics
                kept = torch.gather(t, 2, keep)
                if t.shape[2] > 2 * raw.capacity:
                    t = t.new_zeros(*t.shape[:2], raw.capacity)
                    mem.tensors[name] = t
                t[:, :, : keep.shape[-1]] = kept
            mem.meta["evicted"] = mem.meta.get("evicted", 0) + selection.length - keep.shape[-1]
            mem.n_units = mem.meta["length"] = raw.length
        L = raw.length
        return self.attend(mem, raw.buf_k[:, :, :L], raw.buf_v[:, :, :L], target)

    def attend(self, memory, k, v, target: DecodeTarget):
        return grouped_decode_attention(target.q, k, v, target.scale, softcap=target.softcap, sinks=target.sinks)


def lead_of(layer) -> tuple[int, int]:
    return tuple(layer.buf_k.shape[:2])


class CompressedMethod(Method):
    """Shared by the eviction methods: their reports (tokens evicted, KV bytes vs the dense cache).

    On a sliding-window layer the model's own window already bounds the memory (the layer keeps only its
    last W tokens): eviction runs on the full-attention layers, and window layers keep their window whole.
    """

    window_layers_dense = True

    def bind(self, model) -> None:
        self._windows = describe(model).windows

    def window_layer(self, layer_idx: int) -> bool:
        """A sliding-window layer: it keeps its window, with dense attention over it (no eviction)."""
        windows = getattr(self, "_windows", ())
        return layer_idx < len(windows) and windows[layer_idx] is not None

    def report(self, cache) -> dict:
        ev = [layer.memory.meta.get("evicted", 0) if layer.memory else 0 for layer in cache.layers]
        return {"tokens_evicted_per_layer_mean": round(sum(ev) / len(ev), 2)}


@register_impl("stored-tokens-lead", role="prepare")
@dataclass
class LeadPrepare(StoredTokensPrepare):
    """Prepare: the stored tokens, plus the (batch, KV heads) lead shape and device the keep-set needs."""

    def prepare(self, raw, memory=None):
        memory = super().prepare(raw, memory)
        memory.meta["lead"] = lead_of(raw[0])
        memory.meta["device"] = raw[0].buf_k.device
        return memory
