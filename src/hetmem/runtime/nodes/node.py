"""The memory node: one process (a Ray actor, ``cluster.py``) holding its shard of every layer's memory.

For each (sequence group, layer) a node keeps a ``PagedKVLayer`` of *its* pages only (local page ``j`` is
global page ``j * N + node``, ``shard.py``), whose pipeline is the method's own Prepare step: every append
runs it, so the node holds the Prepare output (Quest's page min/max, Seer's gated block keys) for its pages.
With the ``index`` layout the layer stores keys only (values have width 0: nothing is held); with ``kv`` and
``attention`` it stores the values too.

A node answers a batch of requests per call (all sequences of a step, for one layer), each a dict of
numpy arrays and plain values (numpy crosses Ray's channels far faster than pickled torch tensors):

    setup   the method's Prepare and (node-side) Relevancy steps for one layer
    append  K (and V) of new tokens, in local order; idempotent by global position
    score   the method's Relevancy over all local pages, then the local top ``m`` -> (global ids, scores)
    score_attend  ``score``, and in the same call attention over each candidate page on its own, and over
            each global sink/recent page it holds: per page a partial output and its log-sum-exp (the
            single-round ``attention`` layout: the head picks the selected pages' partials and merges them)
    gather  K/V of the selected pages it holds (``kv`` layout)
    attend  attention over the selected pages it holds -> partial output and log-sum-exp (``attention``)
    drop    forget a sequence group
    rag_load    load a shard of a sharded RAG memory from the saved memory (``rag.shards.RagShard``), or from its
                files shipped in the request (a node on a machine without the head's file system)
    rag_search  a question's BM25 and/or dense top candidates in a loaded shard (global ids, scores)
    rag_drop    forget a RAG memory's shards
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import hetmem.methods  # noqa: F401  (the steps a head sends are the methods': import them when the node starts)
from hetmem.core.pipeline import MemoryPipeline
from hetmem.core.types import Query
from hetmem.llm.paged_cache import PagedKVLayer
from hetmem.ops import fast
from hetmem.ops.sparse_attention import gather_pages
from hetmem.rag.shards import RagShard
from hetmem.ops.topk import topk_indices
from hetmem.runtime.nodes.shard import local_topk


def _t(a) -> torch.Tensor | None:
    """A tensor over a received array (Ray hands them out read-only: copied only then)."""
    return None if a is None else torch.from_numpy(np.require(a, requirements="W"))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


class _Shard:
    def __init__(self, req: dict):
        self.node, self.n_nodes, self.page_size = req["node"], req["n_nodes"], req["page_size"]
        self.store_v = req["store_v"]
        self.relevancy = req["relevancy"]
        self.layer = PagedKVLayer(self.page_size, MemoryPipeline(req["prepare"], None, None, None))
        self.end = 0  # global tokens appended so far (appends are idempotent by it)


class MemoryNode:
    """The node's state and request handlers. ``cluster.NodeActor`` runs it as a Ray actor."""

    def __init__(self, node: int, threads: int = 1):
        torch.set_num_threads(threads)
        self.node = node
        self.threads = threads
        self.shards: dict[tuple[str, int], _Shard] = {}
        self.rag: dict[tuple[str, int], RagShard] = {}
        self.rag_dirs: dict[tuple[str, int], str] = {}  # shards shipped as files: where this node wrote them
        self.fail_after: int | None = None  # tests: exit hard after this many more calls

    def info(self) -> dict:
        return {"node": self.node, "pid": os.getpid(), "host": socket.gethostname(), "threads": torch.get_num_threads(),
                "shards": len(self.shards), "rag_shards": sorted(s for _, s in self.rag)}

    def call(self, batch: list[dict]) -> dict:
        t0 = time.perf_counter()
        out = []
        with torch.inference_mode():
            for req in batch:
                out.append(getattr(self, "_" + req["op"])(req))
        return {"results": out, "node_ms": (time.perf_counter() - t0) * 1e3, "pid": os.getpid()}

    # -- handlers ----------------------------------------------------------------------------------------------
    def _setup(self, req):
        self.shards[(req["cache"], req["layer"])] = _Shard(req)
        return None

    def _drop(self, req):
        for key in [k for k in self.shards if k[0] == req["cache"]]:
            del self.shards[key]
        return None

    def _append(self, req):
        sh = self.shards[(req["cache"], req["layer"])]
        if req["end"] <= sh.end:  # already held (a retried call after a re-hydration)
            return None
        if req["start"] != sh.end:
            raise RuntimeError(f"node {self.node}: append of tokens {req['start']}..{req['end']} after {sh.end}")
        k = _t(req["k"])
        v = _t(req["v"]) if sh.store_v else k.new_empty(*k.shape[:-1], 0)
        if k.shape[2]:
            sh.layer.update(k, v)
        sh.end = req["end"]
        return None

    def _score(self, req):
        sh = self.shards[(req["cache"], req["layer"])]
        mem = sh.layer.memory
        q = _t(req["q"])
        if mem is None or mem.n_units == 0:
            e = np.zeros((*q.shape[:2], 0), dtype=np.int64)
            return {"ids": e, "vals": e.astype(np.float32)}
        query = Query(vectors=q, meta={"hidden": None, "layer": req["layer"], "scale": req["scale"],
                                       "softcap": req.get("softcap"), "sinks": _t(req.get("sinks"))})
        scores = sh.relevancy.score(mem, query)
        ids, vals = local_topk(scores.values, scores.offset, req["m"], self.node, sh.n_nodes)
        return {"ids": _np(ids), "vals": _np(vals.float())}

    def _score_attend(self, req):
        """``score``'s candidates, plus the pages the head will likely select from this node attended on its
        own: the global sink and recent pages held here and its best ``attend_top`` candidates (all ``m``
        when absent: the only in-range pages the global top-k can take from here, ``shard.py``; fewer is a
        bet that the selection spreads over the nodes, and a selected page without a partial costs the head
        a second round). Returns ``pages [B, H, C]`` (global ids, -1: none),
        ``pout [B, H, C, G, Dv]`` and ``plse [B, H, C, G]``."""
        sh = self.shards[(req["cache"], req["layer"])]
        mem = sh.layer.memory
        q = _t(req["q"])
        B, H, G, _ = q.shape
        N, node = sh.n_nodes, self.node
        n_local = mem.n_units if mem is not None else 0
        if n_local == 0:
            e = np.zeros((B, H, 0), dtype=np.int64)
            Dv = sh.layer.buf_v.shape[-1] if sh.layer.buf_v is not None else 0
            return {"ids": e, "vals": e.astype(np.float32), "pages": e,
                    "pout": np.zeros((B, H, 0, G, Dv), dtype=np.float32), "plse": np.zeros((B, H, 0, G), dtype=np.float32)}
        query = Query(vectors=q, meta={"hidden": None, "layer": req["layer"], "scale": req["scale"],
                                       "softcap": req.get("softcap"), "sinks": _t(req.get("sinks"))})
        scores = sh.relevancy.score(mem, query)
        loc = topk_indices(scores.values, req["m"]) + scores.offset  # local candidate ids [B, H, m], ascending
        vals = scores.values.gather(-1, loc - scores.offset).float()
        # the global sink and recent pages held here: local ids [0, a) and [b, n_local)
        a = min(n_local, max(0, -(-(req["sink"] - node) // N)))
        b = max(a, min(n_local, max(0, -(-(req["n_pages"] - req["recent"] - node) // N))))
        top = min(loc.shape[-1], req.get("attend_top", loc.shape[-1]) + a + n_local - b)
        att = loc if top >= loc.shape[-1] else loc.gather(-1, topk_indices(vals, top))
        att = torch.where((att < a) | (att >= b), -1, att)  # a forced page is attended once, below
        forced = torch.cat([torch.arange(a), torch.arange(b, n_local)]).expand(B, H, -1)
        pages_loc = torch.cat([att, forced], dim=-1)
        pout, plse = self._page_partials(sh, q, pages_loc, req)
        pages = torch.where(pages_loc >= 0, pages_loc * N + node, -1)
        return {"ids": _np(loc * N + node), "vals": _np(vals), "pages": _np(pages), "pout": _np(pout),
                "plse": _np(plse)}

    def _page_partials(self, sh, q, pages_loc, req):
        """Attention over each local page of ``pages_loc [B, H, C]`` (-1: padding) on its own:
        ``out [B, H, C, G, Dv]`` and ``lse [B, H, C, G]`` (-inf for padding). The compiled op reads the pages
        in place (``ops.fast.page_partials``); the torch code below is its reference and fallback."""
        B, H, G, _ = q.shape
        P = sh.page_size
        L = sh.layer
        if fast.available(q, L.buf_k, L.buf_v) and L.buf_k.stride(-1) == 1 and L.buf_v.stride(-1) == 1:
            # local tokens: only the global last page can be partial, and it is this node's last local page
            return fast.page_partials(q, L.buf_k, L.buf_v, pages_loc, P, L.length, req["scale"], req.get("softcap"))
        return self._page_partials_torch(sh, q, pages_loc, req)

    def _page_partials_torch(self, sh, q, pages_loc, req):
        B, H, G, _ = q.shape
        P = sh.page_size
        L = sh.layer
        C = pages_loc.shape[-1]
        k = gather_pages(L.buf_k, pages_loc.clamp(min=0), P)  # [B, H, C * P, D]
        v = gather_pages(L.buf_v, pages_loc.clamp(min=0), P).view(B, H, C, P, -1)
        w = torch.matmul(q, k.transpose(-1, -2)).mul_(req["scale"])
        if req.get("softcap") is not None:
            w = torch.tanh(w / req["softcap"]) * req["softcap"]
        w = w.float().view(B, H, G, C, P)
        # padding pages, and the tokens of the partial last page past the length: weight 0, and their values 0
        # (the tail of a partial page is uninitialised memory: a NaN there would turn a zero weight into NaN)
        w.masked_fill_((pages_loc < 0).view(B, H, 1, C, 1), float("-inf"))
        tail = req["length"] % P
        if tail:
            holds_last = (req["n_pages"] - 1) % sh.n_nodes == self.node
            last = pages_loc == (req["n_pages"] - 1) // sh.n_nodes  # [B, H, C]: the last page, if held here
            if holds_last and bool(last.any()):
                cut = last.view(B, H, 1, C, 1) & (torch.arange(P) >= tail)
                w.masked_fill_(cut, float("-inf"))
                v = v.masked_fill(cut.view(B, H, C, P, 1), 0.0)
        lse = torch.logsumexp(w, dim=-1)  # [B, H, G, C]
        p = torch.exp(w - lse.unsqueeze(-1)).nan_to_num_(nan=0.0)
        out = torch.einsum("bhgcp,bhcpd->bhcgd", p.to(v.dtype), v)
        return out.float(), lse.permute(0, 1, 3, 2).contiguous()

    def _owned(self, sh, ids: torch.Tensor):
        """The selected pages this node holds, per row, packed to the front: (local ids [B,H,C], valid [B,H,C],
        global ids [B,H,C])."""
        own = (ids % sh.n_nodes) == self.node
        cnt = own.sum(-1)
        C = int(cnt.max()) if cnt.numel() else 0
        slot = torch.where(own, own.cumsum(-1) - 1, C)
        loc = torch.zeros(*ids.shape[:-1], C + 1, dtype=torch.int64)
        loc.scatter_(-1, slot, torch.where(own, ids // sh.n_nodes, 0))
        glob = torch.full((*ids.shape[:-1], C + 1), -1, dtype=torch.int64)
        glob.scatter_(-1, slot, torch.where(own, ids, -1))
        return loc[..., :C], glob[..., :C] >= 0, glob[..., :C], own

    def _gather(self, req):
        sh = self.shards[(req["cache"], req["layer"])]
        ids = _t(req["ids"])
        own = (ids % sh.n_nodes) == self.node
        L = sh.layer
        B, H = ids.shape[:2]
        n = L.capacity // sh.page_size
        rows = ((ids // sh.n_nodes) + torch.arange(B * H).reshape(B, H, 1) * n)[own]
        P = sh.page_size
        k = L.buf_k[:, :, : n * P].reshape(B * H * n, P * L.buf_k.shape[-1]).index_select(0, rows)
        v = L.buf_v[:, :, : n * P].reshape(B * H * n, P * L.buf_v.shape[-1]).index_select(0, rows)
        return {"k": _np(k), "v": _np(v)}

    def _attend(self, req):
        sh = self.shards[(req["cache"], req["layer"])]
        q = _t(req["q"])  # [B, H, G, D]
        ids = _t(req["ids"])
        loc, valid_page, glob, _ = self._owned(sh, ids)
        B, H, G, _ = q.shape
        P = sh.page_size
        L = sh.layer
        C = loc.shape[-1]
        Dv = L.buf_v.shape[-1]
        if C == 0:
            return {"out": np.zeros((B, H, G, Dv), dtype=np.float32),
                    "lse": np.full((B, H, G), -np.inf, dtype=np.float32)}
        k = gather_pages(L.buf_k, loc, P)  # [B, H, C * P, D]
        v = gather_pages(L.buf_v, loc, P)
        tok = glob.unsqueeze(-1) * P + torch.arange(P)  # global token ids [B, H, C, P]
        valid = (valid_page.unsqueeze(-1) & (tok < req["length"])).flatten(-2)  # [B, H, C * P]
        w = torch.matmul(q, k.transpose(-1, -2)) * req["scale"]
        if req.get("softcap") is not None:
            w = torch.tanh(w / req["softcap"]) * req["softcap"]
        w = w.float().masked_fill(~valid.unsqueeze(2), float("-inf"))
        lse = torch.logsumexp(w, dim=-1)  # [B, H, G]
        p = torch.exp(w - lse.unsqueeze(-1)).nan_to_num(nan=0.0)
        # a partial last page's tail (and unfilled buffer) is uninitialised memory: a NaN there would turn
        # its zero weight into NaN, so those values are zeroed, not just weighted 0
        v = torch.where(valid.unsqueeze(-1), v, 0.0)
        out = torch.matmul(p.to(v.dtype), v)
        return {"out": _np(out.float()), "lse": _np(lse)}

    def _rag_load(self, req):
        """Load a shard from the saved memory at ``path``; with ``files`` (a node on another machine, no shared
        file system) from those bytes, written to a directory of this node's own first (checked against their
        sha256 in memory.json as the saved memory is)."""
        path = req["path"]
        if req.get("files"):
            key = (req["key"], req["shard"])
            d = self.rag_dirs.get(key) or tempfile.mkdtemp(prefix="hetmem-rag-shard-")
            self.rag_dirs[key] = d
            for name, data in req["files"].items():
                f = Path(d) / req["meta"]["data_dir"] / name
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_bytes(data)
            path = d
        self.rag[(req["key"], req["shard"])] = RagShard.load(path, req["meta"], req["shard"])
        return {"loaded_from": "shipped files" if req.get("files") else "path"}

    def _rag_search(self, req):
        return self.rag[(req["key"], req["shard"])].search(req)

    def _rag_drop(self, req):
        for key in [k for k in self.rag if k[0] == req["key"]]:
            del self.rag[key]
        for key in [k for k in self.rag_dirs if k[0] == req["key"]]:
            shutil.rmtree(self.rag_dirs.pop(key), ignore_errors=True)
        return None

    def _select_attend(self, req):
        """Split budget: this node's share ``m`` of the budget (the global sink and recent pages it holds
        first, then its best-scoring pages), attended at once. With ``candidates`` > 0 also its local top
        ``candidates`` (as ``score`` returns them: the head measures the exact mode's selection)."""
        sh = self.shards[(req["cache"], req["layer"])]
        mem = sh.layer.memory
        q = _t(req["q"])
        B, H, G, _ = q.shape
        n_local = mem.n_units if mem is not None else 0
        out = {}
        if n_local == 0:
            e = np.zeros((B, H, 0), dtype=np.int64)
            out = {"ids": e, "out": np.zeros((B, H, G, sh.layer.buf_v.shape[-1] if sh.layer.buf_v is not None else 0),
                                              dtype=np.float32),
                   "lse": np.full((B, H, G), -np.inf, dtype=np.float32)}
            if req.get("candidates"):
                out.update(cand_ids=e, cand_vals=e.astype(np.float32))
            return out
        query = Query(vectors=q, meta={"hidden": None, "layer": req["layer"], "scale": req["scale"],
                                       "softcap": req.get("softcap"), "sinks": _t(req.get("sinks"))})
        scores = sh.relevancy.score(mem, query)
        if req.get("candidates"):
            ci, cv = local_topk(scores.values, scores.offset, req["candidates"], self.node, sh.n_nodes)
            out.update(cand_ids=_np(ci), cand_vals=_np(cv.float()))
        full = torch.full((B, H, n_local), float("-inf"))
        full[..., scores.offset: scores.offset + scores.values.shape[-1]] = scores.values.float()
        gid = torch.arange(n_local) * sh.n_nodes + self.node
        forced = (gid < req["sink"]) | (gid >= req["n_pages"] - req["recent"])
        full[..., forced] = float("inf")
        ids = topk_indices(full, min(req["m"], n_local)) * sh.n_nodes + self.node
        att = self._attend({**req, "ids": _np(ids)})
        return {**out, "ids": _np(ids), **att}

    def _echo(self, req):  # the link calibration (runtime.nodes.linkcal): the arrays straight back
        return req.get("x")

    def _crash(self, req):  # tests and the benchmark: die the way a killed process dies
        os.kill(os.getpid(), 9)
