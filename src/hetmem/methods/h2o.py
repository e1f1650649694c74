"""``h2o``: Heavy-Hitter Oracle (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference
of Large Language Models", arXiv 2306.14048) -- keep the tokens that have received the most attention, plus a
recent window.

    Prepare    accumulated attention per cached token: prefill queries' attention mass (observed after
               each prefill chunk) plus, in decode, every step's attention; and each slot's token position
    Relevancy  the accumulated attention of the evictable slots (sink and recent window: never evicted)
    Retrieval  the lightest ``stored - budget`` slots are evicted; the rest is the keep-set      (ops.evict)
    Apply      evict, attend over the kept tokens and add this step's attention to their accumulators

Evicts during decode. The first decode step after a prompt longer than ``budget`` compacts the cache once
(a gather of the kept tokens). From then on the cache holds ``budget`` tokens and each step evicts one
token per KV head *in place*: the new token, appended in the spare slot, is moved into the evicted slot
(K, V, accumulator and position together), so a step moves one token, never the whole kept cache. Slots
are then no longer in position order; that is fine because keys are cached after RoPE and attention is
order-free, and the sink and recent window are found by each slot's stored position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetmem.core.pipeline import MemoryPipeline
from hetmem.core.registry import register_impl
from hetmem.core.types import Memory, Query, Scores, Selection
from hetmem.errors import HetmemError
from hetmem.methods.base import param, register
from hetmem.methods.compressed import CompressedMethod, EvictAttend, LeadPrepare
from hetmem.methods.shared import dense_pipeline
from hetmem.ops.evict import attention_column_mass, eviction_scores, lightest_slots, move_last_into
from hetmem.ops.sparse_attention import decode_probs


@register_impl("accumulated-attention", role="prepare")
@dataclass
class AccumulatedAttentionPrepare(LeadPrepare):
    name: str = "accumulated-attention"

    def prepare(self, raw, memory: Memory | None = None) -> Memory:
        layer, start, end = raw
        memory = super().prepare(raw, memory)
        t = memory.tensors
        if "acc" not in t:
            lead, dev = layer.buf_k.shape[:2], layer.buf_k.device
            t["acc"] = torch.zeros(*lead, layer.capacity, device=dev)
            t["pos"] = torch.zeros(*lead, layer.capacity, dtype=torch.int32, device=dev)  # token position per slot
        t["acc"][:, :, start:end] = 0
        t["pos"][:, :, start:end] = torch.arange(layer.seen - (end - start), layer.seen, dtype=torch.int32,
                                                 device=t["pos"].device)
        memory.meta["seen"] = layer.seen
        return memory

    def observe(self, layer, query, scale) -> None:
        """Prefill: add the attention each cached token received from this chunk's queries (the cache is in
        position order during prefill: eviction starts in decode)."""
        B, H, T, D = query.shape
        Hkv, L = layer.buf_k.shape[1], layer.length
        q = query.reshape(B, Hkv, H // Hkv, T, D)
        layer.memory.tensors["acc"][:, :, :L] += attention_column_mass(q, layer.buf_k[:, :, :L], scale, q_pos0=L - T)


@register_impl("heavy-hitter-score", role="relevancy")
@dataclass
class AccumulatedRelevancy:
    budget: int
    sink: int
    recent: int
    device: str = "cpu"
    name: str = "heavy-hitter-score"

    def score(self, memory: Memory, query: Query) -> Scores | None:
        L = memory.n_units
        if L <= self.budget:
            return None  # nothing to evict
        t = memory.tensors
        return Scores(eviction_scores(t["acc"][:, :, :L], t["pos"][:, :, :L], memory.meta["seen"], self.sink,
                                      self.recent))


@dataclass
class EvictionSelection(Selection):
    evicted: torch.Tensor | None = None  # [B, H_kv, n] slots to evict; ``bitmap`` marks the kept slots


@register_impl("evict-lightest", role="retrieval")
@dataclass
class EvictLightest:
    budget: int
    device: str = "cpu"
    name: str = "evict-lightest"

    def select(self, scores: Scores | None, memory: Memory) -> Selection | None:
        L = memory.n_units
        if scores is None or L <= self.budget:
            return None
        ev = lightest_slots(scores.values, L - self.budget)
        keep = torch.ones_like(scores.values, dtype=torch.bool).scatter_(-1, ev, False)
        return EvictionSelection(bitmap=keep, n_units=L, unit_size=1, length=L, evicted=ev)


@register_impl("evict-attend-accumulate", role="apply")
@dataclass
class H2OAttend(EvictAttend):
    name: str = "evict-attend-accumulate"

    def apply(self, raw, selection: Selection | None, target):
        if selection is not None and selection.evicted.shape[-1] == 1:  # steady state: evict one in place
            mem, last = raw.memory, raw.length - 1
            kv = [raw.buf_k] if raw.mla_rank is not None else [raw.buf_k, raw.buf_v]  # MLA: V is a view of K
            move_last_into([*kv, *mem.tensors.values()], selection.evicted, last)
            raw.length = last
            mem.meta["evicted"] = mem.meta.get("evicted", 0) + 1
            mem.n_units = mem.meta["length"] = last
            selection = None
        elif selection is not None:  # first compression of a long prompt: one gather of the kept tokens
            B, H, L = selection.bitmap.shape
            keep = selection.bitmap.nonzero()[:, -1].reshape(B, H, -1)  # sorted slot ids per row
            selection = Selection(indices=keep, n_units=L, unit_size=1, length=L)
        return super().apply(raw, selection, target)

    def attend(self, memory, k, v, target):
        probs = decode_probs(target.q.float(), k.float(), target.scale, softcap=target.softcap,
                             sinks=target.sinks)  # [B,H,G,S]
        memory.tensors["acc"][:, :, : k.shape[2]] += probs.sum(dim=2)
        return torch.matmul(probs, v.float()).to(target.q.dtype)


@register
@dataclass
class H2O(CompressedMethod):
    name = "h2o"
    family = "compressed-kv"
    summary = "H2O: keep heavy hitters by accumulated attention + a recent window, evicting in place during decode"

    budget: int = param(1024, "tokens kept in the KV cache (sink + heavy hitters + recent window)", low=1)
    heavy_ratio: float = param(0.5, "share of the budget for heavy hitters; the rest is the recent window", low=0.0, high=0.999)
    sink: int = param(0, "first tokens always kept", low=0)

    def validate(self) -> None:
        if not 0 <= self.heavy_ratio < 1:
            raise HetmemError(f"--heavy-ratio must be in [0, 1) (got {self.heavy_ratio})")
        if self.sink < 0 or self.budget < 1 or self.recent < 1:
            raise HetmemError("h2o needs --budget >= 1, --sink >= 0 and a recent window of at least one token")

    @property
    def recent(self) -> int:
        return self.budget - self.sink - int(self.budget * self.heavy_ratio)

    def pipeline(self, device, timer, layer_idx: int = 0):
        if self.window_layer(layer_idx):
            return dense_pipeline(device, timer)
        return MemoryPipeline(AccumulatedAttentionPrepare(device),
                              AccumulatedRelevancy(self.budget, self.sink, self.recent, device),
                              EvictLightest(self.budget, device), H2OAttend(device), timer)
