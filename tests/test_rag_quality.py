"""Retrieval quality on a generated corpus: invented facts about invented people in 200 small files.

Each question's answer sits in exactly one passage; recall@k asks whether retrieval finds it.
(Answer accuracy of the default model is measured by benchmarks/eval_rag_qa.py, too slow for a test.)
"""

import pytest

from hetmem.tasks.rag_facts import generate_fact_corpus
from hetmem.methods import get_method
from hetmem.rag.corpus import load_corpus
from hetmem.runtime.rag import RagSession

K = 5


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("facts")
    qs = generate_fact_corpus(d, n_files=200, n_questions=40, seed=11)
    return load_corpus(d, verbose=False), qs


@pytest.fixture(scope="module")
def recalls(task):
    corpus, qs = task
    # the dense index is prepared once and shared: hybrid = BM25 statistics + the same embeddings
    hybrid = RagSession.build(get_method("rag-hybrid"), corpus)
    out = {}
    for name in ("rag-bm25", "rag-dense", "rag-hybrid"):
        session = RagSession(get_method(name), corpus, hybrid.memory)
        hits = [q.passage_id in [corpus.passages[i].id for i in session.retrieve(q.question, K)] for q in qs]
        out[name] = sum(hits) / len(hits)
    rrf = RagSession(get_method("rag-hybrid", fusion="rrf"), corpus, hybrid.memory)
    out["rrf"] = sum(q.passage_id in [corpus.passages[i].id for i in rrf.retrieve(q.question, K)] for q in qs) / len(qs)
    print(f"recall@{K}: {out}")
    return out


def test_each_answer_is_in_exactly_one_passage(task):
    corpus, qs = task
    assert len(corpus) == 200
    for q in qs:
        holders = [p.id for p in corpus.passages if q.entity in p.text]
        assert holders == [q.passage_id]
        assert q.answer in corpus.passages[[p.id for p in corpus.passages].index(q.passage_id)].text


def test_bm25_finds_rare_names(recalls):
    assert recalls["rag-bm25"] >= 0.95


def test_dense_finds_most(recalls):
    assert recalls["rag-dense"] >= 0.6


def test_hybrid_at_least_as_good_as_the_better_of_the_two(recalls):
    assert recalls["rag-hybrid"] >= max(recalls["rag-bm25"], recalls["rag-dense"])
