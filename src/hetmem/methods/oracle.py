"""``oracle``: exact top-k tokens by true attention -- the upper bound every relevancy estimator is compared with.

    Prepare    nothing to summarise: relevancy reads the exact keys of the layer's cache
    Relevancy  true decode attention per token (softmax of q.k), averaged over each GQA group  (ops.attention_mass)
    Retrieval  the top ``budget`` tokens per KV head                                           (ops.topk)
    Apply      gather the selected tokens' K and V and attend over only those                   (ops.token_gather)

It needs the dense scores, so it saves no relevancy work; it is the accuracy reference, not a speed-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hetmem.core.pipeline import MemoryPipeline
from hetmem.core.registry import register_impl
from hetmem.core.types import Memory, Query, Scores, Selection
from hetmem.errors import HetmemError
from hetmem.methods.base import Method, param, register
from hetmem.methods.shared import GatherAttention
from hetmem.ops import counts as C
from hetmem.ops.attention_mass import attention_probs
from hetmem.ops.topk import topk_indices


@register_impl("exact-keys", role="prepare")
@dataclass
class ExactKeysPrepare:
    """Prepare: the memory is the layer's exact key cache itself (nothing is computed)."""

    device: str = "cpu"
    name: str = "exact-keys"

    def prepare(self, raw, memory: Memory | None = None) -> Memory:
        layer, start, end = raw
        memory = memory or Memory(kind="exact-keys", unit_size=1)
        memory.meta["layer"] = layer
        memory.n_units = layer.length
        memory.meta["length"] = layer.length
        return memory


@register_impl("true-attention", role="relevancy")
@dataclass
class TrueAttentionRelevancy:
    """Relevancy: the real attention probability of every cached token (GQA group mean)."""

    device: str = "cpu"
    name: str = "true-attention"

    def score(self, memory: Memory, query: Query) -> Scores:
        layer = memory.meta["layer"]
        L, ws = layer.length, memory.meta.get("window_start", 0)
        scale = query.meta.get("scale", query.vectors.shape[-1] ** -0.5)
        probs = attention_probs(query.vectors, layer.buf_k[:, :, ws:L], scale, softcap=query.meta.get("softcap"),
                                sinks=query.meta.get("sinks"))
        return Scores(probs.mean(dim=2), offset=ws)


@register_impl("token-topk", role="retrieval")
@dataclass
class TokenTopK:
    """Retrieval: the ``budget`` highest-scoring tokens per KV head (all of them when they fit)."""

    budget: int
    device: str = "cpu"
    name: str = "token-topk"

    def select(self, scores: Scores, memory: Memory) -> Selection:
        L = memory.meta["length"]
        idx = topk_indices(scores.values, self.budget) + scores.offset
        return Selection(indices=idx, n_units=L, unit_size=1, length=L, start=memory.meta.get("window_start", 0))

    def op_counts(self, scores, memory):
        v = scores.values
        return {"retrieval": [C.topk(math.prod(v.shape[:-1]), v.shape[-1], self.budget)]}


@register
@dataclass
class Oracle(Method):
    name = "oracle"
    family = "sparse-attention"
    summary = "exact top-k tokens by true attention (the accuracy upper bound; needs dense scores)"

    budget: int = param(1024, "tokens attended per decode step (the exact top tokens by true attention)", low=1)

    def validate(self) -> None:
        if self.budget < 1:
            raise HetmemError(f"--budget must be at least 1 (got {self.budget})")

    def pipeline(self, device, timer, layer_idx: int = 0):
        return MemoryPipeline(ExactKeysPrepare(device), TrueAttentionRelevancy(device), TokenTopK(self.budget, device),
                              GatherAttention(device), timer)
