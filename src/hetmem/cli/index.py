"""CLI for RAG: ``hetmem index`` and the RAG options of ``hetmem run`` (registered as the "rag" runner).

    hetmem index --corpus PATH --method rag-bm25|rag-dense|rag-hybrid --out DIR [--shards N]
    hetmem run --method rag-bm25 (--corpus PATH | --memory DIR) (--question TEXT | --questions FILE.jsonl)
               [--top-k K] [--active] [--json] [--memory-nodes N | --ray-address ADDR]  (a sharded memory)
"""

from __future__ import annotations

import json
import sys

import torch

from hetmem.cli.common import RUNNERS, add_method_options, method_from_args
from hetmem.errors import HetmemError
from hetmem.files import read_jsonl_objects
from hetmem.llm.models import load_model
from hetmem.rag.corpus import load_corpus
from hetmem.rag.shards import partition
from hetmem.rag.store import check_compatible, load_memory, read_meta, save_memory
from hetmem.runtime.nodes.cluster import NodeCluster
from hetmem.runtime.nodes.run import annotate_cluster
from hetmem.runtime.rag import RagSession
from hetmem.runtime.rag_shards import NodeShards

RAG_METHODS = ("rag-bm25", "rag-dense", "rag-hybrid")


# The parameters that shape a RAG memory when it is built (the rest act at query time).
PREPARE_PARAMS = {"passage_tokens", "passage_overlap", "k1", "b", "embed_model", "dense_index", "embed_batch"}


def register(subparsers, run_parser) -> None:
    r = run_parser
    r.add_argument("--corpus", default=None, help="RAG: a directory of .txt/.md files, a .jsonl file (text, id, title) or a text file")
    r.add_argument("--memory", default=None, help="RAG: a memory directory written by 'hetmem index'")
    r.add_argument("--questions", default=None, help="RAG: a .jsonl file, one {\"question\": ...} per line; prints one JSON object per line")
    RUNNERS["rag"] = run_rag

    i = subparsers.add_parser("index", help="build a RAG memory (BM25 statistics / embedding index) and write it to a directory")
    i.add_argument("--corpus", required=True, help="a directory of .txt/.md files, a .jsonl file or a text file")
    i.add_argument("--method", required=True, choices=RAG_METHODS)
    i.add_argument("--out", required=True, help="the memory directory to write (replaced atomically if it is a memory)")
    i.add_argument("--device", default="cpu", help="device for the embedding model: cpu or cuda")
    i.add_argument("--shards", type=int, default=1, metavar="N",
                   help="split the documents across N shards (global BM25 statistics, one FAISS index per shard); "
                        "'hetmem run --memory-nodes' serves each on a memory node")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    add_method_options(i, RAG_METHODS, only=PREPARE_PARAMS)
    i.set_defaults(func=cmd_index)


def cmd_index(args) -> int:
    method = method_from_args(args)
    if args.shards < 1:
        raise HetmemError(f"--shards must be at least 1 (got {args.shards})")
    corpus = load_corpus(args.corpus, method.passage_tokens, method.passage_overlap)
    if args.shards > 1:
        partition([p.source for p in corpus.passages], args.shards)  # fail on too few documents before building
    session = RagSession.build(method, corpus, args.device)
    out = save_memory(args.out, method, corpus, session.memory, session.memory_info["build_ms"], shards=args.shards)
    rec = {"memory": str(out), "method": method.name, "documents": corpus.n_documents, "passages": len(corpus),
           "shards": args.shards,
           "build_ms": session.memory_info["build_ms"], "time_source": "measured",
           "embedding_model": session.memory.meta.get("embed_model"), "steps": session.build_steps}
    if args.json:
        print(json.dumps(rec))
    else:
        print(f"wrote {method.name} memory to {out}: {len(corpus)} passages from {corpus.n_documents} documents"
              f"{f' in {args.shards} shards' if args.shards > 1 else ''}, built in {rec['build_ms'] / 1e3:.2f} s (measured)")
    return 0


def _read_questions(path: str) -> list[dict]:
    out = [obj for _, obj in read_jsonl_objects(path, "questions file", "question", nonempty=True)]
    if not out:
        raise HetmemError(f"questions file {path} has no questions")
    return out


def _print_text(rec: dict) -> None:
    print(rec["answer"])
    err = sys.stderr
    print(f"retrieved ({rec['retrievals']} retrieval{'s' if rec['retrievals'] != 1 else ''}):", file=err)
    for r in rec["retrieved"]:
        mark = "" if r["in_prompt"] else "  [dropped: did not fit]"
        print(f"  {r['rank']:>3}. {r['score']:>9.4f}  {r['id']}{mark}", file=err)
    print("Per-step time (measured wall time on this machine)", file=err)
    print(f"  {'step':<10} {'ms':>10} {'calls':>6}  phases", file=err)
    for name, s in rec["steps"].items():
        phases = ", ".join(f"{ph} {v['ms']:.1f} ms x{v['calls']}" for ph, v in s["phases"].items()) or "-"
        print(f"  {name:<10} {s['ms']:>10.1f} {s['calls']:>6}  {phases}", file=err)
    print(f"  prompt {rec['tokens']['prompt']} tokens, generated {rec['tokens']['generated']}; "
          f"prefill {rec['prefill_ms']:.0f} ms, decode {rec['decode_ms']:.0f} ms (measured)", file=err)


def run_rag(args, method) -> int:
    if getattr(args, "context", None):
        raise HetmemError(f"--context is for in-model attention methods; {method.name} reads --corpus PATH or --memory DIR")
    if bool(args.corpus) == bool(args.memory):
        raise HetmemError(f"{method.name} needs exactly one of --corpus PATH or --memory DIR")
    if (args.question is not None) == bool(args.questions):
        raise HetmemError(f"{method.name} needs exactly one of --question TEXT or --questions FILE.jsonl")
    if args.question is not None and not args.question.strip():
        raise HetmemError("the question is empty")
    if args.max_new_tokens < 1:
        raise HetmemError("--max-new-tokens must be at least 1")
    questions = _read_questions(args.questions) if args.questions else [{"question": args.question}]
    on_nodes = getattr(args, "memory_nodes", None) is not None or getattr(args, "ray_address", None)
    if on_nodes and not args.memory:
        raise HetmemError("--memory-nodes serves a sharded memory: build it with 'hetmem index --shards N' and pass --memory DIR")

    cluster = None
    if args.memory:
        meta = read_meta(args.memory)
        explicit = {k for k, v in vars(args).items() if v is not None}
        check_compatible(args.memory, meta, method, explicit)
        method.validate()
        if on_nodes and "shards" not in meta:
            raise HetmemError(f"memory {args.memory} is not sharded: rebuild it with 'hetmem index --shards N' to serve "
                              "it on memory nodes")
        corpus, memory = load_memory(args.memory, meta)
        info = {"source": "loaded", "path": str(args.memory), "passages": len(corpus),
                "build_ms": meta.get("build_ms"), "built": meta.get("created")}
        shards = None
        if on_nodes:
            n = args.memory_nodes if args.memory_nodes is not None else len(meta["shards"])
            cluster = NodeCluster(n, address=args.ray_address)
            torch.set_num_threads(cluster.threads["head"])
            try:
                shards = NodeShards(memory, cluster)
            except BaseException:
                cluster.close()
                raise
        session = RagSession(method, corpus, memory, args.device, None, info, shards=shards)
    else:
        corpus = load_corpus(args.corpus, method.passage_tokens, method.passage_overlap)
        session = RagSession.build(method, corpus, args.device)

    try:
        return _answer_all(args, session, questions, cluster)
    finally:
        if cluster is not None:
            session.shards.close()
            cluster.close()


def _answer_all(args, session: RagSession, questions: list[dict], cluster) -> int:
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    jsonl = bool(args.questions)
    for q in questions:
        rec = session.answer(lm, q["question"], args.max_new_tokens, progress=not jsonl)
        if cluster is not None:
            rec = annotate_cluster(rec, cluster, ("relevancy",))
            cluster.ledger.rows.clear()  # each question's record holds its own transfers
        if "id" in q:
            rec = {"id": q["id"], **rec}
        if isinstance(q.get("answer"), str):
            rec["expected"] = q["answer"]
            rec["correct"] = q["answer"].strip().lower() in rec["answer"].lower()
        if args.json or jsonl:
            print(json.dumps(rec), flush=True)
        else:
            _print_text(rec)
    return 0
