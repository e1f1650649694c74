"""A sharded RAG memory: the passages split across N shards, each searched on its own, merged on the head.

``hetmem index --shards N`` cuts the corpus at document boundaries into N contiguous ranges of passages
(``partition``): shard ``i`` holds global passages ``[first_i, end_i)``. The memory's data folder holds

    passages.jsonl          every passage (the head builds the prompt from them)
    bm25_global.npz         the vocabulary, each term's document frequency, the passage count and the average
                            passage length: the corpus's GLOBAL BM25 statistics
    shard<i>/bm25_tf.npz    the shard's term x passage counts (rows: the global vocabulary)
    shard<i>/bm25_meta.npz  the shard's passage lengths and its first global passage id
    shard<i>/dense.faiss    the shard's own FAISS index of its passages' embeddings

Exactness. A shard weights its counts with the global statistics (``ops.bm25.bm25_weights(df=, n_docs=,
avgdl=)``), the same float64 arithmetic per (term, passage) as the unsharded build, and sums a passage's
weights in the query's term order as the unsharded scorer does: every BM25 score is bit-identical. Each
shard returns its local top ``k`` under (score descending, global id ascending); its passages are a
contiguous range of global ids, so the local order is the global one, and the head's merge of all shards'
candidates under the same rule (``merge_ranked``) is the unsharded top ``k`` (``ops.rank_fusion.topk_ranked``'s
rule). A flat FAISS index scores each passage by its own inner product whatever else the index holds: the
dense top ``k`` is the unsharded one (an ``hnsw`` index is approximate, sharded or not).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from hetmem.errors import HetmemError
from hetmem.ops.bm25 import Bm25Stats, average_length, bm25_scores, bm25_weights
from hetmem.ops.dense_search import build_index, search
from hetmem.ops.rank_fusion import topk_ranked

GLOBAL_FILE = "bm25_global.npz"
SHARD_FILES = ("bm25_tf.npz", "bm25_meta.npz", "dense.faiss")


def shard_dir(i: int) -> str:
    return f"shard{i}"


def partition(sources: list[str], n_shards: int) -> list[tuple[int, int]]:
    """Cut passages (their documents' ``sources``, consecutive per document) into ``n_shards`` contiguous
    ranges at document boundaries, as even in passages as the documents allow."""
    n = len(sources)
    starts = [i for i in range(n) if i == 0 or sources[i] != sources[i - 1]]
    if n_shards < 1:
        raise HetmemError(f"--shards must be at least 1 (got {n_shards})")
    if n_shards > len(starts):
        raise HetmemError(f"--shards {n_shards} exceeds the corpus's {len(starts)} documents (a shard holds whole documents)")
    cuts, last = [0], 0  # last: the document the previous cut starts
    for s in range(1, n_shards):
        target = n * s / n_shards
        # the document start nearest the target, leaving at least one document to each shard
        free = range(last + 1, len(starts) - (n_shards - s) + 1)
        last = min(free, key=lambda j: (abs(starts[j] - target), j))
        cuts.append(starts[last])
    cuts.append(n)
    return [(cuts[i], cuts[i + 1]) for i in range(n_shards)]


def file_sha256(path: Path, fsync: bool = False) -> str:
    """The file's sha256 (read in 4 MiB blocks); with ``fsync`` it is also forced to disk."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
        if fsync:
            os.fsync(fh.fileno())
    return h.hexdigest()


def write_shards(d: Path, memory, ranges: list[tuple[int, int]]) -> list[str]:
    """Write the global statistics and every shard's files into data folder ``d``; return their relative
    paths. ``memory`` is the unsharded build (its BM25 counts and/or FAISS index are cut by column / row)."""
    files = []
    if "bm25" in memory.meta:
        st = memory.meta["bm25"]
        terms = np.empty(len(st.vocab), dtype=object)
        for t, i in st.vocab.items():
            terms[i] = t
        df = np.diff(st.tf.indptr).astype(np.int64)
        np.savez(d / GLOBAL_FILE, terms=terms.astype(str), df=df, n_docs=np.int64(st.tf.shape[1]),
                 avgdl=np.float64(average_length(st.doc_len)))
        files.append(GLOBAL_FILE)
    vecs = None
    if "faiss" in memory.meta:
        index = memory.meta["faiss"]
        vecs = index.reconstruct_n(0, index.ntotal)
    for i, (a, b) in enumerate(ranges):
        sd = d / shard_dir(i)
        sd.mkdir()
        if "bm25" in memory.meta:
            st = memory.meta["bm25"]
            sp.save_npz(sd / "bm25_tf.npz", st.tf[:, a:b].tocsr())
            np.savez(sd / "bm25_meta.npz", doc_len=st.doc_len[a:b], first=np.int64(a))
            files += [f"{shard_dir(i)}/bm25_tf.npz", f"{shard_dir(i)}/bm25_meta.npz"]
        if vecs is not None:
            import faiss

            faiss.write_index(build_index(vecs[a:b], memory.meta.get("index_type", "flat")), str(sd / "dense.faiss"))
            files.append(f"{shard_dir(i)}/dense.faiss")
    return files


def is_shard_file(name: str) -> bool:
    parts = name.split("/")
    return name == GLOBAL_FILE or (len(parts) == 2 and parts[0].startswith("shard") and parts[0][5:].isdigit()
                                   and parts[1] in SHARD_FILES)


@dataclass
class RagShard:
    """One shard's searchable memory: global passages ``[first, end)``."""

    index: int
    first: int
    end: int
    tf: sp.csr_matrix | None = None
    doc_len: np.ndarray | None = None
    df: np.ndarray | None = None
    n_docs: int = 0
    avgdl: float = 1.0
    faiss: object = None
    _weights: dict | None = None

    @classmethod
    def load(cls, path: str | Path, meta: dict, i: int) -> "RagShard":
        """Load shard ``i`` of the memory at ``path`` (``meta``: its memory.json), its files checked against
        their sha256 in memory.json."""
        d = Path(path).expanduser() / meta["data_dir"]
        a, b = meta["shards"][i]
        sums = meta.get("sha256", {})
        mine = [f for f in meta["files"] if f.startswith(shard_dir(i) + "/")]
        try:
            for f in mine + ([GLOBAL_FILE] if GLOBAL_FILE in meta["files"] else []):
                if file_sha256(d / f) != sums.get(f):
                    raise HetmemError(f"memory {path} is damaged: {f} does not match its sha256 in memory.json "
                                      "(rebuild it with 'hetmem index')")
            sh = cls(i, a, b)
            sd = d / shard_dir(i)
            if (sd / "bm25_tf.npz").exists():
                sh.tf = sp.load_npz(sd / "bm25_tf.npz").tocsr()
                with np.load(sd / "bm25_meta.npz", allow_pickle=False) as z:
                    sh.doc_len = z["doc_len"]
                    if int(z["first"]) != a:
                        raise ValueError(f"shard {i} starts at passage {int(z['first'])}, memory.json says {a}")
                with np.load(d / GLOBAL_FILE, allow_pickle=False) as z:
                    sh.df, sh.n_docs, sh.avgdl = z["df"], int(z["n_docs"]), float(z["avgdl"])
                if sh.tf.shape != (sh.df.shape[0], b - a) or sh.doc_len.shape != (b - a,):
                    raise ValueError(f"shard {i}'s BM25 counts do not match its passages")
            if (sd / "dense.faiss").exists():
                import faiss

                sh.faiss = faiss.read_index(str(sd / "dense.faiss"))
                if sh.faiss.ntotal != b - a:
                    raise ValueError(f"shard {i}'s FAISS index does not match its passages")
        except HetmemError:
            raise
        except Exception as exc:  # noqa: BLE001 -- any decoding failure means a damaged memory
            raise HetmemError(f"memory {path} is damaged: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
        return sh

    def weights(self, k1: float, b: float) -> sp.csr_matrix:
        if self._weights is None or self._weights["kb"] != (k1, b):
            w = bm25_weights(self.tf, self.doc_len, k1, b, df=self.df, n_docs=self.n_docs, avgdl=self.avgdl)
            self._weights = {"kb": (k1, b), "w": w}
        return self._weights["w"]

    def search(self, req: dict) -> dict:
        """``req``: ``terms`` (global term ids of the query, in its order) with ``k_bm25``, ``k1``, ``b``;
        ``q`` (the query embedding) with ``k_dense``. Returns global ids and scores, best first."""
        out = {}
        if req.get("terms") is not None:
            s = _scores(self.weights(req["k1"], req["b"]), np.asarray(req["terms"], dtype=np.int64))
            ids, vals = topk_ranked(s, req["k_bm25"])
            out["bm25_ids"], out["bm25_vals"] = ids + self.first, vals
        if req.get("q") is not None:
            vals, ids = search(self.faiss, req["q"], req["k_dense"], ef_search=max(64, req["k_dense"]))
            keep = ids[0] >= 0
            ids, vals = ids[0][keep].astype(np.int64), vals[0][keep]
            order = np.lexsort((ids, -vals.astype(np.float64)))
            out["dense_ids"], out["dense_vals"] = ids[order] + self.first, vals[order]
        return out


def _scores(W: sp.csr_matrix, term_ids: np.ndarray) -> np.ndarray:
    return bm25_scores(Bm25Stats({}, W, np.zeros(0), 0.0, 0.0, W), term_ids)


def merge_ranked(ids: list[np.ndarray], vals: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The global top ``k`` of every shard's candidates, best first: score descending, then lower id."""
    if not ids:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    gi = np.concatenate(ids).astype(np.int64)
    gv = np.concatenate(vals)
    order = np.lexsort((gi, -gv.astype(np.float64)))[:k]
    return gi[order], gv[order]


def read_vocab(path: str | Path, meta: dict) -> dict[str, int]:
    """The global vocabulary (term -> global id) of a sharded memory: the head maps query terms with it."""
    with np.load(Path(path).expanduser() / meta["data_dir"] / GLOBAL_FILE, allow_pickle=False) as z:
        return {str(t): i for i, t in enumerate(z["terms"].tolist())}


def shard_summary(meta: dict) -> list[dict]:
    return [{"shard": i, "passages": [a, b]} for i, (a, b) in enumerate(meta.get("shards", []))]

