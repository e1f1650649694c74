"""Persisted RAG memory: ``hetmem index`` writes it, ``hetmem run --memory DIR`` reuses it.

A memory directory holds

    memory.json      format name and version, method, the parameters that shaped it, embedding model id
    passages.jsonl   the passages (id, source, title, text): Apply needs the raw text
    bm25_tf.npz      BM25 term x passage counts (scipy.sparse CSR)  } rag-bm25, rag-hybrid
    bm25_meta.npz    passage lengths and the vocabulary             }
    dense.faiss      the FAISS index of passage embeddings          } rag-dense, rag-hybrid

Term counts rather than weights are stored, so a run may use other ``--k1``/``--b`` without re-indexing.
The directory is written into a temporary sibling and renamed into place, so a reader never sees half a
memory, and an existing memory is replaced only once the new one is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from hetmem.core.types import Memory
from hetmem.errors import HetmemError
from hetmem.rag.corpus import Corpus, Passage
from hetmem.ops.bm25 import Bm25Stats, bm25_weights
from hetmem.rag.embed import resolve_embed_model

FORMAT = "hetmem-rag-memory"
FORMAT_VERSION = 1
META = "memory.json"


def save_memory(out: str | Path, method, corpus: Corpus, memory: Memory, build_ms: float) -> Path:
    import faiss

    out = Path(out).expanduser()
    if out.exists() and not (out.is_dir() and ((out / META).is_file() or not any(out.iterdir()))):
        raise HetmemError(f"refusing to write the memory to {out}: it exists and is not a hetmem memory directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    try:
        with open(tmp / "passages.jsonl", "w", encoding="utf-8") as fh:
            for p in corpus.passages:
                fh.write(json.dumps(p.to_json(), ensure_ascii=False) + "\n")
        files = ["passages.jsonl"]
        if "bm25" in memory.meta:
            st = memory.meta["bm25"]
            sp.save_npz(tmp / "bm25_tf.npz", st.tf)
            terms = np.empty(len(st.vocab), dtype=object)
            for t, i in st.vocab.items():
                terms[i] = t
            np.savez(tmp / "bm25_meta.npz", doc_len=st.doc_len, terms=terms.astype(str))
            files += ["bm25_tf.npz", "bm25_meta.npz"]
        if "faiss" in memory.meta:
            faiss.write_index(memory.meta["faiss"], str(tmp / "dense.faiss"))
            files.append("dense.faiss")
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "method": method.name,
            "params": {k: getattr(method, k) for k in method.memory_params + _bm25_params(method)},
            "embedding_model": memory.meta.get("embed_model"),
            "embedding_dim": memory.meta.get("dim"),
            "corpus": str(Path(corpus.path).expanduser().resolve()) if corpus.path else "",
            "n_documents": corpus.n_documents,
            "n_passages": len(corpus),
            "build_ms": round(build_ms, 3),
            "time_source": "measured",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": files,
        }
        (tmp / META).write_text(json.dumps(meta, indent=1))
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _bm25_params(method) -> tuple[str, ...]:
    return ("k1", "b") if hasattr(method, "k1") else ()


def read_meta(path: str | Path) -> dict:
    d = Path(path).expanduser()
    if not d.is_dir():
        raise HetmemError(f"memory {path} does not exist or is not a directory (build one with 'hetmem index')")
    try:
        meta = json.loads((d / META).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HetmemError(f"{path} is not a hetmem memory: it has no {META} (build one with 'hetmem index')") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HetmemError(f"memory {path} has an unreadable {META}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise HetmemError(f"{path} is not a hetmem RAG memory")
    if meta.get("format_version") != FORMAT_VERSION:
        raise HetmemError(f"memory {path} has format version {meta.get('format_version')}, this hetmem reads "
                          f"version {FORMAT_VERSION}: rebuild it with 'hetmem index'")
    return meta


def check_compatible(path, meta: dict, method, explicit: set[str]) -> None:
    """Raise if ``method`` cannot use this memory; fill parameters the user left unset from the memory.

    ``explicit``: the parameter names the user gave on the command line.
    """
    if meta["method"] != method.name:
        raise HetmemError(f"memory {path} was built for {meta['method']}, not {method.name}: "
                          f"run --method {meta['method']} or rebuild it with 'hetmem index --method {method.name}'")
    for k, v in meta.get("params", {}).items():
        if not hasattr(method, k):
            continue
        if k in explicit and k in method.memory_params and k != "embed_model" and getattr(method, k) != v:
            raise HetmemError(f"memory {path} was built with --{k.replace('_', '-')} {v}, not {getattr(method, k)}: "
                              "rebuild it with 'hetmem index' or leave the option out")
        if k not in explicit:
            setattr(method, k, v)
    if hasattr(method, "embed_model"):
        _, model_id = resolve_embed_model(method.embed_model)
        if meta.get("embedding_model") != model_id:
            raise HetmemError(f"memory {path} was embedded with '{meta.get('embedding_model')}', but this run embeds "
                              f"queries with '{model_id}': rebuild the memory or pass the same --embed-model")


def load_memory(path: str | Path, meta: dict) -> tuple[Corpus, Memory]:
    import faiss


    d = Path(path).expanduser()
    missing = [f for f in meta.get("files", []) if not (d / f).is_file()]
    if missing:
        raise HetmemError(f"memory {path} is incomplete: {', '.join(missing)} missing (rebuild it with 'hetmem index')")
    try:
        passages = []
        with open(d / "passages.jsonl", encoding="utf-8") as fh:
            for line in fh:
                o = json.loads(line)
                passages.append(Passage(o["id"], o["source"], o["text"], o.get("title")))
        n = len(passages)
        if n != meta["n_passages"]:
            raise ValueError(f"{n} passages, memory.json says {meta['n_passages']}")
        mem = Memory(kind={"rag-bm25": "bm25", "rag-dense": "dense"}.get(meta["method"], "hybrid"), n_units=n)
        if "bm25_tf.npz" in meta["files"]:
            tf = sp.load_npz(d / "bm25_tf.npz").tocsr()
            with np.load(d / "bm25_meta.npz", allow_pickle=False) as z:
                doc_len, terms = z["doc_len"], z["terms"]
            if tf.shape != (len(terms), n) or doc_len.shape != (n,):
                raise ValueError("BM25 statistics do not match the passages")
            k1, b = meta["params"]["k1"], meta["params"]["b"]
            vocab = {str(t): i for i, t in enumerate(terms.tolist())}
            mem.meta["bm25"] = Bm25Stats(vocab, tf, doc_len, k1, b, bm25_weights(tf, doc_len, k1, b))
        if "dense.faiss" in meta["files"]:
            index = faiss.read_index(str(d / "dense.faiss"))
            if index.ntotal != n or index.d != meta.get("embedding_dim"):
                raise ValueError("the FAISS index does not match the passages or the embedding size")
            mem.meta.update(faiss=index, embed_model=meta["embedding_model"], dim=index.d,
                            index_type=meta["params"].get("dense_index", "flat"))
    except HetmemError:
        raise
    except Exception as exc:  # noqa: BLE001 -- any decoding failure means a damaged memory
        raise HetmemError(f"memory {path} is damaged: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    corpus = Corpus(passages, meta.get("corpus", ""), meta.get("n_documents", 0),
                    meta["params"].get("passage_tokens", 0), meta["params"].get("passage_overlap", 0))
    return corpus, mem
