"""Serving a sharded RAG memory (``hetmem index --shards N``, ``rag.shards``): in-process or on memory nodes.

The head keeps the passages (Apply builds the prompt from them) and the global vocabulary. A question's
Relevancy is ``ShardedRelevancy``: the head tokenises the question into global term ids and/or embeds it,
sends one request to every shard, and merges the shards' ranked candidates into the global top ``k``
(``rag.shards.merge_ranked``). The method's own Retrieval and Apply then run unchanged on the head:

    rag-bm25    the merged BM25 candidates, as scores of all passages (absent ones -inf) -> TopKPassages
    rag-dense   the merged FAISS candidates, best first (CandidateScores) -> TopKPassages
    rag-hybrid  both (HybridScores) -> FusedTopK

``k`` per ranking is what the method's Retrieval takes from it (TopKPassages' ``k``, FusedTopK's
``candidates``), so each shard's top ``k`` holds every passage of the global top ``k`` that it owns.

Where the shards live:
    LocalShards   in this process (the default)
    NodeShards    on memory nodes (``runtime.nodes.cluster.NodeCluster``, Ray actors): shard ``s`` on node
                  ``s % n``; each node loads its shards from the saved memory (``rag_load``; a node on
                  another machine gets the shards' files in the request: no shared file system). A node that
                  died (SIGKILL) is restarted by Ray and re-hydrated from the saved memory, and the call is
                  retried (the cluster's ``rehydrate`` hook), so the answers do not change.
"""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import numpy as np
import torch

from hetmem.core.pipeline import MemoryPipeline
from hetmem.core.types import Memory, Query, Scores
from hetmem.errors import HetmemError
from hetmem.methods.rag_bm25 import Bm25Relevancy
from hetmem.methods.rag_common import CandidateScores, TopKPassages
from hetmem.methods.rag_dense import DenseRelevancy
from hetmem.methods.rag_hybrid import FusedTopK, HybridRelevancy, HybridScores
from hetmem.ops.bm25 import tokenize
from hetmem.rag.embed import load_embedder
from hetmem.rag.shards import GLOBAL_FILE, RagShard, merge_ranked, shard_dir, shard_summary


class LocalShards:
    """Every shard of the memory in this process."""

    def __init__(self, memory: Memory):
        sh = memory.meta["sharded"]
        self.n_shards = sh["n_shards"]
        self.shards = [RagShard.load(sh["path"], sh["meta"], i) for i in range(self.n_shards)]

    def search(self, req: dict) -> list[dict]:
        return [s.search(req) for s in self.shards]

    def record(self) -> dict:
        return {"shards": self.n_shards, "served": "in-process"}


class NodeShards:
    """The memory's shards on the nodes of ``cluster``: shard ``s`` on node ``s % cluster.n``."""

    def __init__(self, memory: Memory, cluster, ship_files: bool | None = None):
        sh = memory.meta["sharded"]
        self.cluster = cluster
        self.path, self.meta, self.n_shards = sh["path"], sh["meta"], sh["n_shards"]
        self.key = f"{self.path}@{self.meta['data_dir']}"
        self.owned = [[s for s in range(self.n_shards) if s % cluster.n == i] for i in range(cluster.n)]
        # a node on another machine gets its shards' files in the load request (no shared file system needed);
        # one on this machine reads them from the saved memory. ``ship_files`` forces either.
        here = socket.gethostname()
        self.ship = [ship_files if ship_files is not None else info.get("host") != here for info in cluster.info]
        cluster.rehydrators.append(self._load_requests)
        cluster.call([self._load_requests(i) for i in range(cluster.n)], phase="load", step="prepare")

    def _load_requests(self, node: int) -> list[dict]:
        """The batch that (re)loads node ``node``'s shards from the saved memory."""
        reqs = [{"op": "rag_load", "key": self.key, "path": self.path, "meta": self.meta, "shard": s}
                for s in self.owned[node]]
        if self.ship[node]:
            d = Path(self.path).expanduser() / self.meta["data_dir"]
            for r in reqs:
                mine = [f for f in self.meta["files"] if f.startswith(shard_dir(r["shard"]) + "/") or f == GLOBAL_FILE]
                try:
                    r["files"] = {f: (d / f).read_bytes() for f in mine}
                except OSError as e:
                    raise HetmemError(f"memory {self.path} is damaged: {e.strerror}: {e.filename}") from None
        return reqs

    def search(self, req: dict) -> list[dict]:
        batches = [[{**req, "op": "rag_search", "key": self.key, "shard": s} for s in own] for own in self.owned]
        res = self.cluster.call(batches, phase="query", step="relevancy")
        return [r for node in res for r in node]

    def close(self) -> None:
        if self._load_requests in self.cluster.rehydrators:
            self.cluster.rehydrators.remove(self._load_requests)
        if self.cluster.actors:
            try:
                self.cluster.call([[{"op": "rag_drop", "key": self.key}]] * self.cluster.n, step="drop")
            except HetmemError:
                pass

    def record(self) -> dict:
        return {"shards": self.n_shards, "served": "memory nodes",
                "files_shipped_to": [f"node{i}" for i, ship in enumerate(self.ship) if ship],
                "placement": {f"node{i}": own for i, own in enumerate(self.owned)}}


@dataclasses.dataclass
class ShardedRelevancy:
    """Relevancy over a sharded memory: one request to every shard, the candidates merged on the head."""

    inner: object  # the method's own Relevancy (its parameters: k1, b, embed model, candidates)
    backend: object  # LocalShards | NodeShards
    k_bm25: int = 0  # candidates per ranking the method's Retrieval takes (0: the method has no such ranking)
    k_dense: int = 0
    device: str = "cpu"
    name: str = "sharded-search"

    @property
    def kind(self) -> str:
        return getattr(self.inner, "kind", "sharded-search")

    def score(self, memory: Memory, query: Query) -> Scores:
        bm = self.inner.bm25 if isinstance(self.inner, HybridRelevancy) else (
            self.inner if isinstance(self.inner, Bm25Relevancy) else None)
        de = self.inner.dense if isinstance(self.inner, HybridRelevancy) else (
            self.inner if isinstance(self.inner, DenseRelevancy) else None)
        req: dict = {"terms": None, "q": None}
        if bm is not None:
            v = memory.meta["sharded"]["vocab"]
            req.update(terms=np.fromiter((v[t] for t in tokenize(query.text) if t in v), dtype=np.int64),
                       k_bm25=self.k_bm25, k1=bm.k1, b=bm.b)
        if de is not None:
            emb = load_embedder(de.embed_model, de.device)
            if emb.model_id != memory.meta["embed_model"]:
                raise HetmemError(f"the memory was embedded with {memory.meta['embed_model']}, but queries would be "
                                  f"embedded with {emb.model_id}")
            req.update(q=np.ascontiguousarray(emb.encode([query.text]), dtype=np.float32), k_dense=self.k_dense)
        res = self.backend.search(req)
        values = None
        if bm is not None:
            ids, vals = merge_ranked([r["bm25_ids"] for r in res], [r["bm25_vals"] for r in res], self.k_bm25)
            full = np.full(memory.n_units, -np.inf, dtype=np.float32)
            full[ids] = vals
            values = torch.from_numpy(full)
        if de is not None:
            d_ids, d_vals = merge_ranked([r["dense_ids"] for r in res], [r["dense_vals"] for r in res], self.k_dense)
            if bm is None:
                return CandidateScores(torch.from_numpy(np.ascontiguousarray(d_vals)), ids=d_ids)
            return HybridScores(values, dense_ids=d_ids, dense_scores=d_vals)
        return Scores(values)


def sharded_pipeline(pipe: MemoryPipeline, backend) -> MemoryPipeline:
    """``pipe`` with its Relevancy searching ``backend``'s shards (Retrieval and Apply unchanged)."""
    rel, ret = pipe.relevancy, pipe.retrieval
    if isinstance(ret, FusedTopK):
        k = ret.candidates
    elif isinstance(ret, TopKPassages):
        k = ret.k
    else:
        raise HetmemError(f"a sharded memory serves rag-bm25, rag-dense and rag-hybrid (not {type(ret).__name__})")
    has_bm = isinstance(rel, (Bm25Relevancy, HybridRelevancy))
    has_de = isinstance(rel, (DenseRelevancy, HybridRelevancy))
    if isinstance(rel, DenseRelevancy):
        k = max(k, rel.candidates)
    step = ShardedRelevancy(rel, backend, k_bm25=k if has_bm else 0, k_dense=k if has_de else 0)
    return MemoryPipeline(pipe.prepare, step, ret, pipe.apply, pipe.timer)


def sharded_info(memory: Memory, backend) -> dict:
    return {**backend.record(), "ranges": shard_summary(memory.meta["sharded"]["meta"])}
