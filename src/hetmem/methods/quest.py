"""``quest``: page-level sparse attention in decode (Quest; LServe's page selection).

    Prepare    per-page elementwise key min/max, kept current in prefill and decode  (ops.page_minmax)
    Relevancy  upper bound of q.k per page, per KV head, max over its GQA group       (ops.page_score)
    Retrieval  top pages under a token budget; sink page and recent page(s) always in  (ops.topk)
    Apply      gather the selected pages of K/V, attend over only those               (methods.shared.GatherAttention)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hetmem.core.pipeline import MemoryPipeline
from hetmem.core.registry import register_impl
from hetmem.core.types import Memory, Query, Scores, Selection
from hetmem.errors import HetmemError
from hetmem.methods.base import Method, param, register
from hetmem.methods.shared import GatherAttention, dense_pipeline
from hetmem.ops import counts as C
from hetmem.ops.page_minmax import update_page_minmax
from hetmem.ops.page_score import quest_upper_bound
from hetmem.ops.topk import budget_page_indices, candidate_range


@register_impl("page-minmax", role="prepare")
@dataclass
class PageMinMaxPrepare:
    """Prepare: raw = (paged layer, start, end) of the tokens just written."""

    page_size: int
    device: str = "cpu"
    name: str = "page-minmax"

    def prepare(self, raw, memory: Memory | None = None) -> Memory:
        layer, start, end = raw
        n_cap = layer.capacity // self.page_size
        if memory is None:
            B, H, _, D = layer.buf_k.shape
            shape = (B, H, n_cap, D)
            memory = Memory(
                kind="page-minmax",
                tensors={"kmin": layer.buf_k.new_empty(shape), "kmax": layer.buf_k.new_empty(shape)},
                unit_size=self.page_size,
            )
        update_page_minmax(memory.tensors["kmin"], memory.tensors["kmax"], layer.buf_k, start, end, self.page_size)
        memory.n_units = -(-end // self.page_size)
        memory.meta["length"] = end
        return memory

    def op_counts(self, raw, memory=None):
        layer, start, end = raw
        B, H, _, D = layer.buf_k.shape
        return {"prepare": [C.page_minmax_update(B, H, D, start, end, self.page_size, layer.buf_k.element_size())]}


@register_impl("quest-score", role="relevancy")
@dataclass
class QuestRelevancy:
    """Relevancy: Quest upper bound for the candidate pages (between the sink and the recent window)."""

    sink_pages: int
    recent_pages: int
    budget_pages: int
    device: str = "cpu"
    name: str = "quest-upper-bound"

    def score(self, memory: Memory, query: Query) -> Scores:
        first = memory.meta.get("window_start", 0) // memory.unit_size  # a sliding window's first page
        lo, hi = candidate_range(memory.n_units, self.sink_pages, self.recent_pages, self.budget_pages, first)
        kmin = memory.tensors["kmin"][:, :, lo:hi]
        kmax = memory.tensors["kmax"][:, :, lo:hi]
        return Scores(quest_upper_bound(query.vectors, kmin, kmax), offset=lo)

    def op_counts(self, memory, query):
        first = memory.meta.get("window_start", 0) // memory.unit_size
        lo, hi = candidate_range(memory.n_units, self.sink_pages, self.recent_pages, self.budget_pages, first)
        B, Hkv, G, D = query.vectors.shape
        return {"relevancy": [C.quest_upper_bound(B, Hkv, G, hi - lo, D, memory.tensors["kmin"].element_size())]}


@register_impl("page-topk", role="retrieval")
@dataclass
class PageBudgetTopK:
    """Retrieval: ``budget_pages`` pages per KV head = sink + top-k candidates + recent window."""

    budget_pages: int
    sink_pages: int
    recent_pages: int
    device: str = "cpu"
    name: str = "page-topk"

    def select(self, scores: Scores, memory: Memory) -> Selection:
        n, ws = memory.n_units, memory.meta.get("window_start", 0)
        idx = budget_page_indices(
            scores.values, scores.offset, n, self.budget_pages, self.sink_pages, self.recent_pages,
            ws // memory.unit_size,
        )
        return Selection(indices=idx, n_units=n, unit_size=memory.unit_size, length=memory.meta["length"], start=ws)

    def op_counts(self, scores, memory):
        v = scores.values
        return {"retrieval": C.budget_page_indices(math.prod(v.shape[:-1]), v.shape[-1], memory.n_units,
                                                   self.budget_pages, self.sink_pages, self.recent_pages)}


@register
@dataclass
class Quest(Method):
    name = "quest"
    family = "sparse-attention"
    low_precision_kv = True  # its steps read the cache through ops.sparse_attention (--kv-dtype bf16|fp16)
    summary = "page min/max upper-bound scoring, top pages under a token budget (Quest/LServe)"

    budget: int = param(1024, "tokens attended per decode step, in whole pages (sink and recent pages included)", low=1)
    page_size: int = param(16, "tokens per page", low=1)
    sink_pages: int = param(1, "first pages always selected", low=0)
    recent_pages: int = param(1, "most recent pages always selected", low=1)
    dense_layers: int = param(2, "first layers kept dense (Quest keeps 2: their attention is not sparse)", low=0)

    def validate(self) -> None:
        if self.page_size < 1:
            raise HetmemError(f"--page-size must be at least 1 (got {self.page_size})")
        if self.budget < self.page_size:
            raise HetmemError(f"--budget {self.budget} is smaller than one page ({self.page_size} tokens)")
        if self.sink_pages < 0 or self.recent_pages < 1 or self.dense_layers < 0:
            raise HetmemError("quest needs sink_pages >= 0, recent_pages >= 1 and dense_layers >= 0")

    @property
    def budget_pages(self) -> int:
        return self.budget // self.page_size

    def notes(self) -> list[str]:
        if self.budget % self.page_size:
            return [f"--budget {self.budget} is not a multiple of --page-size {self.page_size}: quest attends "
                    f"{self.budget_pages * self.page_size} tokens ({self.budget_pages} pages)"]
        return []

    def pipeline(self, device, timer, layer_idx: int = 0):
        if layer_idx < self.dense_layers:
            return dense_pipeline(device, timer)
        return MemoryPipeline(
            PageMinMaxPrepare(self.page_size, device),
            QuestRelevancy(self.sink_pages, self.recent_pages, self.budget_pages, device),
            PageBudgetTopK(self.budget_pages, self.sink_pages, self.recent_pages, device),
            GatherAttention(device),
            timer,
        )
