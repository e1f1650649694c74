"""Corpus loading, passage splitting and the errors bad corpora get."""

import json
from pathlib import Path

import pytest

from hetmem.errors import HetmemError
from hetmem.rag.corpus import load_corpus, split_passages, Document


def _write(root: Path, rel: str, text, mode="w"):
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text, encoding="utf-8")
    return p


def test_directory_of_txt_md_and_jsonl(tmp_path):
    _write(tmp_path, "a.txt", "alpha beta gamma")
    _write(tmp_path, "sub/b.md", "# Title\n\ndelta epsilon")
    _write(tmp_path, "sub/c.jsonl", json.dumps({"id": "doc-7", "title": "Seven", "text": "zeta eta"}) + "\n\n"
           + json.dumps({"text": "theta"}) + "\n")
    _write(tmp_path, "skip.py", "print('not a document')")
    _write(tmp_path, ".hidden/d.txt", "hidden text")
    _write(tmp_path, "empty.txt", "   \n")
    c = load_corpus(tmp_path, size=16, overlap=4, verbose=False)
    assert [p.source for p in c.passages] == ["a.txt", "sub/b.md", "doc-7", "sub/c.jsonl:3"]
    assert [p.id for p in c.passages] == ["a.txt#0", "sub/b.md#0", "doc-7#0", "sub/c.jsonl:3#0"]
    assert c.passages[1].text == "# Title\n\ndelta epsilon"  # formatting inside a passage is kept
    assert c.texts()[2] == "Seven\nzeta eta"  # the title is part of what relevancy sees
    assert c.skipped == ["empty.txt"]
    assert c.n_documents == 4


def test_passages_are_token_windows_with_overlap():
    words = [f"w{i}" for i in range(25)]
    ps = split_passages(Document("f.txt", " ".join(words)), size=10, overlap=3)
    toks = [p.text.split() for p in ps]
    assert toks[0] == words[0:10] and toks[1] == words[7:17] and toks[2] == words[14:24] and toks[3] == words[21:25]
    assert all(len(t) <= 10 for t in toks)
    assert [p.id for p in ps] == [f"f.txt#{i}" for i in range(4)]
    # every token is covered, and exactly ``overlap`` tokens are shared between neighbours
    assert sorted(set(sum(toks, []))) == sorted(words)
    assert all(len(set(a) & set(b)) == 3 for a, b in zip(toks, toks[1:]))


def test_single_file_and_jsonl_file(tmp_path):
    f = _write(tmp_path, "notes.txt", "one two three four five")
    assert [p.text for p in load_corpus(f, size=2, overlap=0, verbose=False).passages] == ["one two", "three four", "five"]
    j = _write(tmp_path, "c.jsonl", json.dumps({"id": 5, "text": "x y"}) + "\n")
    assert load_corpus(j, verbose=False).passages[0].source == "5"


@pytest.mark.parametrize("setup,message", [
    (lambda d: d / "missing", "does not exist"),
    (lambda d: (d / "e").mkdir() or d / "e", "has no .txt, .md or .jsonl files"),
    (lambda d: _write(d, "x/a.txt", "  ") and d / "x", "is empty"),
    (lambda d: _write(d, "y/a.txt", b"caf\xe9 latin-1"), "not UTF-8"),
    (lambda d: _write(d, "b.jsonl", '{"text": "ok"}\n{broken\n'), "line 2: not valid JSON"),
    (lambda d: _write(d, "c.jsonl", '{"body": "no text"}\n'), "line 1: expected an object with a string 'text'"),
])
def test_bad_corpus_errors(tmp_path, setup, message):
    with pytest.raises(HetmemError, match=message):
        load_corpus(setup(tmp_path), verbose=False)


def test_unreadable_file_error(tmp_path, monkeypatch):
    f = _write(tmp_path, "a.txt", "text")

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(HetmemError, match="cannot read corpus file .*Permission denied"):
        load_corpus(f, verbose=False)


@pytest.mark.parametrize("size,overlap", [(0, 0), (10, 10), (10, -1)])
def test_bad_passage_params(tmp_path, size, overlap):
    with pytest.raises(HetmemError, match="--passage-"):
        load_corpus(_write(tmp_path, "a.txt", "x"), size=size, overlap=overlap, verbose=False)
