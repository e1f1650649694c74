"""The engine ``hetmem serve`` runs: continuous batching where it can, one request at a time where it cannot.

``make_engine`` is the one place that chooses. Requests whose method runs per decode step over the page pool
(dense, sparse attention, and compressed-KV methods without prefill observation) go to ``BatchEngine``
(``runtime/batch_engine.py``), with memory nodes too (a sparse-attention request's steps then run on the nodes,
one call per node per layer for the whole batch); the others (methods that observe prefill queries, models
with sliding-window or MLA layers) go to ``SeqEngine`` (``runtime/seq_engine.py``). Both implement ``engine_api.Engine``; so does the router.
"""

from __future__ import annotations

import threading
import time

from hetmem.errors import HetmemError
from hetmem.runtime.batch_engine import BatchEngine, unbatchable
from hetmem.runtime.engine_api import Engine, GenRequest, OnEvent
from hetmem.runtime.seq_engine import SeqEngine, check_request

REFUSED_BY_BATCH = "batching engine"  # the batch engine's refusals of a method it cannot run say this


class RoutingEngine:
    """Sends each request to the batch engine when it can run it there, else to the one-at-a-time engine."""

    def __init__(self, seq: SeqEngine, batch: BatchEngine | None, why_no_batch: str | None = None):
        self.seq, self.batch, self.why_no_batch = seq, batch, why_no_batch
        self.model_name, self.max_context = seq.model_name, seq.max_context
        self._lock = threading.Lock()
        self._last = (time.monotonic(), 0)  # (when, batch tokens) at the previous stats() call
        self._tps = 0.0

    @property
    def cluster(self):
        """The memory-node cluster behind the one-at-a-time engine (None in-process)."""
        return self.seq.cluster

    def route(self, req: GenRequest):
        """The engine for ``req``. Every request is checked the same way first (``check_request``: an unknown
        method, a bad parameter, a prompt plus max_tokens over the window are one line, whichever engine)."""
        method = check_request(req, self.max_context)
        if self.batch is None:
            return self.seq
        if unbatchable(method) or len(req.prompt_ids) + req.sampling.max_tokens > self.batch.max_context:
            return self.seq  # (the second: longer than the page pool holds for one sequence)
        return self.batch

    def submit(self, req: GenRequest, on_event: OnEvent) -> None:
        engine = self.route(req)
        if engine is self.batch:
            try:
                return self.batch.submit(req, on_event)
            except HetmemError as exc:
                if REFUSED_BY_BATCH not in str(exc):
                    raise
        return self.seq.submit(req, on_event)

    def cancel(self, request_id: str) -> None:
        self.seq.cancel(request_id)
        if self.batch is not None:
            self.batch.cancel(request_id)

    def stats(self) -> dict:
        s = self.seq.stats()
        if self.batch is None:
            return {**s, "engine": f"{s.get('engine', 'sequential')} ({self.why_no_batch})"}
        b = self.batch.stats()
        with self._lock:
            now, (t0, n0) = time.monotonic(), self._last
            if now - t0 >= 1.0:  # tokens/s of the batch engine since the previous scrape
                self._tps, self._last = (b["tokens"] - n0) / (now - t0), (now, b["tokens"])
        return {"engine": "batch+sequential", "queue_depth": s["queue_depth"] + b["queue_depth"],
                "running": s["running"] + b["running"] + b["prefilling"], "steps": s["steps"] + b["steps"],
                "tokens": s["tokens"] + b["tokens"], "tokens_per_s": round(s.get("tokens_per_s", 0.0) + self._tps, 3),
                "batch": b, "sequential": s}

    def close(self) -> None:
        if self.batch is not None:
            self.batch.close()
        self.seq.close()


def make_engine(lm, *, cluster=None, layout: str = "attention", max_queue: int = 256, step_timing: bool = True,
                batch: bool = True, max_batch: int = 16, rounds: int = 1) -> Engine:
    """The engine the server runs: a router over the batch engine and a ``SeqEngine``, both on the memory nodes
    of ``cluster`` when given. ``batch=False``: every request one at a time."""
    seq = SeqEngine(lm, cluster=cluster, layout=layout, max_queue=max_queue, step_timing=step_timing)
    if not batch:
        return RoutingEngine(seq, None, "batching off")
    try:
        be = BatchEngine(lm.model, lm.tokenizer, model_name=lm.name, max_batch=max_batch, max_context=lm.max_context,
                         max_queue=max_queue, cluster=cluster, layout=layout, rounds=rounds)
    except HetmemError as exc:  # a sliding-window or MLA model: every request one at a time
        return RoutingEngine(seq, None, str(exc))
    be.model_lock = seq.model_lock  # the two engines share the model: one forward at a time
    return RoutingEngine(seq, be)
