"""``rag-hybrid``: BM25 and dense rankings fused (convex combination of normalised scores, or RRF).

    Prepare    both: BM25 sparse statistics and the embedding FAISS index                    (rag_bm25, rag_dense)
    Relevancy  both: BM25 scores of every passage; FAISS top ``candidates`` for the query     (ops.bm25, ops.dense_search)
    Retrieval  top ``candidates`` of each ranking, fused, top-k                               (ops.rank_fusion)
                 convex (default): alpha * minmax(bm25) + (1 - alpha) * minmax(cosine)
                 rrf:              sum 1 / (rrf_k + rank)
    Apply      passages + question -> prompt (drop lowest-ranked that don't fit) -> generate  (rag_common)

Dense embeddings are weak on rare names (invented entities, ids, code symbols), BM25 on paraphrase.
Rank fusion (RRF) needs no calibration but flattens a decisive BM25 match (rank 1 by a wide margin counts
no more than rank 1 by a hair); the convex combination keeps the margin, and on hetmem's invented-facts
task it matches or beats both rankings while RRF falls below BM25 (see tests/test_rag_quality.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


from hetmem.core.pipeline import MemoryPipeline
from hetmem.core.registry import register_impl
from hetmem.core.types import Memory, Query, Scores
from hetmem.errors import HetmemError
from hetmem.methods.base import param, register
from hetmem.methods.rag_bm25 import Bm25Prepare, Bm25Relevancy, check_bm25_params
from hetmem.methods.rag_common import PassagePromptApply, RagMethod, RankedSelection
from hetmem.methods.rag_dense import DenseEmbedPrepare, DenseRelevancy, check_dense_params
from hetmem.ops.rank_fusion import convex_fusion, reciprocal_rank_fusion, topk_ranked


@dataclass
class HybridScores(Scores):
    """BM25 scores of all passages (``values``) plus the dense search's ranked candidates."""

    dense_ids: object = None
    dense_scores: object = None


@register_impl("hybrid-index", role="prepare")
@dataclass
class HybridPrepare:
    bm25: Bm25Prepare
    dense: DenseEmbedPrepare
    device: str = "cpu"
    name: str = "bm25-stats+embed-faiss-index"

    def prepare(self, raw, memory: Memory | None = None) -> Memory:
        a, b = self.bm25.prepare(raw), self.dense.prepare(raw)
        return Memory(kind="hybrid", n_units=len(raw), meta={**a.meta, **b.meta})


@register_impl("hybrid-score", role="relevancy")
@dataclass
class HybridRelevancy:
    bm25: Bm25Relevancy
    dense: DenseRelevancy
    device: str = "cpu"
    name: str = "bm25-score+faiss-search"

    def score(self, memory: Memory, query: Query) -> HybridScores:
        s = self.bm25.score(memory, query)
        d = self.dense.score(memory, query)
        return HybridScores(s.values, dense_ids=d.ids, dense_scores=d.values.numpy())


@register_impl("fused-topk", role="retrieval")
@dataclass
class FusedTopK:
    """Retrieval: top ``candidates`` by BM25 and by embedding, fused, best ``k`` kept."""

    k: int
    candidates: int
    fusion: str = "convex"
    alpha: float = 0.5
    rrf_k: float = 60.0
    device: str = "cpu"
    name: str = "fused-topk"

    def select(self, scores: HybridScores, memory: Memory) -> RankedSelection:
        bm_ids, bm_vals = topk_ranked(scores.values.numpy(), self.candidates)
        keep = bm_vals > 0  # a passage that shares no term with the query is no BM25 evidence
        bm_ids, bm_vals = bm_ids[keep], bm_vals[keep]
        d_ids, d_vals = scores.dense_ids[: self.candidates], scores.dense_scores[: self.candidates]
        if self.fusion == "rrf":
            ids, vals = reciprocal_rank_fusion([bm_ids, d_ids], self.k, self.rrf_k)
        else:
            ids, vals = convex_fusion([(bm_ids, bm_vals), (d_ids, d_vals)], self.k, [self.alpha, 1.0 - self.alpha])
        return RankedSelection.of(ids, vals, memory.n_units)


@register
@dataclass
class RagHybrid(RagMethod):
    name = "rag-hybrid"
    summary = "RAG: BM25 and embedding rankings fused (convex or RRF), top-k prepended to the question"
    memory_params: ClassVar[tuple[str, ...]] = ("passage_tokens", "passage_overlap", "embed_model", "dense_index")

    k1: float = param(1.2, "BM25 term-frequency saturation k1", low=0.0)
    b: float = param(0.75, "BM25 length normalisation b (0 = the paper's prototype)", low=0.0, high=1.0)
    embed_model: str = param("all-minilm-l6-v2", "embedding model: all-minilm-l6-v2 (packaged) or a local directory")
    dense_index: str = param("flat", "FAISS index: flat (exact inner product) or hnsw", choices=("flat", "hnsw"))
    embed_batch: int = param(32, "passages per embedding batch", low=1)
    fusion: str = param("convex", "convex: alpha*BM25 + (1-alpha)*cosine, min-max normalised; rrf: reciprocal rank fusion", choices=("convex", "rrf"))
    alpha: float = param(0.5, "convex fusion: weight of BM25", low=0.0, high=1.0)
    rrf_k: float = param(60.0, "reciprocal-rank-fusion constant", low=1e-9)
    candidates: int = param(50, "depth of each ranking that is fused", low=1)

    def validate(self) -> None:
        super().validate()
        check_bm25_params(self.k1, self.b)
        check_dense_params(self.dense_index, self.embed_batch)
        if self.fusion not in ("convex", "rrf"):
            raise HetmemError(f"--fusion must be convex or rrf (got {self.fusion!r})")
        if not 0.0 <= self.alpha <= 1.0:
            raise HetmemError(f"--alpha must be between 0 and 1 (got {self.alpha})")
        if self.rrf_k <= 0:
            raise HetmemError(f"--rrf-k must be positive (got {self.rrf_k})")
        if self.candidates < self.top_k:
            raise HetmemError(f"--candidates ({self.candidates}) must be at least --top-k ({self.top_k})")

    def pipeline(self, device, timer, layer_idx: int = 0):
        return MemoryPipeline(
            HybridPrepare(Bm25Prepare(self.k1, self.b),
                          DenseEmbedPrepare(self.embed_model, self.dense_index, self.embed_batch, device)),
            HybridRelevancy(Bm25Relevancy(self.k1, self.b), DenseRelevancy(self.embed_model, self.candidates, device)),
            FusedTopK(self.top_k, self.candidates, self.fusion, self.alpha, self.rrf_k), PassagePromptApply(device), timer,
        )
