"""Calibrating the head<->node link on this machine (cached by ``hw.memnode``, like the CPU calibration).

Calls of the compiled graph to ``n`` nodes (the calls a run makes) with payloads that span what a decode
step sends: empty batches (the per-call latency), one array of 1 KiB .. 4 MiB (bandwidth), and 4 .. 64
small arrays (the per-array serialisation cost), each to the nodes and echoed back, each call after 3 ms
of computing on the head (a decode call follows the layer's compute; the nodes have gone idle and are
woken by it, which costs several times a back-to-back call on a shared machine). The payloads are
called in turn (interleaved, so a change of the machine's load touches each alike); the trimmed mean round
trip of each is one point of ``hw.memnode.fit_link``. A plain actor call's empty round trip is measured
beside it.
"""

from __future__ import annotations

import statistics
import time
from datetime import datetime, timezone

import numpy as np
import torch

from hetmem.hw.memnode import cached_link, fit_link, link_key, save_link
from hetmem.runtime.nodes.cluster import NodeCluster, _ray, nbytes


def _trimmed_mean(ts: list[float]) -> float:
    """Mean without the slowest and fastest 20%: a run's transfers are sums of calls, so a mean predicts them;
    the trim keeps a shared machine's stalls out."""
    ts = sorted(ts)
    cut = len(ts) // 5
    return statistics.mean(ts[cut: len(ts) - cut] or ts)


_WORK = torch.randn(128, 128)


def head_work(ms: float) -> None:
    """Keep this process computing for ``ms`` (as the head computes a layer between two calls)."""
    t = time.perf_counter()
    while (time.perf_counter() - t) * 1e3 < ms:
        _WORK @ _WORK


def _time_ms(cluster: NodeCluster, batches, gap_ms: float = 0.0) -> float:
    if gap_ms:
        head_work(gap_ms)
    t = time.perf_counter()
    cluster.call(batches)
    return (time.perf_counter() - t) * 1e3


def payloads() -> list[list[np.ndarray]]:
    out = [[]]
    out += [[np.zeros(kib * 256, dtype=np.float32)] for kib in (1, 16, 256, 1024, 4096)]
    out += [[np.zeros(64, dtype=np.float32) for _ in range(m)] for m in (4, 16, 64)]
    out += [[np.zeros(16 * 1024, dtype=np.float32) for _ in range(16)]]
    return out


HEAD_GAP_MS = 3.0


def measure_link(cluster: NodeCluster, repeats: int = 30, gap_ms: float = HEAD_GAP_MS) -> dict:
    """Points and fit of the link model for ``cluster`` (its compiled graph to all its nodes). Each call comes
    after ``gap_ms`` of computing on the head, as a decode call comes after the layer's compute: idle nodes
    are woken by it, and a call that follows head work costs several times one made back to back (measured
    here: ``back_to_back_call_ms``)."""
    loads = payloads()
    batches = [[[{"op": "echo", "x": arrays}] for _ in range(cluster.n)] for arrays in loads]
    for b in batches:  # warm-up: the graph's channels grow to the largest payload once
        cluster.call(b)
    ts: list[list[float]] = [[] for _ in loads]
    for _ in range(repeats):  # interleaved: a change of the machine's load touches every payload alike
        for i, b in enumerate(batches):
            ts[i].append(_time_ms(cluster, b, gap_ms))
    # both ways: the arrays go to every node and come back from every node
    points = [{"arrays": 2 * cluster.n * len(a), "bytes": 2 * cluster.n * nbytes(a), "ms": round(_trimmed_mean(t), 4)}
              for a, t in zip(loads, ts)]
    hot = _trimmed_mean([_time_ms(cluster, batches[0]) for _ in range(repeats)])
    cluster.release_graph()
    plain = NodeCluster(cluster.n, actors=cluster.actors, compiled=False)
    empty = [[] for _ in range(cluster.n)]
    plain.call(empty)
    plain_ms = _trimmed_mean([_time_ms(plain, empty, gap_ms) for _ in range(repeats)])
    plain.close()
    return {"points": points, "fit": fit_link(points), "plain_call_ms": round(plain_ms, 4), "head_gap_ms": gap_ms,
            "back_to_back_call_ms": round(hot, 4)}


def calibrate_link(n_nodes: int, force: bool = False, cluster: NodeCluster | None = None, repeats: int = 30) -> dict:
    """The link calibration for ``n_nodes`` local nodes: the cached entry whose key equals this machine's,
    else (or with ``force``) measured now (starting the nodes unless ``cluster`` is given) and cached.
    Carries ``key``, ``key_id``, ``measured_at`` and ``cached``."""
    key = link_key(n_nodes, _ray().__version__, torch.__version__)
    if not force:
        e = cached_link(key)
        if e is not None:
            return dict(e, cached=True)
    own = cluster is None
    cluster = cluster or NodeCluster(n_nodes)
    try:
        m = measure_link(cluster, repeats)
    finally:
        if own:
            cluster.close()
    entry = {"key": key, "source": "measured", "measured_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
             "statistic": f"mean of {repeats} calls per payload (interleaved), 20% trimmed each side", **m}
    return dict(save_link(entry), cached=False)

