"""The raw data of RAG: a corpus of documents split into token-based passages.

``--corpus PATH`` is one of
  * a directory: every ``.txt`` / ``.md`` file under it (recursively, hidden entries skipped) and every
    ``.jsonl`` file as below; a passage's ``source`` is the file's path relative to the directory;
  * a ``.jsonl`` file: one JSON object per line with a ``text`` field and optional ``id`` and ``title``;
    ``source`` is the ``id`` (or ``FILE:LINE`` when there is none); the title is prepended to the text;
  * any other single file, read as UTF-8 text.

Passages are windows of ``size`` word tokens (whitespace-separated) overlapping by ``overlap`` tokens; the
passage text is the original text between its first and last token, so formatting inside is kept.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hetmem.errors import HetmemError
from hetmem.files import read_jsonl_objects, read_user_text

TEXT_SUFFIXES = (".txt", ".md")
_TOKEN = re.compile(r"\S+")


@dataclass
class Document:
    source: str
    text: str
    title: str | None = None


@dataclass
class Passage:
    id: str  # "<source>#<n>": the n-th passage of its document
    source: str
    text: str
    title: str | None = None

    def to_json(self) -> dict:
        return {"id": self.id, "source": self.source, "title": self.title, "text": self.text}


@dataclass
class Corpus:
    passages: list[Passage]
    path: str = ""
    n_documents: int = 0
    passage_tokens: int = 0
    passage_overlap: int = 0
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.passages)

    def texts(self) -> list[str]:
        """What relevancy sees: the title line (if any) then the passage text."""
        return [f"{p.title}\n{p.text}" if p.title else p.text for p in self.passages]


def _read_text(path: Path, shown: str) -> str:
    return read_user_text(path, "corpus file", shown=shown)


def _read_jsonl(path: Path, shown: str) -> list[Document]:
    docs = []
    for n, obj in read_jsonl_objects(path, "corpus file", "text", shown=shown):
        title = obj.get("title")
        source = str(obj["id"]) if obj.get("id") is not None else f"{shown}:{n}"
        docs.append(Document(source, obj["text"], str(title) if title else None))
    return docs


def load_documents(path: str | Path) -> tuple[list[Document], list[str]]:
    """Documents of a corpus path, and the files skipped because they hold no text."""
    p = Path(path).expanduser()
    if not p.exists():
        raise HetmemError(f"corpus {path} does not exist")
    docs: list[Document] = []
    if p.is_dir():
        files = sorted(
            f for f in p.rglob("*")
            if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES + (".jsonl",)
            and not any(part.startswith(".") for part in f.relative_to(p).parts)
        )
        if not files:
            raise HetmemError(f"corpus directory {path} has no .txt, .md or .jsonl files")
        for f in files:
            rel = f.relative_to(p).as_posix()
            if f.suffix.lower() == ".jsonl":
                docs.extend(_read_jsonl(f, rel))
            else:
                docs.append(Document(rel, _read_text(f, rel)))
    elif p.suffix.lower() == ".jsonl":
        docs = _read_jsonl(p, p.name)
    else:
        docs = [Document(p.name, _read_text(p, str(path)))]
    kept = [d for d in docs if d.text.strip()]
    skipped = [d.source for d in docs if not d.text.strip()]
    if not kept:
        raise HetmemError(f"corpus {path} is empty: no document has any text")
    return kept, skipped


def split_passages(doc: Document, size: int, overlap: int) -> list[Passage]:
    """Windows of ``size`` tokens with ``overlap`` tokens shared between neighbours."""
    spans = [m.span() for m in _TOKEN.finditer(doc.text)]
    stride = size - overlap
    out = []
    start = 0
    while start < len(spans):
        end = min(start + size, len(spans))
        text = doc.text[spans[start][0] : spans[end - 1][1]]
        out.append(Passage(f"{doc.source}#{len(out)}", doc.source, text, doc.title))
        if end == len(spans):
            break
        start += stride
    return out


def check_passage_params(size: int, overlap: int) -> None:
    if size < 1:
        raise HetmemError(f"--passage-tokens must be at least 1 (got {size})")
    if not 0 <= overlap < size:
        raise HetmemError(f"--passage-overlap must be at least 0 and less than --passage-tokens {size} (got {overlap})")


def load_corpus(path: str | Path, size: int = 128, overlap: int = 32, verbose: bool = True) -> Corpus:
    check_passage_params(size, overlap)
    docs, skipped = load_documents(path)
    passages = [p for d in docs for p in split_passages(d, size, overlap)]
    if verbose:
        extra = f", skipped {len(skipped)} empty" if skipped else ""
        print(f"[hetmem] corpus {path}: {len(docs)} documents{extra} -> {len(passages)} passages "
              f"of <= {size} tokens (overlap {overlap})", file=sys.stderr, flush=True)
    return Corpus(passages, str(path), len(docs), size, overlap, skipped)
