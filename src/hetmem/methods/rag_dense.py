"""``rag-dense``: retrieval-augmented generation with sentence embeddings and FAISS.

    Prepare    embed passages with all-MiniLM-L6-v2 (batched, progress bar) into a FAISS index
               (exact inner product ``IndexFlatIP`` by default, ``--dense-index hnsw`` optional)   (rag.embed, ops.dense_search)
    Relevancy  embed the query, FAISS search: inner products fused with top-k inside FAISS     (ops.dense_search)
    Retrieval  cut FAISS's ranked candidates to top-k                                         (rag_common)
    Apply      passages + question -> prompt (drop lowest-ranked that don't fit) -> generate  (rag_common)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from hetmem.core.pipeline import MemoryPipeline
from hetmem.core.registry import register_impl
from hetmem.core.types import Memory, Query
from hetmem.errors import HetmemError
from hetmem.methods.base import param, register
from hetmem.methods.rag_common import CandidateScores, PassagePromptApply, RagMethod, TopKPassages
from hetmem.ops.dense_search import INDEX_TYPES, build_index, search
from hetmem.rag.embed import load_embedder


@register_impl("dense-embed-index", role="prepare")
@dataclass
class DenseEmbedPrepare:
    """Prepare: raw = Corpus -> Memory(kind="dense", meta={"faiss": index, "embed_model": id})."""

    embed_model: str
    index_type: str = "flat"
    batch_size: int = 32
    device: str = "cpu"
    name: str = "embed-faiss-index"
    progress: bool = True

    def prepare(self, raw, memory: Memory | None = None) -> Memory:
        emb = load_embedder(self.embed_model, self.device)
        vecs = emb.encode(raw.texts(), batch_size=self.batch_size, progress=self.progress, desc="embed passages")
        index = build_index(vecs, self.index_type)
        return Memory(kind="dense", n_units=len(raw),
                      meta={"faiss": index, "embed_model": emb.model_id, "index_type": self.index_type, "dim": emb.dim})


@register_impl("dense-embed-score", role="relevancy")
@dataclass
class DenseRelevancy:
    """Relevancy: embed the query and let FAISS score and rank (``candidates`` best, best first)."""

    embed_model: str
    candidates: int
    device: str = "cpu"
    name: str = "embed-query-faiss-search"

    def score(self, memory: Memory, query: Query) -> CandidateScores:
        emb = load_embedder(self.embed_model, self.device)
        if emb.model_id != memory.meta["embed_model"]:
            raise HetmemError(f"the memory was embedded with {memory.meta['embed_model']}, but queries would be "
                              f"embedded with {emb.model_id}")
        q = emb.encode([query.text])
        vals, ids = search(memory.meta["faiss"], q, self.candidates, ef_search=max(64, self.candidates))
        keep = ids[0] >= 0
        ids, vals = ids[0][keep].astype("int64"), vals[0][keep]
        order = np.lexsort((ids, -vals.astype(np.float64)))  # equal scores: the lower id first (as a shard merge)
        return CandidateScores(torch.from_numpy(vals[order].copy()), ids=ids[order])


def check_dense_params(index_type: str, batch: int) -> None:
    if index_type not in INDEX_TYPES:
        raise HetmemError(f"--dense-index must be one of {', '.join(INDEX_TYPES)} (got {index_type!r})")
    if batch < 1:
        raise HetmemError(f"--embed-batch must be at least 1 (got {batch})")


@register
@dataclass
class RagDense(RagMethod):
    name = "rag-dense"
    summary = "RAG: all-MiniLM-L6-v2 embeddings in FAISS (flat or HNSW), top-k prepended to the question"
    memory_params: ClassVar[tuple[str, ...]] = ("passage_tokens", "passage_overlap", "embed_model", "dense_index")

    embed_model: str = param("all-minilm-l6-v2", "embedding model: all-minilm-l6-v2 (packaged) or a local directory")
    dense_index: str = param("flat", "FAISS index: flat (exact inner product) or hnsw", choices=("flat", "hnsw"))
    embed_batch: int = param(32, "passages per embedding batch", low=1)

    def validate(self) -> None:
        super().validate()
        check_dense_params(self.dense_index, self.embed_batch)

    def pipeline(self, device, timer, layer_idx: int = 0):
        return MemoryPipeline(
            DenseEmbedPrepare(self.embed_model, self.dense_index, self.embed_batch, device),
            DenseRelevancy(self.embed_model, self.top_k, device), TopKPassages(self.top_k),
            PassagePromptApply(device), timer,
        )
