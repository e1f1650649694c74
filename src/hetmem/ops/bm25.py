"""BM25 as sparse linear algebra: Prepare builds a term x passage weight matrix, Relevancy sums its rows.

Scoring follows Lucene's BM25 (the variant Lucene, Anserini and ``bm25s`` use):

    score(q, d) = sum_{t in q} idf(t) * tf(t, d) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t)      = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

k1 = 1.2 and b = 0.75 by default; b = 0 drops length normalisation, as the paper's prototype does.
A query term that occurs twice counts twice. Because every weight depends only on (t, d), Prepare
computes them all once into a ``scipy.sparse`` CSR matrix with one row per term; Relevancy for a query
gathers the rows of its terms and adds them into one score per passage (``np.bincount`` over the
non-zeros of those rows) -- the work is proportional to the postings of the query terms, never to
vocabulary x passages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

_WORD = re.compile(r"\w+", re.UNICODE)

# A short English stop list: function words carry no evidence and only cost postings.
STOPWORDS = frozenset(
    """a an and are as at be by for from has have he her his i in is it its of on or she that the their them
    they this to was were what when where which who whom whose why how will with you your do does did
    """.split()
)


def tokenize(text: str, stopwords: frozenset[str] = STOPWORDS) -> list[str]:
    """Lower-cased word tokens (``\\w+``), stop words removed. Used for passages and queries alike."""
    return [w for w in _WORD.findall(text.lower()) if w not in stopwords]


@dataclass
class Bm25Stats:
    """Everything BM25 needs, prepared once.

    ``weights``: CSR [n_terms, n_passages] float32, entry (t, d) = idf(t) * tf-part(t, d).
    ``tf``: CSR [n_terms, n_passages] int32 raw term counts (kept so k1/b can be re-weighted).
    """

    vocab: dict[str, int]
    tf: sp.csr_matrix
    doc_len: np.ndarray  # [n_passages] tokens per passage
    k1: float
    b: float
    weights: sp.csr_matrix

    @property
    def n_passages(self) -> int:
        return self.tf.shape[1]

    def term_ids(self, tokens: list[str]) -> np.ndarray:
        """Ids of the query tokens that occur in the corpus (unknown terms score nothing)."""
        v = self.vocab
        return np.fromiter((v[t] for t in tokens if t in v), dtype=np.int64)


def term_counts(docs: list[list[str]], vocab: dict[str, int] | None = None) -> tuple[dict[str, int], sp.csr_matrix, np.ndarray]:
    """Term x passage count matrix (CSR) of tokenised passages; grows ``vocab`` with new terms."""
    vocab = {} if vocab is None else vocab
    add = vocab.setdefault
    # token ids as one int64 array per passage, not Python ints in a list (8 bytes a token, not ~36)
    per_doc = [np.fromiter((add(t, len(vocab)) for t in toks), dtype=np.int64, count=len(toks)) for toks in docs]
    doc_len = np.fromiter((len(t) for t in docs), dtype=np.int32, count=len(docs))
    rows = np.concatenate(per_doc) if per_doc else np.zeros(0, dtype=np.int64)
    cols = np.repeat(np.arange(len(docs), dtype=np.int64), doc_len)
    data = np.ones(rows.size, dtype=np.int32)
    # COO -> CSR sums duplicate (term, passage) pairs into counts.
    tf = sp.coo_matrix((data, (rows, cols)),
                       shape=(len(vocab), len(docs))).tocsr()
    tf.sum_duplicates()
    return vocab, tf, doc_len


def average_length(doc_len: np.ndarray) -> float:
    """BM25's average passage length (1.0 for an empty or all-empty corpus)."""
    return float(doc_len.mean()) if doc_len.size and doc_len.mean() > 0 else 1.0


def bm25_weights(tf: sp.csr_matrix, doc_len: np.ndarray, k1: float, b: float, *, df: np.ndarray | None = None,
                 n_docs: int | None = None, avgdl: float | None = None) -> sp.csr_matrix:
    """The term x passage BM25 weight matrix from raw counts (same sparsity pattern as ``tf``).

    A shard of a corpus passes the corpus's global statistics (``df`` per term, ``n_docs``, ``avgdl``): its
    weights are then exactly the unsharded build's for its passages (``rag.shards``)."""
    if n_docs is None:
        n_docs = tf.shape[1]
    if df is None:
        df = np.diff(tf.indptr)  # one non-zero per (term, passage): row nnz = document frequency
    df = np.asarray(df).astype(np.float64)
    idf = np.log1p((n_docs - df + 0.5) / (df + 0.5))
    if avgdl is None:
        avgdl = average_length(doc_len)
    norm = k1 * (1.0 - b + b * doc_len.astype(np.float64) / avgdl)  # per passage
    t = tf.data.astype(np.float64)
    term_of_entry = np.repeat(np.arange(tf.shape[0]), np.diff(tf.indptr))
    w = idf[term_of_entry] * t / (t + norm[tf.indices])
    return sp.csr_matrix((w.astype(np.float32), tf.indices.copy(), tf.indptr.copy()), shape=tf.shape)


def build_bm25(docs: list[list[str]], k1: float = 1.2, b: float = 0.75) -> Bm25Stats:
    """Prepare: tokenised passages -> BM25 statistics."""
    vocab, tf, doc_len = term_counts(docs)
    return Bm25Stats(vocab, tf, doc_len, k1, b, bm25_weights(tf, doc_len, k1, b))


def reweight(stats: Bm25Stats, k1: float, b: float) -> Bm25Stats:
    """The same statistics under other k1/b (no re-tokenisation)."""
    if (k1, b) == (stats.k1, stats.b):
        return stats
    return Bm25Stats(stats.vocab, stats.tf, stats.doc_len, k1, b, bm25_weights(stats.tf, stats.doc_len, k1, b))


def bm25_scores(stats: Bm25Stats, term_ids: np.ndarray) -> np.ndarray:
    """Relevancy: one float32 score per passage, summing the weight rows of the query's terms."""
    W = stats.weights
    n = W.shape[1]
    if term_ids.size == 0:
        return np.zeros(n, dtype=np.float32)
    starts, ends = W.indptr[term_ids], W.indptr[term_ids + 1]
    if term_ids.size == 1:
        out = np.zeros(n, dtype=np.float32)
        out[W.indices[starts[0]:ends[0]]] = W.data[starts[0]:ends[0]]
        return out
    lens = ends - starts
    total = int(lens.sum())
    # Positions of all postings of all query terms, without a Python loop over postings.
    pos = np.repeat(starts - np.cumsum(lens) + lens, lens) + np.arange(total)
    return np.bincount(W.indices[pos], weights=W.data[pos], minlength=n).astype(np.float32, copy=False)


def bm25_scores_batch(stats: Bm25Stats, queries: list[np.ndarray]) -> np.ndarray:
    """Scores of many queries at once: (query x term counts, sparse) @ (term x passage weights, sparse)."""
    rows = np.repeat(np.arange(len(queries)), [q.size for q in queries])
    cols = np.concatenate(queries) if queries else np.zeros(0, dtype=np.int64)
    Q = sp.csr_matrix((np.ones(cols.size, dtype=np.float32), (rows, cols)), shape=(len(queries), stats.weights.shape[0]))
    return (Q @ stats.weights).toarray()
