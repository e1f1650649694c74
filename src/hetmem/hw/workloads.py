"""Workloads for the planner: from a profile (``hetmem.profile/1``), or shaped like the paper's methods.

A workload is the per-call work of each step (op class, flops, bytes), what each step hands to the
next (Memory delta, scores, selection), and how many calls make one unit (one decode token). Counts
from a profile are the profiler's *analytic* counts; the paper-shaped ones are computed here from
the prototype's sizes (He, Ma, Sun, Cong, arXiv 2603.29002) at a Llama-3-8B-like layer (8 KV heads, head dim 128, fp16).
"""

from __future__ import annotations

import math
from pathlib import Path

from hetmem.errors import HetmemError
from hetmem.files import read_json_file
from hetmem.hw.catalog import STEPS
from hetmem.hw.cost import OpWork, StepWork, Workload

CONTEXT_PHASE = "context"  # profiling.contextual.PHASE (hw sits below profiling)
_ELT = {"float32": 4, "float16": 2, "bfloat16": 2, "float8": 1, "int8": 1, "int16": 2}


# ---------------------------------------------------------------------------------------------------
# From a profile


def read_profile(path: str | Path) -> dict:
    data = read_json_file(path, "profile", " (write one with: hetmem profile ... --out DIR)")
    if not isinstance(data, dict) or not str(data.get("schema", "")).startswith("hetmem.profile/"):
        raise HetmemError(f"{path} is not a hetmem profile (no 'schema: hetmem.profile/1')")
    if not isinstance(data.get("records"), list):
        raise HetmemError(f"profile {path} has no 'records' list")
    for i, r in enumerate(data["records"]):
        if not isinstance(r, dict):
            raise HetmemError(f"profile {path}: record {i} is a {type(r).__name__}, not an object")
    return data


def workloads_from_profile(profile: dict, phase: str = "decode", kv_dtype: str | None = None) -> list[Workload]:
    """One workload per method x length from the profile's ``phase`` records (ok ones, with counts).

    ``kv_dtype`` re-targets the counts to another KV element type (e.g. a float32 CPU profile planned for
    bfloat16 on a GPU): the KV-sized bytes (page summaries, gathered and attended KV, raw KV, the query) are
    scaled by the element-size ratio; scores (float32) and ids (int64) are not.
    """
    shape = profile.get("shape") or {}
    batch = int(profile.get("batch") or 1)
    dtype = str(profile.get("dtype") or "float32")
    e = _ELT.get(dtype, 4)
    kv_heads = int(shape.get("kv_heads") or 1)
    heads = int(shape.get("heads") or kv_heads)
    head_dim = int(shape.get("head_dim") or 64)
    rows = kv_heads * batch
    f = 1.0
    if kv_dtype:
        if kv_dtype not in _ELT:
            raise HetmemError(f"unknown --kv-dtype '{kv_dtype}': use one of {', '.join(_ELT)}")
        f = _ELT[kv_dtype] / e
        dtype, e = kv_dtype, _ELT[kv_dtype]
    groups: dict[tuple[str, int], dict[str, dict]] = {}
    units: dict[tuple[str, int], str] = {}
    for r in profile["records"]:
        if r.get("status") != "ok" or r.get("step") not in STEPS:
            continue
        if not r.get("per_call") or r["per_call"].get("bytes_read") is None:
            continue
        # the contextual-memory methods (memagent, hmt, lact) have one phase, 'context' (the whole run over the
        # context): planned with the decode phase, per context token
        if r.get("phase") == phase or (phase == "decode" and r.get("phase") == CONTEXT_PHASE):
            key = (r["method"], int(r["length"]))
            units[key] = "per context token (whole run / context tokens)" if r["phase"] == CONTEXT_PHASE else "per decode token"
            groups.setdefault(key, {})[r["step"]] = r
    out = []
    for (method, length), recs in sorted(groups.items()):
        steps = {}
        for name, r in recs.items():
            pc = r["per_call"]
            tokens = max(1, int(r.get("tokens") or 1))
            calls = float(r.get("calls") or 1) / tokens
            ops = []
            for o in r.get("ops") or [{"class": r.get("op_class", "sparse"), **pc}]:
                op = OpWork(o.get("class", "sparse"), float(o.get("flops") or 0), float(o.get("bytes_read") or 0),
                            float(o.get("bytes_written") or 0), rows=rows, name=o.get("op", ""))
                if op.cls == "topk":
                    op.rows, op.n, op.k = _topk_shape(op, batch, rows)
                if op.cls in ("reduce", "gather"):
                    op.bytes_read *= f
                    op.bytes_written *= f
                elif op.cls in ("gemv", "attention", "dense"):
                    op.bytes_read *= f
                ops.append(op)
            sw = StepWork(name, ops, kv_dtype or str(r.get("dtype") or dtype), out_bytes=float(pc.get("bytes_written") or 0),
                          calls=calls, measured_us=(pc["ms"] * 1e3 if pc.get("ms") is not None else None))
            if name == "prepare":
                sw.out_bytes *= f
            if name in ("prepare", "apply"):
                sw.raw_bytes = float(pc.get("bytes_read") or 0) * f
            if name == "apply":
                sw.out_bytes = heads * head_dim * e * batch
            steps[name] = sw
        out.append(Workload(method, length, steps, query_bytes=heads * head_dim * e * batch, unit=units[(method, length)],
                            source=f"profile ({profile.get('mode')}, {shape.get('name') or profile.get('model')}, "
                                   f"{profile.get('device')}, analytic counts)",
                            meta={"shape": shape.get("name"), "dtype": dtype}))
    if not out:
        raise HetmemError(f"the profile has no '{phase}' step records with counts to plan from")
    return out


def _topk_shape(op: OpWork, batch: int, kv_rows: int) -> tuple[int, int, int]:
    """(rows, n, k) of a counted top-k (hetmem.profiling.counters.topk: reads 4*rows*n bytes, writes
    8*rows*k, flops rows*(n+k)*ceil(log2 k)). A selection is per KV head (quest, seer) or shared by all heads
    (dsa); the row count whose k matches the flops' log2 k wins."""
    best = None
    for r in (kv_rows, batch):
        n, k = op.bytes_read / (4 * r), op.bytes_written / (8 * r)
        if n < 1 or k < 1:
            continue
        lg = op.flops / max(r * (n + k), 1)
        err = abs(lg - math.ceil(math.log2(max(k, 2))))
        if best is None or err < best[0]:
            best = (err, r, n, k)
    if best is None:
        return 1, max(1, int(op.bytes_read / 4)), max(1, int(op.bytes_written / 8))
    return best[1], max(1, round(best[2])), max(1, round(best[3]))


# ---------------------------------------------------------------------------------------------------
# The paper's example and paper-shaped workloads


def design_example() -> Workload:
    """the paper's (arXiv 2603.29002) decode-sized SeerAttention-R example (MI210 measured 250 / 82.5 / 36.2 / 7.6 us).

    Sizes: 8,192 blocks of 64 tokens, one fp16 256-wide pooled key per block (the 4 MB index), top-64
    blocks, a 128-wide head for the block-sparse attention. The widths are our reading of the figures.
    """
    nb, blk, w = 8192, 64, 256
    index = nb * w * 2  # 4 MB
    raw = nb * blk * w * 2
    prep = StepWork("prepare", [OpWork("reduce", flops=nb * blk * w + 2 * nb * w * w, bytes_read=raw, bytes_written=index)],
                    "float16", out_bytes=w * 2, raw_bytes=raw)  # per query only the newest block's summary moves
    rel = StepWork("relevancy", [OpWork("gemv", flops=2 * nb * w, bytes_read=index + w * 2, bytes_written=nb * 4)],
                   "float16", out_bytes=nb * 4)
    ret = StepWork("retrieval", [OpWork("topk", flops=nb, bytes_read=nb * 4, bytes_written=64 * 4, n=nb, k=64)],
                   "float16", out_bytes=64 * 4)
    kv = 64 * blk * 128 * 2 * 2
    app = StepWork("apply", [OpWork("attention", flops=4 * 64 * blk * 128, bytes_read=kv, bytes_written=128 * 2)],
                   "float16", out_bytes=128 * 2, raw_bytes=0)
    return Workload("seer-attention-r (paper prototype example (arXiv 2603.29002))", nb * blk, {"prepare": prep, "relevancy": rel, "retrieval": ret, "apply": app},
                    query_bytes=w * 2, unit="per query", source="paper prototype example (arXiv 2603.29002) (the prototype's MI210 kernels)")


KV_HEADS, HEADS, HEAD_DIM, E = 8, 32, 128, 2  # Llama-3-8B-like layer, fp16 KV


def _apply_sparse(tokens: int) -> StepWork:
    kv = KV_HEADS * tokens * HEAD_DIM * E * 2
    return StepWork("apply", [OpWork("gather", bytes_read=kv, bytes_written=kv),
                              OpWork("attention", flops=4 * HEADS * tokens * HEAD_DIM, bytes_read=kv,
                                     bytes_written=HEADS * HEAD_DIM * E)],
                    "float16", out_bytes=HEADS * HEAD_DIM * E, raw_bytes=kv)


def seer_attention_r(L: int, block: int = 64, k: int = 64) -> Workload:
    """SeerAttention-R decode: gated query GEMV against pooled block keys, top-64 blocks per KV head."""
    nb = L // block
    summ = KV_HEADS * nb * HEAD_DIM * E
    prep = StepWork("prepare", [OpWork("reduce", flops=KV_HEADS * HEAD_DIM * (1 + 2 * HEAD_DIM / block),
                                       bytes_read=KV_HEADS * HEAD_DIM * E, bytes_written=KV_HEADS * HEAD_DIM * E)],
                    "float16", out_bytes=KV_HEADS * HEAD_DIM * E, raw_bytes=KV_HEADS * HEAD_DIM * E)
    rel = StepWork("relevancy", [OpWork("gemv", flops=2 * HEADS * nb * HEAD_DIM, bytes_read=summ, bytes_written=KV_HEADS * nb * 4)],
                   "float16", out_bytes=KV_HEADS * nb * 4)
    ret = StepWork("retrieval", [OpWork("topk", flops=KV_HEADS * nb, bytes_read=KV_HEADS * nb * 4,
                                        bytes_written=KV_HEADS * k * 4, n=nb, k=min(k, nb), rows=KV_HEADS)],
                   "float16", out_bytes=KV_HEADS * k * 4)
    return Workload("seer-attention-r", L, {"prepare": prep, "relevancy": rel, "retrieval": ret,
                                            "apply": _apply_sparse(min(L, k * block))},
                    query_bytes=HEADS * HEAD_DIM * E, unit="per decode step, one layer", source="paper-shaped (the paper's prototype sizes, arXiv 2603.29002)")


def dsa(L: int, index_heads: int = 16, index_dim: int = 128, k: int = 2048) -> Workload:
    """DSA lightning indexer: fp8 index keys, 16 index heads (the FPGA prototype), top-2048 tokens."""
    prep = StepWork("prepare", [OpWork("reduce", flops=2 * 4096 * index_dim, bytes_read=4096 * E + 4096 * index_dim * E,
                                       bytes_written=index_dim)],
                    "float8", out_bytes=index_dim, raw_bytes=4096 * E)
    rel = StepWork("relevancy", [OpWork("gemv", flops=(2 * index_dim + 2) * index_heads * L, bytes_read=L * index_dim,
                                        bytes_written=L * 4)], "float8", out_bytes=L * 4)
    kk = min(k, L)
    ret = StepWork("retrieval", [OpWork("topk", flops=L, bytes_read=L * 4, bytes_written=kk * 4, n=L, k=kk)],
                   "float8", out_bytes=kk * 4)
    return Workload("dsa", L, {"prepare": prep, "relevancy": rel, "retrieval": ret, "apply": _apply_sparse(kk)},
                    query_bytes=index_heads * (index_dim + 2), unit="per decode step, one layer", source="paper-shaped (the paper's prototype sizes, arXiv 2603.29002)")


def lserve(L: int, page: int = 16, k: int = 64) -> Workload:
    """LServe/Quest pages: per-page key min/max, upper-bound scoring, top-64 pages per KV head."""
    npg = L // page
    summ = KV_HEADS * npg * HEAD_DIM * E * 2
    prep = StepWork("prepare", [OpWork("reduce", flops=2 * KV_HEADS * HEAD_DIM, bytes_read=KV_HEADS * HEAD_DIM * E * 3,
                                       bytes_written=KV_HEADS * HEAD_DIM * E * 2)],
                    "float16", out_bytes=KV_HEADS * HEAD_DIM * E * 2, raw_bytes=KV_HEADS * HEAD_DIM * E)
    rel = StepWork("relevancy", [OpWork("gemv", flops=4 * HEADS * npg * HEAD_DIM, bytes_read=summ, bytes_written=KV_HEADS * npg * 4)],
                   "float16", out_bytes=KV_HEADS * npg * 4)
    ret = StepWork("retrieval", [OpWork("topk", flops=KV_HEADS * npg, bytes_read=KV_HEADS * npg * 4,
                                        bytes_written=KV_HEADS * k * 4, n=npg, k=min(k, npg), rows=KV_HEADS)],
                   "float16", out_bytes=KV_HEADS * k * 4)
    return Workload("lserve", L, {"prepare": prep, "relevancy": rel, "retrieval": ret, "apply": _apply_sparse(min(L, k * page))},
                    query_bytes=HEADS * HEAD_DIM * E, unit="per decode step, one layer", source="paper-shaped (the paper's prototype sizes, arXiv 2603.29002)")


def bm25(n_docs: int, query_terms: int = 8, df_frac: float = 0.01, k: int = 64, doc_tokens: int = 100,
         model_params: float = 8e9) -> Workload:
    """BM25 RAG, per query: postings of the query terms (b = 0), top-64 documents, then a prefill of them."""
    postings = int(query_terms * df_frac * n_docs)
    rel = StepWork("relevancy", [OpWork("sparse", flops=2 * postings, bytes_read=postings * 6 + n_docs * 4,
                                        bytes_written=n_docs * 4)], "int16", out_bytes=n_docs * 4)
    ret = StepWork("retrieval", [OpWork("topk", flops=n_docs, bytes_read=n_docs * 4, bytes_written=k * 4, n=n_docs, k=k)],
                   "int16", out_bytes=k * 4)
    toks = k * doc_tokens
    app = StepWork("apply", [OpWork("gather", bytes_read=toks * 4, bytes_written=toks * 4),
                             OpWork("matmul", flops=2 * model_params * toks, bytes_read=model_params * E)],
                   "float16", out_bytes=4096 * E, raw_bytes=toks * 4)
    return Workload("bm25-rag", n_docs, {"relevancy": rel, "retrieval": ret, "apply": app},
                    query_bytes=query_terms * 4, unit="per query (retrieve + prefill 64 passages)", source="paper-shaped (the paper's prototype sizes, arXiv 2603.29002)")


def paper_workloads() -> list[Workload]:
    out = [design_example()]
    for L in (8192, 32768, 131072):
        out += [seer_attention_r(L), dsa(L), lserve(L)]
    out += [bm25(n) for n in (100_000, 1_000_000, 10_000_000)]
    return out


def workload_count(n: int) -> str:
    return f"{n / 1024:.0f}k" if n >= 1024 and n % 1024 == 0 else (f"{n / 1e6:g}M" if n >= 1e6 else str(n))

