"""RAG memories the server loads at start (``--memory NAME=DIR``), and the prompt a request builds from one.

A request with ``{"hetmem": {"memory": "NAME", "top_k": 4}}`` runs the memory's own Relevancy and Retrieval
(``RagSession``'s method with the request's query-time parameters) on the question (the last user message, or
the completion prompt), then puts the retrieved passages, best first, in front of it as ``hetmem run --method
rag-*`` does (``methods.rag_common``: the same instruction and passage blocks). Passages that do not fit the
window with ``max_tokens`` are dropped lowest-ranked first; the response's ``hetmem.rag`` lists what was
retrieved, what was used, and the measured step times.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from hetmem.core.timer import StepTimer
from hetmem.core.types import Query
from hetmem.errors import HetmemError
from hetmem.methods import get_method, param_specs
from hetmem.methods.rag_common import INSTRUCTION, passage_block
from hetmem.rag.store import check_compatible, load_memory, read_meta
from hetmem.runtime.rag import RagSession

# RAG parameters a request may set: the ones that act at query time (the rest shaped the memory when it was built).
BUILD_PARAMS = {"passage_tokens", "passage_overlap", "k1", "b", "embed_model", "dense_index", "embed_batch"}


def parse_memory_spec(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise HetmemError(f"--memory takes NAME=DIR (got '{spec}')")
    if not Path(path).expanduser().is_dir():
        raise HetmemError(f"--memory {name}: {path} does not exist or is not a directory (build one with 'hetmem index')")
    return name.strip(), path.strip()


def load_rag_memory(path: str) -> RagSession:
    """Open a memory written by ``hetmem index`` with the method and parameters it was built with."""
    meta = read_meta(path)
    method = get_method(meta["method"])
    check_compatible(path, meta, method, set())
    method.validate()
    corpus, memory = load_memory(path, meta)
    info = {"source": "loaded", "path": str(path), "passages": len(corpus), "build_ms": meta.get("build_ms"),
            "built": meta.get("created")}
    return RagSession(method, corpus, memory, "cpu", None, info)


def query_params(session: RagSession) -> set[str]:
    return {s.name for s in param_specs(type(session.method))} - BUILD_PARAMS - {"active", "max_rounds", "new_per_round"}


@dataclass
class Retrieved:
    ids: list[int]
    scores: list[float]
    steps: dict
    method: object
    ms: float


def retrieve(session: RagSession, question: str, params: dict) -> Retrieved:
    """Relevancy + Retrieval of ``session``'s method (with the request's query-time ``params``) for ``question``."""
    allowed = query_params(session)
    bad = sorted(set(params) - allowed)
    if bad:
        raise HetmemError(f"memory requests take {', '.join(sorted(allowed))} (got {', '.join(bad)})")
    m = session.method
    method = get_method(m.name, **{**m.params(), **params})
    method.validate()
    timer = StepTimer()
    timer.phase = "query"
    t0 = time.perf_counter()
    sel = method.pipeline(session.device, timer).select(session.memory, Query(text=question))
    ms = (time.perf_counter() - t0) * 1e3
    return Retrieved(list(sel.ids), [float(s) for s in sel.scores], timer.summary(), method, ms)


def context_text(session: RagSession, ids: list[int]) -> str:
    blocks = [passage_block(r + 1, session.corpus.passages[i]) for r, i in enumerate(ids)]
    return INSTRUCTION + "\n\n" + ("\n\n".join(blocks) if blocks else "(no passages)")


def fit(build_ids, n_ids: int, limit: int) -> tuple[list[int], int]:
    """The prompt ids with as many of the ``n_ids`` best passages as fit in ``limit`` tokens (dropped from the
    bottom), and how many were kept. ``build_ids(k)`` makes the prompt with the best ``k``."""
    k = n_ids
    ids = build_ids(k)
    while len(ids) > limit and k > 0:
        k -= 1
        ids = build_ids(k)
    return ids, k


def rag_report(name: str, session: RagSession, got: Retrieved, kept: int) -> dict:
    ps = session.corpus.passages
    return {"memory": name, "method": got.method.name, "params": got.method.params(), "time_source": "measured",
            "retrieval_ms": round(got.ms, 3), "steps": got.steps,
            "retrieved": [{"id": ps[i].id, "source": ps[i].source, "score": round(s, 6), "rank": r + 1,
                           "in_prompt": r < kept} for r, (i, s) in enumerate(zip(got.ids, got.scores))]}
