"""Calibrating the head<->node link on this machine (cached by ``hw.memnode``, like the CPU calibration).

Calls of the cluster's transport (the socket channel by default: the calls a run makes) to ``n`` nodes
with payloads that span what a decode step sends: empty batches (the per-call latency), one array of
1 KiB .. 4 MiB (bandwidth), 4 .. 64 small arrays (the per-array serialisation cost), and requests shaped
like a decode step's (the query, the new token's K/V, the plain fields) with the nodes computing 0 .. 4 ms
(what the round trip of nodes sharing the cores pays for their compute). Each is echoed back and follows
some head work, alternately 0.3 and 3 ms (a decode call follows the head's Retrieval or a layer's
compute): matrix-vector products streaming 32 MiB of weights, as decode does, with the head's thread
count (the caches a call's code ran warm in are gone, and the idle nodes are woken by the call). A
point's time is the link time the ledger counts for a decode call (round trip minus the slowest node's
compute), the mean of its calls (20% trimmed each side); the payloads are called in turn (interleaved, so
a change of the machine's load touches each alike). The empty round trips of the other transports (a Ray
Compiled Graph, plain actor calls) are measured beside it.
"""

from __future__ import annotations

import statistics
import time
from datetime import datetime, timezone

import numpy as np
import torch

from hetmem.hw.memnode import cached_link, fit_link, link_key, save_link
from hetmem.runtime.nodes.cluster import NodeCluster, _ray, narrays, nbytes


def _mean(ts: list[float]) -> float:
    """Mean without the slowest and fastest 20%: a run's transfers are sums of calls, so a mean predicts them;
    the trim keeps a shared machine's stalls of many ms (which come and go with the other load) out."""
    ts = sorted(ts)
    cut = len(ts) // 5
    return statistics.mean(ts[cut: len(ts) - cut] or ts)


def _trimmed_mean(ts: list[float]) -> float:
    """Mean without the slowest and fastest 20%: a run's transfers are sums of calls, so a mean predicts them;
    the trim keeps a shared machine's stalls out."""
    ts = sorted(ts)
    cut = len(ts) // 5
    return statistics.mean(ts[cut: len(ts) - cut] or ts)


_WEIGHTS = None


def head_work(ms: float) -> None:
    """Keep this process computing for ``ms`` the way decode does between two calls: matrix-vector products
    over 32 MiB of weights (a layer's worth streamed from memory, which also evicts the caches a call's
    code and data were warm in)."""
    global _WEIGHTS
    if _WEIGHTS is None:
        _WEIGHTS = torch.randn(4096, 2048)
    x = torch.randn(2048, 1)
    t, i = time.perf_counter(), 0
    while (time.perf_counter() - t) * 1e3 < ms:
        _WEIGHTS[i: i + 256] @ x  # 2 MiB at a time, round the 32 MiB
        i = (i + 256) % 4096


def _call(cluster: NodeCluster, batches, gap_ms: float = 0.0) -> tuple[float, float]:
    """One call after ``gap_ms`` of head work: (round trip ms, link ms = round trip minus the slowest node's
    compute, as the ledger counts a decode call's link time)."""
    if gap_ms:
        head_work(gap_ms)
    cluster.call(batches)
    return cluster.last["rt_ms"], max(0.0, cluster.last["rt_ms"] - cluster.last["node_ms"])


def payloads() -> list[list[np.ndarray]]:
    out = [[]]
    out += [[np.zeros(kib * 256, dtype=np.float32)] for kib in (1, 16, 256, 1024, 4096)]
    out += [[np.zeros(64, dtype=np.float32) for _ in range(m)] for m in (4, 16, 64)]
    out += [[np.zeros(16 * 1024, dtype=np.float32) for _ in range(16)]]
    return out


def decode_request(work_ms: float, kv: bool = True) -> dict:
    """A request shaped like a decode step's (SmolLM2's: 3 KV heads of 3 queries, head_dim 64): the query, the
    new token's K and V, the plain fields, the node computing ``work_ms`` (as its Relevancy or attention
    does); the node echoes the arrays back (a decode result carries ids and scores, or an output and its
    log-sum-exp: a few small arrays)."""
    x = {"q": np.zeros((1, 3, 3, 64), dtype=np.float32), "ids": np.zeros((1, 3, 64), dtype=np.int64)}
    if kv:
        x.update(k=np.zeros((1, 3, 1, 64), dtype=np.float32), v=np.zeros((1, 3, 1, 64), dtype=np.float32))
    return {"op": "work", "ms": work_ms, "cache": "calibration", "layer": 0, "scale": 0.125, "m": 64, "x": x}


HEAD_GAPS_MS = (0.3, 3.0)  # a decode call follows the head's Retrieval (short) or a layer's compute (longer)
NODE_WORK_MS = (0.0, 0.5, 1.0, 2.0, 4.0)  # a decode call's node compute at 1k .. 8k tokens of context


def measure_link(cluster: NodeCluster, repeats: int = 30, gaps_ms: tuple = HEAD_GAPS_MS, others: bool = True) -> dict:
    """Points and fit of the link model for ``cluster`` (its transport, all its nodes). Every point is the
    mean link time (round trip minus the slowest node's compute, the ledger's definition) of ``repeats``
    calls, each after some head work (alternately ``gaps_ms``: a decode call follows the head's compute; idle
    nodes are woken by it), the head at the thread count a run gives it. Payloads: empty, one array of
    1 KiB .. 4 MiB, 4 .. 64 small arrays (echoed), and decode-shaped requests with the nodes computing
    0 .. 4 ms (the nodes share the cores with the head and with each other: the round trip of N nodes that
    compute pays part of their compute again)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cluster.threads["head"])
    try:
        loads = [(0.0, {"op": "work", "ms": 0.0, "x": arrays}) for arrays in payloads()]
        loads += [(w, decode_request(w, kv)) for w in NODE_WORK_MS for kv in (True, False)]
        batches = [[[req] for _ in range(cluster.n)] for _, req in loads]
        for b in batches:  # warm-up
            cluster.call(b)
        ts: list[list[float]] = [[] for _ in loads]
        node: list[list[float]] = [[] for _ in loads]
        for r in range(repeats):  # interleaved: a change of the machine's load touches every payload alike
            for i, b in enumerate(batches):
                ts[i].append(_call(cluster, b, gaps_ms[(r + i) % len(gaps_ms)])[1])
                node[i].append(cluster.last["node_ms"])
        # both ways: the arrays go to every node and come back from every node
        points = [{"arrays": 2 * cluster.n * narrays(req["x"]), "bytes": 2 * cluster.n * nbytes(req["x"]),
                   "node_ms": round(_mean(nd), 4), "work_ms": w, "ms": round(_mean(t), 4)}
                  for (w, req), t, nd in zip(loads, ts, node)]
        hot = _trimmed_mean([_call(cluster, batches[0])[0] for _ in range(repeats)])
        empty = [[] for _ in range(cluster.n)]
        other_ms = {}
        for transport in ("socket", "compiled", "plain") if others else ():
            if transport == cluster.transport:
                continue
            cluster.release_graph()
            other = NodeCluster(cluster.n, actors=cluster.actors, transport=transport)
            other.call(empty)
            other_ms[transport] = round(_trimmed_mean([_call(other, empty, gaps_ms[-1])[0] for _ in range(repeats)]), 4)
            other.release_graph()
            other.close()
    finally:
        torch.set_num_threads(threads)
    return {"points": points, "fit": fit_link(points), "transport": cluster.transport, "samples_ms": ts,
            "plain_call_ms": other_ms.get("plain"), "other_transports_call_ms": other_ms, "head_gaps_ms": list(gaps_ms),
            "back_to_back_call_ms": round(hot, 4)}


def calibrate_link(n_nodes: int, force: bool = False, cluster: NodeCluster | None = None, repeats: int = 30,
                   others: bool = True) -> dict:
    """The link calibration for ``n_nodes`` local nodes: the cached entry whose key equals this machine's,
    else (or with ``force``) measured now (starting the nodes unless ``cluster`` is given) and cached.
    Carries ``key``, ``key_id``, ``measured_at`` and ``cached``."""
    key = link_key(n_nodes, _ray().__version__, torch.__version__, cluster.transport if cluster else "socket")
    if not force:
        e = cached_link(key)
        if e is not None:
            return dict(e, cached=True)
    own = cluster is None
    cluster = cluster or NodeCluster(n_nodes)
    try:
        m = measure_link(cluster, repeats, others=others)
    finally:
        if own:
            cluster.close()
    samples = m.pop("samples_ms")
    entry = {"key": key, "source": "measured", "measured_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
             "statistic": f"mean of {repeats} calls per payload (interleaved), 20% trimmed each side", **m}
    return dict(save_link(entry), cached=False, samples_ms=samples)

