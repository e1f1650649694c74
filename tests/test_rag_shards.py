"""Sharded RAG memory (``hetmem index --shards N``): every BM25 score equals the unsharded build's, and the
BM25, dense and hybrid top-k equal the unsharded ones, in-process and on Ray memory nodes (one local Ray for
the module); a node SIGKILLed mid-way through a batch of questions re-hydrates from the saved memory and
the answers do not change."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from hetmem.cli import main
from hetmem.errors import HetmemError
from hetmem.methods import get_method
from hetmem.methods.rag_bm25 import Bm25Relevancy
from hetmem.ops.bm25 import tokenize
from hetmem.core.timer import StepTimer
from hetmem.core.types import Query
from hetmem.rag.shards import RagShard, partition
from hetmem.rag.store import load_memory, read_meta
from hetmem.runtime.rag import RagSession
from hetmem.testing import save_tiny_model_dir

TOPICS = ["copper mining", "river ferries", "glass furnaces", "beekeeping", "star charts", "clock repair",
          "lamp oil", "bookbinding", "salt trade", "wool dyeing", "bell casting", "map printing"]
QUESTIONS = ["guild of bell casting", "hall 7 spring", "salt", "notes on glass and copper", "river ferries hall 3",
             "unknownword", "the guild met every spring"]
K = (1, 3, 5, 9, 40)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for i, t in enumerate(TOPICS):  # repeated sentences: many exactly tied scores, the tie rule matters
        (d / f"doc{i:02d}.txt").write_text(f"Notes on {t}. The guild of {t} met in hall {i % 5} every spring. "
                                           * (1 + i % 4))
    return d


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A small random BERT with MiniLM's tokenizer (fast, and a real dense ranking)."""
    from transformers import BertConfig, BertModel

    from hetmem.rag.embed import resolve_embed_model

    src, _ = resolve_embed_model(None)
    d = tmp_path_factory.mktemp("tinybert")
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / f, d / f)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    BertModel(cfg).save_pretrained(d)
    return d


def _index(corpus_dir, out, method, *extra):
    assert main(["index", "--corpus", str(corpus_dir), "--method", method, "--out", str(out),
                 "--passage-tokens", "12", "--passage-overlap", "3", *extra]) == 0
    return out


def _session(out, method):
    meta = read_meta(out)
    corpus, memory = load_memory(out, meta)
    return RagSession(method, corpus, memory), meta


@pytest.fixture(scope="module")
def memories(corpus_dir, tmp_path_factory, tiny_encoder):
    d = tmp_path_factory.mktemp("mem")
    enc = ("--embed-model", str(tiny_encoder))
    out = {}
    for m, extra in (("rag-bm25", ()), ("rag-dense", enc), ("rag-hybrid", enc)):
        out[m] = {n: _index(corpus_dir, d / f"{m}-{n}", m, *extra, *(("--shards", str(n)) if n > 1 else ()))
                  for n in (1, 2, 3)}
    return out


def _method(name, tiny_encoder, k):
    kw = {} if name == "rag-bm25" else {"embed_model": str(tiny_encoder)}
    if name == "rag-hybrid":
        kw["candidates"] = max(k, 6)
    return get_method(name, top_k=k, passage_tokens=12, passage_overlap=3, **kw)


def _ranked(session, q, k):
    m = session.method
    sel = session._pipeline(m, StepTimer(enabled=False)).select(session.memory, Query(text=q))
    return sel.ids, [float(s) for s in sel.scores]


def test_partition_keeps_documents_whole_and_balances():
    src = list("aabbbcddddde")
    assert partition(src, 3) == [(0, 5), (5, 6), (6, 12)]
    assert partition(list("abc"), 3) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(HetmemError, match="exceeds the corpus's 2 documents"):
        partition(list("aab"), 3)


def test_bm25_scores_equal_unsharded_exactly(memories):
    base, _ = _session(memories["rag-bm25"][1], get_method("rag-bm25", passage_tokens=12, passage_overlap=3))
    for n in (2, 3):
        out = memories["rag-bm25"][n]
        meta = read_meta(out)
        assert len(meta["shards"]) == n and meta["shards"][-1][1] == meta["n_passages"]
        shards = [RagShard.load(out, meta, i) for i in range(n)]
        vocab = base.memory.meta["bm25"].vocab
        for k1, b in ((1.2, 0.75), (0.9, 0.0)):
            rel = Bm25Relevancy(k1, b)
            for q in QUESTIONS:
                want = rel.score(base.memory, Query(text=q)).values.numpy()
                terms = np.fromiter((vocab[t] for t in tokenize(q) if t in vocab), dtype=np.int64)
                got = np.full_like(want, np.nan)
                for sh in shards:  # every passage's score: k = all of the shard's passages
                    r = sh.search({"terms": terms, "k_bm25": sh.end - sh.first, "k1": k1, "b": b})
                    got[r["bm25_ids"]] = r["bm25_vals"]
                assert np.array_equal(got, want), (n, q)  # bit-identical, not close


@pytest.mark.parametrize("name", ["rag-bm25", "rag-dense", "rag-hybrid"])
def test_sharded_topk_equals_unsharded(memories, tiny_encoder, name):
    for k in K:
        m = _method(name, tiny_encoder, k)
        base, _ = _session(memories[name][1], m)
        for n in (2, 3):
            s, meta = _session(memories[name][n], m)
            assert s.memory_info["sharded"]["shards"] == n and s.memory_info["sharded"]["served"] == "in-process"
            for q in QUESTIONS:
                assert _ranked(s, q, k) == _ranked(base, q, k), (name, n, k, q)


def test_damaged_shard_is_one_clear_line(memories, tmp_path):
    out = tmp_path / "m"
    shutil.copytree(memories["rag-bm25"][2], out)
    meta = read_meta(out)
    (out / meta["data_dir"] / "shard1" / "bm25_meta.npz").write_bytes(b"flipped")
    corpus, memory = load_memory(out, meta)  # the head's files are intact
    with pytest.raises(HetmemError, match="shard1/bm25_meta.npz does not match its sha256"):
        RagSession(get_method("rag-bm25"), corpus, memory)


def test_index_shards_cli_errors(corpus_dir, tmp_path, capsys):
    capsys.readouterr()
    assert main(["index", "--corpus", str(corpus_dir), "--method", "rag-bm25", "--out", str(tmp_path / "x"),
                 "--shards", "13"]) == 2
    assert "exceeds the corpus's 12 documents" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------- memory nodes

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def nodes():
    from hetmem.runtime.nodes.cluster import NodeCluster

    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=5, include_dashboard=False, log_to_driver=False, configure_logging=False)
    cluster = NodeCluster(2, timeout_s=120)
    yield cluster
    cluster.close()
    ray.shutdown()


def test_nodes_equal_unsharded_and_survive_a_kill_mid_batch(memories, tiny_encoder, nodes):
    from hetmem.runtime.rag_shards import NodeShards

    m = _method("rag-hybrid", tiny_encoder, 5)
    base, _ = _session(memories["rag-hybrid"][1], m)
    want = [_ranked(base, q, 5) for q in QUESTIONS]
    meta = read_meta(memories["rag-hybrid"][3])
    corpus, memory = load_memory(memories["rag-hybrid"][3], meta)
    shards = NodeShards(memory, nodes)  # 3 shards on 2 nodes
    s = RagSession(m, corpus, memory, shards=shards)
    assert s.memory_info["sharded"]["placement"] == {"node0": [0, 2], "node1": [1]}
    got = []
    for i, q in enumerate(QUESTIONS):
        if i == 3:
            nodes.kill(0)  # SIGKILL the node holding shards 0 and 2, between two questions of the batch
        got.append(_ranked(s, q, 5))
    assert got == want
    assert nodes.restarts == 1
    t = nodes.ledger.summary()
    assert t["query"]["calls"] == len(QUESTIONS) and t["query"]["bytes_to_head"] > 0
    shards.close()


def test_nodes_without_the_head_file_system_get_the_shard_files(memories, tiny_encoder, nodes):
    """A node on another machine cannot read the head's saved memory: its shards' files travel in the load
    request (forced here with ship_files=True on local nodes), it writes them to its own directory, checks their
    sha256 and answers exactly as the unsharded memory does; rag_drop removes its copy."""
    from hetmem.runtime.rag_shards import NodeShards

    m = _method("rag-bm25", tiny_encoder, 5)
    base, _ = _session(memories["rag-bm25"][1], m)
    want = [_ranked(base, q, 5) for q in QUESTIONS]
    meta = read_meta(memories["rag-bm25"][3])
    corpus, memory = load_memory(memories["rag-bm25"][3], meta)
    shards = NodeShards(memory, nodes, ship_files=True)
    try:
        s = RagSession(m, corpus, memory, shards=shards)
        assert [_ranked(s, q, 5) for q in QUESTIONS] == want
        assert shards.record()["files_shipped_to"] == ["node0", "node1"]
        loaded = nodes.call([shards._load_requests(i) for i in range(nodes.n)], phase="load", step="prepare")
        assert {r["loaded_from"] for node in loaded for r in node} == {"shipped files"}
    finally:
        shards.close()


def test_cli_questions_on_memory_nodes(memories, corpus_dir, tmp_path, capsys, nodes):
    model = save_tiny_model_dir(tmp_path / "model", "qwen2")
    qf = tmp_path / "q.jsonl"
    qf.write_text("".join(json.dumps({"question": q}) + "\n" for q in QUESTIONS[:3]))
    base = ["run", "--method", "rag-bm25", "--questions", str(qf), "--model", str(model), "--max-new-tokens", "2",
            "--top-k", "3"]
    capsys.readouterr()
    assert main(base + ["--memory", str(memories["rag-bm25"][1])]) == 0
    want = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert main(base + ["--memory", str(memories["rag-bm25"][3]), "--memory-nodes", "2"]) == 0
    got = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [g["retrieved"] for g in got] == [w["retrieved"] for w in want]
    assert [g["answer"] for g in got] == [w["answer"] for w in want]
    assert got[0]["memory_nodes"]["n"] == 2 and got[0]["steps"]["relevancy"]["ran_on"] == ["node0", "node1"]
    assert {t["phase"] for t in got[1]["transfers"]} == {"query"}
    assert main(base + ["--memory", str(memories["rag-bm25"][1]), "--memory-nodes", "2"]) == 2
    assert "is not sharded" in capsys.readouterr().err
