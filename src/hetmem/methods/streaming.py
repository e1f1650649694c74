"""``streaming``: StreamingLLM's Lambda-shaped memory -- attention sinks + a local window; the rest is evicted.

    Prepare    track the tokens stored (no summary needed: position alone decides)
    Relevancy  none beyond position: sink tokens and the most recent ones rank first
    Retrieval  keep-set: the first ``sink`` tokens and the last ``budget - sink``   (ops.evict)
    Apply      evict everything else from the KV cache (memory shrinks), attend over what is kept

Eviction happens in decode: the first decode step compresses the prompt's cache to ``budget`` tokens and
every later step keeps it there. Prefill itself is dense over the whole prompt. The shared steps
(``EvictAttend`` and ``KeepSetRetrieval``, in methods/compressed.py) are reused by h2o and snapkv.
"""

from __future__ import annotations

from dataclasses import dataclass

from hetmem.core.pipeline import MemoryPipeline
from hetmem.core.registry import register_impl
from hetmem.core.types import Memory, Query, Scores
from hetmem.errors import HetmemError
from hetmem.methods.base import param, register
from hetmem.methods.compressed import CompressedMethod, EvictAttend, KeepSetRetrieval, LeadPrepare
from hetmem.methods.shared import dense_pipeline


@register_impl("position", role="relevancy")
@dataclass
class PositionRelevancy:
    """Relevancy: nothing to rank between the sink and the window (StreamingLLM keeps by position)."""

    device: str = "cpu"
    name: str = "position"

    def score(self, memory: Memory, query: Query) -> Scores | None:
        return None


@register
@dataclass
class Streaming(CompressedMethod):
    name = "streaming"
    family = "compressed-kv"
    summary = "StreamingLLM (Lambda shape): keep sink tokens + a recent window, evict the rest"

    budget: int = param(1024, "tokens kept in the KV cache (sink + recent window)", low=2)
    sink: int = param(4, "first tokens always kept (attention sinks)", low=0)

    def validate(self) -> None:
        if self.sink < 0 or self.budget <= self.sink:
            raise HetmemError(f"streaming needs 0 <= --sink < --budget (got sink={self.sink}, budget={self.budget})")

    def pipeline(self, device, timer, layer_idx: int = 0):
        if self.window_layer(layer_idx):
            return dense_pipeline(device, timer)
        return MemoryPipeline(LeadPrepare(device), PositionRelevancy(device),
                              KeepSetRetrieval(self.budget, self.sink, self.budget - self.sink, device),
                              EvictAttend(device), timer)
