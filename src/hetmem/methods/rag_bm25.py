"""``rag-bm25``: retrieval-augmented generation with BM25 over a passage corpus.

    Prepare    tokenise passages, BM25 term x passage weights as a scipy.sparse CSR matrix   (ops.bm25)
    Relevancy  sparse scoring: add the weight rows of the query's terms                       (ops.bm25)
    Retrieval  top-k passages, best first                                                     (ops.rank_fusion)
    Apply      passages + question -> prompt (drop lowest-ranked that don't fit) -> generate  (rag_common)

k1 = 1.2, b = 0.75 by default; ``--b 0`` reproduces the paper's prototype (no length normalisation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetmem.core.pipeline import MemoryPipeline
from hetmem.core.registry import register_impl
from hetmem.core.types import Memory, Query, Scores
from hetmem.errors import HetmemError
from hetmem.methods.base import param, register
from hetmem.methods.rag_common import PassagePromptApply, RagMethod, TopKPassages
from hetmem.ops.bm25 import bm25_scores, build_bm25, reweight, tokenize


@register_impl("bm25-index", role="prepare")
@dataclass
class Bm25Prepare:
    """Prepare: raw = Corpus -> Memory(kind="bm25", meta={"bm25": Bm25Stats})."""

    k1: float
    b: float
    device: str = "cpu"
    name: str = "bm25-sparse-stats"

    def prepare(self, raw, memory: Memory | None = None) -> Memory:
        stats = build_bm25([tokenize(t) for t in raw.texts()], self.k1, self.b)
        return Memory(kind="bm25", n_units=len(raw), meta={"bm25": stats})


@register_impl("bm25-score", role="relevancy")
@dataclass
class Bm25Relevancy:
    """Relevancy: BM25 score of every passage for the query text (sparse row gather + add)."""

    k1: float
    b: float
    device: str = "cpu"
    name: str = "bm25-sparse-score"

    def score(self, memory: Memory, query: Query) -> Scores:
        stats = memory.meta["bm25"]
        if (stats.k1, stats.b) != (self.k1, self.b):  # a memory prepared under other k1/b: re-weight once
            stats = memory.meta["bm25"] = reweight(stats, self.k1, self.b)
        return Scores(torch.from_numpy(bm25_scores(stats, stats.term_ids(tokenize(query.text)))))


def check_bm25_params(k1: float, b: float) -> None:
    if k1 < 0:
        raise HetmemError(f"--k1 must be at least 0 (got {k1})")
    if not 0.0 <= b <= 1.0:
        raise HetmemError(f"--b must be between 0 and 1 (got {b})")


@register
@dataclass
class RagBm25(RagMethod):
    name = "rag-bm25"
    summary = "RAG: BM25 (sparse matrix) scores passages, top-k prepended to the question"

    k1: float = param(1.2, "BM25 term-frequency saturation k1", low=0.0)
    b: float = param(0.75, "BM25 length normalisation b (0 = the paper's prototype)", low=0.0, high=1.0)

    def validate(self) -> None:
        super().validate()
        check_bm25_params(self.k1, self.b)

    def pipeline(self, device, timer, layer_idx: int = 0):
        return MemoryPipeline(
            Bm25Prepare(self.k1, self.b), Bm25Relevancy(self.k1, self.b), TopKPassages(self.top_k, positive_only=True),
            PassagePromptApply(device), timer,
        )
