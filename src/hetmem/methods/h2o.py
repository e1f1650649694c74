"""``h2o``: Heavy-Hitter Oracle -- keep the tokens that have received the most attention, plus a recent window.

    Prepare    accumulated attention per cached token: prefill queries' attention mass (observed after
               each prefill chunk) plus, in decode, every step's attention              (ops.evict)
    Relevancy  the accumulated attention of the candidate tokens
    Retrieval  keep-set: top heavy hitters + the last ``budget - heavy`` tokens         (ops.evict)
    Apply      evict the rest from the KV cache (memory shrinks), attend over the kept tokens and add
               this step's attention to their accumulators

Evicts during decode: once the cache exceeds ``budget`` every step drops the lightest token(s).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetmem.core.pipeline import MemoryPipeline
from hetmem.core.registry import register_impl
from hetmem.core.types import Memory, Query, Scores
from hetmem.errors import HetmemError
from hetmem.methods.base import param, register
from hetmem.methods.compressed import CompressedMethod, EvictAttend, KeepSetRetrieval, LeadPrepare
from hetmem.methods.shared import dense_pipeline
from hetmem.ops.evict import attention_column_mass
from hetmem.ops.sparse_attention import decode_probs


@register_impl("accumulated-attention", role="prepare")
@dataclass
class AccumulatedAttentionPrepare(LeadPrepare):
    name: str = "accumulated-attention"

    def prepare(self, raw, memory: Memory | None = None) -> Memory:
        layer, start, end = raw
        memory = super().prepare(raw, memory)
        acc = memory.tensors.get("acc")
        if acc is None:
            acc = memory.tensors["acc"] = torch.zeros(*layer.buf_k.shape[:2], layer.capacity, device=layer.buf_k.device)
        acc[:, :, start:end] = 0
        return memory

    def observe(self, layer, query, scale) -> None:
        """Prefill: add the attention each cached token received from this chunk's queries."""
        B, H, T, D = query.shape
        Hkv, L = layer.buf_k.shape[1], layer.length
        q = query.reshape(B, Hkv, H // Hkv, T, D)
        layer.memory.tensors["acc"][:, :, :L] += attention_column_mass(q, layer.buf_k[:, :, :L], scale, q_pos0=L - T)


@register_impl("heavy-hitter-score", role="relevancy")
@dataclass
class AccumulatedRelevancy:
    sink: int
    recent: int
    device: str = "cpu"
    name: str = "heavy-hitter-score"

    def score(self, memory: Memory, query: Query) -> Scores:
        L = memory.n_units
        return Scores(memory.tensors["acc"][:, :, self.sink : max(self.sink, L - self.recent)], offset=self.sink)


@register_impl("evict-attend-accumulate", role="apply")
@dataclass
class H2OAttend(EvictAttend):
    name: str = "evict-attend-accumulate"

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
    summary = "H2O: keep heavy hitters by accumulated attention + a recent window, evicting during decode"

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
        return MemoryPipeline(AccumulatedAttentionPrepare(device), AccumulatedRelevancy(self.sink, self.recent, device),
                              KeepSetRetrieval(self.budget, self.sink, self.recent, device), H2OAttend(device), timer)
