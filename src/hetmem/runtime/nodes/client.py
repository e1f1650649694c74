"""The head side: a method whose pipelines run on the memory nodes through remote proxy steps.

``NodeMethod(method, cluster, layout)`` wraps a sparse-attention method the way the placement executor
wraps one (``runtime/executor.PlacedMethod``): the model side (``llm.attention.SparseRuntime``, the paged
cache) calls the same ``MemoryPipeline`` as always, but its steps are proxies:

    Prepare    RemotePrepare: sends each written token's K (and V) to the node owning its page; the node
               runs the method's own Prepare step on its pages. Decode appends ride on the next call.
    Relevancy  RemoteRelevancy: one call per node per layer (all sequences of the step): the node runs the
               method's own Relevancy over all its pages and returns its local top ``budget`` pages; the
               head rebuilds the candidate range's scores (``shard.merge_candidates``).
    Retrieval  the method's own step, on the head: the global top-k under the budget, sink and recent pages
               included -- identical to in-process.
    Apply      index: the method's own step on the head (K/V stay on the head).
               kv: RemoteGatherApply: the nodes return the selected pages' K/V; the method's own Apply runs
               on the head over exactly those.
               attention: RemoteAttentionApply: each node attends over the selected pages it holds and
               returns a partial output and its log-sum-exp; the head merges them (``shard.merge_partials``).

Split budget (opt-in, ``split_budget=True``, attention layout): one round instead of two. Each node selects
its share of the budget locally (``budget // N``, the remainder to the lower nodes; the sink and recent
pages it holds always among them) and attends over those pages in the same call
(``SplitRelevancy`` -> ``SplitRetrieval`` -> ``SplitAttentionApply``, the merge as above). The selection is
no longer the global top-k (a node's best pages may outrank another's kept ones): its attention-mass recall
is reported next to the exact mode's (``exact_meter``: the nodes then also return their candidates, and
the head measures the selection the exact mode would have made, from the same call).

Supported: methods whose Relevancy ranks pages between a sink and a recent window under a page budget
(``sink_pages``, ``recent_pages``, ``budget_pages``: quest, seer's top-k mode). The node runs that step
with the three set to 0 (it scores every page it holds; the head knows the candidate range).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
import weakref

import numpy as np
import torch

from hetmem.core.pipeline import MemoryPipeline
from hetmem.core.types import Memory, Scores, Selection
from hetmem.errors import HetmemError
from hetmem.hw.memnode import ATTEND_SLACK as MODEL_ATTEND_SLACK, attend_top, layout_bytes
from hetmem.ops.topk import candidate_range
from hetmem.runtime.nodes.cluster import nbytes
from hetmem.runtime.nodes.shard import merge_candidates, merge_page_partials, merge_partials, split_tokens

LAYOUTS = ("index", "kv", "attention")
PAGE_FIELDS = ("sink_pages", "recent_pages", "budget_pages")
ATTEND_SLACK = MODEL_ATTEND_SLACK  # hw.memnode.attend_top: each node attends its best few candidates
APPLY_KINDS = ("gather-attention", "block-sparse-attention")


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _t(a: np.ndarray) -> torch.Tensor:
    """A tensor over a received array (Ray hands them out read-only: copied only then)."""
    return torch.from_numpy(np.require(a, requirements="W"))


class _Session:
    """One model run (one paged cache): its id on the nodes and every layer's head-side shard state."""

    def __init__(self):
        self.id = uuid.uuid4().hex[:12]
        self.layers: dict[int, "LayerShard"] = {}


class NodeMethod:
    """``method`` with its sparse layers' steps on the memory nodes of ``cluster``, laid out as ``layout``."""

    def __init__(self, method, cluster, layout: str = "attention", split_budget: bool = False, exact_meter=None,
                 rounds: int = 1):
        if layout not in LAYOUTS:
            raise HetmemError(f"--layout must be one of {', '.join(LAYOUTS)} (got '{layout}')")
        if rounds not in (1, 2):
            raise HetmemError(f"--attention-rounds must be 1 or 2 (got {rounds})")
        if split_budget and layout != "attention":
            raise HetmemError(f"--split-budget runs with --layout attention (each node attends over its own share); "
                              f"got --layout {layout}")
        if getattr(method, "family", None) != "sparse-attention":
            raise HetmemError(f"--memory-nodes runs sparse-attention methods; '{method.name}' is {method.family}")
        if getattr(method, "threshold", 0) and method.threshold > 0:
            raise HetmemError(f"{method.name} with --threshold needs every candidate's score on the head; "
                              "memory nodes run its top-k mode (--threshold 0)")
        self._method = method
        self.cluster = cluster
        self.layout = layout
        self.split_budget = split_budget
        self.exact_meter = exact_meter  # split budget: a RecallMeter for the exact mode's selections, or None
        # exact attention layout in one round per layer (score_attend) or two (score, then attend)
        self.rounds = rounds if layout == "attention" and not split_budget else 2
        self.session: _Session | None = None
        # this method's own share of the transfers (the cluster's ledger sums every sequence's): per phase
        self.transfers: dict[str, dict] = {}
        self.second_rounds = 0  # one-round attention steps whose selection needed a second call
        _register(cluster, self)

    def __getattr__(self, name):
        return getattr(self._method, name)

    def pipeline(self, device, timer, layer_idx: int = 0, **kw):
        if layer_idx == 0 or self.session is None:  # a new run (generate builds layers 0..n-1 in order)
            self.close_session()
            self.session = _Session()
        pipe = self._method.pipeline(device, timer, layer_idx=layer_idx, **kw)
        if pipe.relevancy is None:  # a layer the method keeps dense: nothing to place
            return pipe
        if str(device) != "cpu":
            raise HetmemError("--memory-nodes runs the model on cpu (the nodes exchange host memory)")
        rel = pipe.relevancy
        if not all(hasattr(rel, f) for f in PAGE_FIELDS) or not dataclasses.is_dataclass(rel):
            raise HetmemError(f"{self._method.name}'s relevancy ({getattr(rel, 'kind', type(rel).__name__)}) is not a "
                              "page-budget ranking; memory nodes run quest and seer (top-k)")
        if self.layout != "index" and getattr(pipe.apply, "kind", None) not in APPLY_KINDS:
            raise HetmemError(f"--layout {self.layout} needs a gather-attention Apply; {self._method.name}'s is "
                              f"{getattr(pipe.apply, 'kind', '?')}: use --layout index")
        sh = LayerShard(self, layer_idx, pipe)
        self.session.layers[layer_idx] = sh
        if self.split_budget:
            return MemoryPipeline(RemotePrepare(sh), SplitRelevancy(sh), SplitRetrieval(sh), SplitAttentionApply(sh),
                                  timer)
        apply = {"index": pipe.apply, "kv": RemoteGatherApply(sh, pipe.apply),
                 "attention": RemoteAttentionApply(sh, device="memory-node+head" if sh.single_round else "memory-node",
                                                   name="merge-page-partials" if sh.single_round else "remote-attention")
                 }[self.layout]
        return MemoryPipeline(RemotePrepare(sh), RemoteRelevancy(sh), pipe.retrieval, apply, timer)

    def account(self, phase: str, sent: list, received: list, calls: int = 1) -> None:
        """Count the arrays this method's sequence sent (``sent``: its requests, every node's) and got back."""
        t = self.transfers.setdefault(phase, {"bytes_to_node": 0, "bytes_to_head": 0, "calls": 0})
        t["bytes_to_node"] += nbytes(sent)
        t["bytes_to_head"] += nbytes(received)
        t["calls"] += calls

    def close_session(self) -> None:
        if self.session is not None and self.cluster.actors:
            try:
                self.cluster.call([[{"op": "drop", "cache": self.session.id}]] * self.cluster.n, step="drop")
            except HetmemError:
                pass
        self.session = None

    def _rehydrate(self, node: int) -> list[dict]:
        """The batch that rebuilds node ``node``'s shard of every layer from the head's own K/V."""
        if self.session is None:
            return []
        batch = []
        for sh in self.session.layers.values():
            batch.append(sh.setup_request(node))
            if sh.layer is not None and sh.sent_end:
                batch.append(sh.append_request(node, 0, sh.sent_end))
        return batch


def _register(cluster, nm: "NodeMethod") -> None:
    """Every live NodeMethod on ``cluster`` (one per sequence in the batch engine): a restarted node is
    re-hydrated with all of their shards."""
    reg = getattr(cluster, "node_methods", None)
    if reg is None:
        reg = cluster.node_methods = weakref.WeakSet()
        cluster.rehydrators.append(lambda node: [r for m in list(reg) for r in m._rehydrate(node)])
    reg.add(nm)


class LayerShard:
    """Head-side state of one layer on the nodes: the method's steps, the memory stub, pending appends."""

    def __init__(self, owner: NodeMethod, layer_idx: int, pipe: MemoryPipeline):
        self.owner, self.layer_idx = owner, layer_idx
        self.timer = pipe.timer
        self.cluster = owner.cluster
        self.prepare_step = pipe.prepare
        self.head_relevancy = pipe.relevancy
        self.node_relevancy = dataclasses.replace(pipe.relevancy, sink_pages=0, recent_pages=0, budget_pages=0)
        self.page_size = pipe.prepare.page_size if hasattr(pipe.prepare, "page_size") else owner.page_size
        self.store_v = owner.layout != "index"
        self.single_round = owner.layout == "attention" and owner.rounds == 1 and not owner.split_budget
        self.layer = None  # the head's paged layer: its K/V are the copy a restarted node is re-hydrated from
        self.memory: Memory | None = None
        self.head_retrieval = pipe.retrieval
        self.sent_end = 0  # global tokens sent to the nodes
        self.partials = None  # split budget: the nodes' (outs, lses); single round: (pages, outs, lses) of this step
        self.exact_selection = None  # split budget with an exact meter: the exact mode's selection of this step
        self.set_up = False
        self.pending: list[list[dict]] = [[] for _ in range(self.cluster.n)]

    def setup_request(self, node: int) -> dict:
        return {"op": "setup", "cache": self.owner.session.id, "layer": self.layer_idx, "node": node,
                "n_nodes": self.cluster.n, "page_size": self.page_size, "store_v": self.store_v,
                "prepare": self.prepare_step, "relevancy": self.node_relevancy}

    def append_request(self, node: int, start: int, end: int) -> dict:
        segs = split_tokens(start, end, self.page_size, self.cluster.n).get(node, [])
        L = self.layer
        k = torch.cat([L.buf_k[:, :, a:b] for a, b in segs], dim=2) if segs else L.buf_k[:, :, :0]
        v = None
        if self.store_v:
            v = torch.cat([L.buf_v[:, :, a:b] for a, b in segs], dim=2) if segs else L.buf_v[:, :, :0]
        return {"op": "append", "cache": self.owner.session.id, "layer": self.layer_idx, "start": start, "end": end,
                "k": _np(k), "v": None if v is None else _np(v)}

    def take_pending(self) -> list[list[dict]]:
        out, self.pending = self.pending, [[] for _ in range(self.cluster.n)]
        return out

    def call(self, reqs: list[dict], step: str, timer_phase: str) -> list:
        """One call per node: pending appends first, then ``reqs[i]``; returns each node's last result."""
        batches = self.take_pending()
        for b, r in zip(batches, reqs):
            b.append(r)
        res = self.cluster.call(batches, layer=self.layer_idx, phase=timer_phase, step=step)
        self.owner.account(timer_phase, batches, res)
        return [r[-1] for r in res]


@dataclasses.dataclass
class RemotePrepare:
    shard: LayerShard
    device: str = "memory-node"
    name: str = "remote-prepare"

    def prepare(self, raw, memory=None):
        layer, start, end = raw
        sh = self.shard
        if layer.sliding_window is not None or layer.mla_rank is not None:
            raise HetmemError("memory nodes run full-attention, non-MLA layers only")
        sh.layer = layer
        n = sh.cluster.n
        reqs = [[] for _ in range(n)]
        if not sh.set_up:
            for i in range(n):
                reqs[i].append(sh.setup_request(i))
            sh.set_up = True
        for i in range(n):
            reqs[i].append(sh.append_request(i, start, end))
        sh.sent_end = end
        phase = getattr(_timer_of(sh), "phase", "prefill")
        for i in range(n):
            sh.pending[i].extend(reqs[i])
        if phase != "decode":  # in decode the append rides on this layer's relevancy call
            batches = sh.take_pending()
            sh.owner.account(phase, batches, sh.cluster.call(batches, layer=sh.layer_idx, phase=phase, step="prepare"))
        if sh.memory is None:
            sh.memory = Memory(kind=getattr(sh.prepare_step, "kind", "remote"), unit_size=sh.page_size)
        sh.memory.n_units = -(-end // sh.page_size)
        sh.memory.meta["length"] = end
        sh.memory.meta["window_start"] = 0
        return sh.memory


def _timer_of(sh: LayerShard):
    return sh.timer


def _query_fields(sh: "LayerShard", query) -> dict:
    """What every request about a layer's decode query carries: the sequence, the layer, the query and how it
    is scored (scale, soft-cap, sink logits)."""
    meta = query.meta
    sinks = meta.get("sinks")
    return {"cache": sh.owner.session.id, "layer": sh.layer_idx, "q": _np(query.vectors), "scale": meta.get("scale"),
            "softcap": meta.get("softcap"), "sinks": None if sinks is None else _np(sinks)}


@dataclasses.dataclass
class RemoteRelevancy:
    """The nodes' Relevancy (``score``), or, in the single-round ``attention`` layout, Relevancy and every
    candidate page's attention in the same call (``score_attend``; the partials wait on the shard for Apply).
    ``request``/``finish`` split the call so that ``decode_rows`` can send many sequences' requests at once."""

    shard: LayerShard
    device: str = "memory-node"
    name: str = "remote-relevancy"

    def request(self, memory: Memory, query) -> dict:
        sh = self.shard
        rel = sh.head_relevancy
        req = {"op": "score", **_query_fields(sh, query), "m": rel.budget_pages}
        if sh.single_round:
            top = attend_top(rel.budget_pages - rel.sink_pages - rel.recent_pages, sh.cluster.n, ATTEND_SLACK)
            req.update(op="score_attend", sink=rel.sink_pages, recent=rel.recent_pages, n_pages=memory.n_units,
                       length=memory.meta["length"], attend_top=top)
        return req

    def finish(self, res: list, memory: Memory) -> Scores:
        sh = self.shard
        rel = sh.head_relevancy
        lo, hi = candidate_range(memory.n_units, rel.sink_pages, rel.recent_pages, rel.budget_pages, 0)
        if sh.single_round:
            sh.partials = (torch.cat([_t(r["pages"]) for r in res], dim=-1),
                           torch.cat([_t(r["pout"]) for r in res], dim=2), torch.cat([_t(r["plse"]) for r in res], dim=2))
        return Scores(merge_candidates([_t(r["ids"]) for r in res], [_t(r["vals"]) for r in res], lo, hi), offset=lo)

    def score(self, memory: Memory, query) -> Scores:
        sh = self.shard
        return self.finish(sh.call([self.request(memory, query)] * sh.cluster.n, "relevancy", _timer_of(sh).phase),
                           memory)


class _Compact:
    """The K/V the nodes returned, as a paged layer holding only the selected pages (in selection order)."""

    def __init__(self, k, v, length):
        self.buf_k, self.buf_v, self.length, self.window_start = k, v, length, 0


@dataclasses.dataclass
class RemoteGatherApply:
    shard: LayerShard
    inner: object
    device: str = "memory-node+head"
    name: str = "remote-gather"

    def local(self, raw, selection: Selection, target):
        return None

    def request(self, raw, selection: Selection, target) -> dict:
        sh = self.shard
        return {"op": "gather", "cache": sh.owner.session.id, "layer": sh.layer_idx, "ids": _np(selection.indices)}

    def finish(self, res: list, raw, selection: Selection, target):
        sh = self.shard
        ids = selection.indices
        B, H, k = ids.shape
        P = selection.unit_size
        pool = getattr(raw, "pool", None)  # a pooled layer (the batch engine): its buf_k would stage a copy
        bk, bv = (pool.k, pool.v) if pool is not None else (raw.buf_k, raw.buf_v)
        Dk, Dv = bk.shape[-1], bv.shape[-1]
        kk = torch.empty(B * H * k, P * Dk, dtype=bk.dtype)
        vv = torch.empty(B * H * k, P * Dv, dtype=bv.dtype)
        flat = ids.reshape(-1)
        for i, r in enumerate(res):
            own = (flat % sh.cluster.n) == i
            kk[own] = _t(r["k"]).to(kk.dtype)
            vv[own] = _t(r["v"]).to(vv.dtype)
        last = selection.n_units - 1
        pad = selection.n_units * P - selection.length if bool((ids == last).any()) else 0
        compact = _Compact(kk.reshape(B, H, k * P, Dk), vv.reshape(B, H, k * P, Dv), k * P - pad)
        sel = Selection(indices=torch.arange(k).expand(B, H, k), n_units=k, unit_size=P, length=k * P - pad, start=0)
        return self.inner.apply(compact, sel, target)

    def apply(self, raw, selection: Selection, target):
        sh = self.shard
        res = sh.call([self.request(raw, selection, target)] * sh.cluster.n, "apply", _timer_of(sh).phase)
        return self.finish(res, raw, selection, target)


@dataclasses.dataclass
class RemoteAttentionApply:
    """Two rounds: each node attends over the selected pages it holds (``attend``) and the head merges the
    partials. Single round (``shard.single_round``): the head merges the selected pages' partials that came
    back with the scores (``merge_page_partials``), no call; a selected page without one (not expected: see
    ``shard.py``) falls back to the ``attend`` call."""

    shard: LayerShard
    device: str = "memory-node"
    name: str = "remote-attention"

    def local(self, raw, selection: Selection, target):
        sh = self.shard
        parts, sh.partials = sh.partials, None
        if parts is None:
            return None
        out = merge_page_partials(*parts, selection.indices, target.sinks, dtype=target.q.dtype)
        if out is None:
            sh.owner.second_rounds += 1
        return out

    def request(self, raw, selection: Selection, target) -> dict:
        sh = self.shard
        return {"op": "attend", "cache": sh.owner.session.id, "layer": sh.layer_idx, "ids": _np(selection.indices),
                "q": _np(target.q), "scale": target.scale, "softcap": target.softcap, "length": selection.length}

    def finish(self, res: list, raw, selection: Selection, target):
        return merge_partials([_t(r["out"]) for r in res], [_t(r["lse"]) for r in res], target.sinks,
                              dtype=target.q.dtype)

    def apply(self, raw, selection: Selection, target):
        out = self.local(raw, selection, target)
        if out is not None:
            return out
        sh = self.shard
        res = sh.call([self.request(raw, selection, target)] * sh.cluster.n, "apply", _timer_of(sh).phase)
        return self.finish(res, raw, selection, target)


def is_remote(pipe) -> bool:
    """Does ``pipe``'s Relevancy run on memory nodes (a pipeline ``NodeMethod`` built, exact mode)?"""
    return isinstance(getattr(pipe, "relevancy", None), RemoteRelevancy)


def decode_rows(rows: list, head_apply) -> list[torch.Tensor]:
    """One decode layer of several sequences on the memory nodes, with ONE call per node per round for all of
    them (the batch engine's decode step): ``rows`` are ``(pipe, memory, query, raw, target)`` of one layer,
    every ``pipe`` remote (``is_remote``) on the same cluster; ``head_apply(i, step, selection)`` runs row
    ``i``'s Apply where it runs on the head (the ``index`` layout). Round 1 carries each row's pending appends
    and its Relevancy request (``score``, or ``score_attend`` in the single-round ``attention`` layout); the
    head runs each row's own Retrieval; round 2 (``kv``, two-round ``attention``) carries the Apply requests of
    the rows that need one. Each row's timer is charged its share of a call's time."""
    if not rows:
        return []
    sh0 = rows[0][0].relevancy.shard
    cluster, layer = sh0.cluster, sh0.layer_idx
    n = cluster.n

    def one_call(reqs: dict[int, dict], step: str) -> dict[int, list]:
        batches = [[] for _ in range(n)]
        where = {}
        for i, req in reqs.items():
            pend = rows[i][0].relevancy.shard.take_pending()
            for j in range(n):
                batches[j].extend(pend[j])
                batches[j].append(req)
            where[i] = len(batches[0]) - 1
            rows[i][0].relevancy.shard.owner.account("decode", [pend, [req] * n], [], calls=0)
        t0 = time.perf_counter()
        res = cluster.call(batches, layer=layer, phase="decode", step=step)
        share = (time.perf_counter() - t0) * 1e3 / max(1, len(reqs))
        out = {}
        for i, k in where.items():
            out[i] = [res[j][k] for j in range(n)]
            pipe = rows[i][0]
            pipe.relevancy.shard.owner.account("decode", [], out[i])
            dev = pipe.relevancy.device if step == "relevancy" else pipe.apply.device
            pipe.timer.add(step, dev, share)
        return out

    res = one_call({i: r[0].relevancy.request(r[1], r[2]) for i, r in enumerate(rows)}, "relevancy")
    sels, outs, second = [], [None] * len(rows), {}
    for i, (pipe, memory, query, raw, target) in enumerate(rows):
        scores = pipe.relevancy.finish(res[i], memory)
        with pipe.timer.step("retrieval", pipe.retrieval.device):
            sel = pipe.retrieval.select(scores, memory)
        pipe.last_selection = sel
        sels.append(sel)
        ap = pipe.apply
        if not isinstance(ap, (RemoteAttentionApply, RemoteGatherApply)):
            with pipe.timer.step("apply", getattr(ap, "device", "cpu")):
                outs[i] = head_apply(i, ap, sel)
            continue
        with pipe.timer.step("apply", ap.device):
            outs[i] = ap.local(raw, sel, target)
        if outs[i] is None:
            second[i] = ap.request(raw, sel, target)
    if second:
        res = one_call(second, "apply")
        for i in second:
            pipe, _, _, raw, target = rows[i]
            outs[i] = pipe.apply.finish(res[i], raw, sels[i], target)
    return outs


def node_budgets(budget_pages: int, n_nodes: int) -> list[int]:
    """Split budget: node ``i`` selects ``budget // N`` pages, the first ``budget % N`` nodes one more."""
    return [budget_pages // n_nodes + (1 if i < budget_pages % n_nodes else 0) for i in range(n_nodes)]


@dataclasses.dataclass
class SplitScores(Scores):
    ids: torch.Tensor | None = None  # the pages the nodes selected, [B, H_kv, total], ascending


@dataclasses.dataclass
class SplitRelevancy:
    """Split budget: one call per node selects its share of the budget and attends over it (the partials wait
    on the shard for Apply). Its time is the whole round trip: selection and attention on the nodes."""

    shard: LayerShard
    device: str = "memory-node"
    name: str = "split-select-attend"

    def score(self, memory: Memory, query) -> Scores:
        sh = self.shard
        rel = sh.head_relevancy
        exact = sh.owner.exact_meter is not None
        base = {"op": "select_attend", **_query_fields(sh, query), "sink": rel.sink_pages, "recent": rel.recent_pages,
                "n_pages": memory.n_units, "length": memory.meta["length"],
                "candidates": rel.budget_pages if exact else 0}
        reqs = [dict(base, m=m) for m in node_budgets(rel.budget_pages, sh.cluster.n)]
        res = sh.call(reqs, "relevancy", _timer_of(sh).phase)
        sh.partials = ([_t(r["out"]) for r in res], [_t(r["lse"]) for r in res])
        ids = torch.cat([_t(r["ids"]) for r in res], dim=-1).sort(dim=-1).values
        if exact:  # what the exact mode would have selected, from the same call (measurement only)
            lo, hi = candidate_range(memory.n_units, rel.sink_pages, rel.recent_pages, rel.budget_pages, 0)
            cand = merge_candidates([_t(r["cand_ids"]) for r in res], [_t(r["cand_vals"]) for r in res], lo, hi)
            sh.exact_selection = sh.head_retrieval.select(Scores(cand, offset=lo), memory)
        return SplitScores(ids.float(), ids=ids)


@dataclasses.dataclass
class SplitRetrieval:
    shard: LayerShard
    device: str = "memory-node"
    name: str = "split-local-topk"

    def select(self, scores: SplitScores, memory: Memory) -> Selection:
        return Selection(indices=scores.ids, n_units=memory.n_units, unit_size=self.shard.page_size,
                         length=memory.meta["length"], start=0)


@dataclasses.dataclass
class SplitAttentionApply:
    shard: LayerShard
    device: str = "memory-node"
    name: str = "split-merge"

    def apply(self, raw, selection: Selection, target):
        sh = self.shard
        meter = sh.owner.exact_meter
        if meter is not None and sh.exact_selection is not None:
            meter.measure(sh.layer_idx, target, raw, sh.exact_selection)
        outs, lses = sh.partials
        sh.partials = sh.exact_selection = None
        return merge_partials(outs, lses, target.sinks, dtype=target.q.dtype)


def modelled_decode_bytes(layout: str, n_nodes: int, **dims) -> dict:
    """Bytes (and calls, arrays) one decode step moves per sparse layer by the layout: ``hw.memnode.layout_bytes``,
    the model the planner and the benchmark use."""
    return layout_bytes(layout, n_nodes, **dims)
