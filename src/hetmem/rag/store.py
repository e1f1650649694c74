"""Persisted RAG memory: ``hetmem index`` writes it, ``hetmem run --memory DIR`` reuses it.

A memory directory holds

    memory.json        the commit record: format name and version, method, the parameters that shaped it,
                       embedding model id, which data folder is current ("data_dir") and the sha256 of each
                       of its files
    v<N>/              the data folder memory.json names:
      passages.jsonl   the passages (id, source, title, text): Apply needs the raw text
      bm25_tf.npz      BM25 term x passage counts (scipy.sparse CSR)  } rag-bm25, rag-hybrid
      bm25_meta.npz    passage lengths and the vocabulary             }
      dense.faiss      the FAISS index of passage embeddings          } rag-dense, rag-hybrid
    or, for a memory built with ``--shards N`` (memory.json's "shards" lists each shard's passage range):
      passages.jsonl, bm25_global.npz (the global BM25 statistics), shard<i>/ (bm25_tf.npz, bm25_meta.npz,
      dense.faiss: shard i's own counts and FAISS index); see ``rag.shards``
    .hetmem.lock       a writer holds an exclusive flock(2) on it for the whole save

Term counts rather than weights are stored, so a run may use other ``--k1``/``--b`` without re-indexing.

Replacing a memory is one atomic step. A save writes the new data folder under a temporary name, flushes
it to disk, renames it to ``v<N+1>`` and then replaces memory.json (temporary file, fsync, ``os.replace``,
which POSIX rename(2) makes atomic). That replacement is the commit: before it every reader sees the old
memory, after it the new one, never neither and never a mix, because memory.json alone says which folder
and which file hashes belong together. The folder the old memory.json named is removed after the commit.
If the process dies first (crash, kill, power cut), what it left (temporary folders, a folder memory.json
does not name) is removed by the next save, or the next open that can take the lock: a live writer holds
it, so nobody sweeps its work in progress. A reader that loses a folder to a concurrent save re-reads
memory.json and loads the new memory if it was built with the same settings. The files are verified
against their sha256 on every load, so flipped bytes are an error naming the file, not a wrong answer.

Format 1 (files next to memory.json, no hashes) is still read, and replaced by format 2 on the next save.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from hetmem.core.types import Memory
from hetmem.errors import HetmemError
from hetmem.files import make_temp_dir, pid_alive, write_json_atomic
from hetmem.rag.corpus import Corpus, Passage
from hetmem.ops.bm25 import Bm25Stats, bm25_weights
from hetmem.rag.embed import resolve_embed_model
from hetmem.rag.shards import GLOBAL_FILE, file_sha256, is_shard_file, partition, read_vocab, shard_dir, write_shards

try:
    import fcntl
except ImportError:  # not POSIX: writers are not serialised, and an open never sweeps
    fcntl = None

FORMAT = "hetmem-rag-memory"
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)  # 1: the files next to memory.json, no hashes
META = "memory.json"
LOCK = ".hetmem.lock"
TMP_PREFIX = ".hetmem-tmp-"
DATA_FILES = ("passages.jsonl", "bm25_tf.npz", "bm25_meta.npz", "dense.faiss")
STALE_S = 3600  # a previous release's temporary sibling older than this is abandoned
_VERSION = re.compile(r"v([0-9]{1,9})")


def save_memory(out: str | Path, method, corpus: Corpus, memory: Memory, build_ms: float, shards: int = 1) -> Path:
    out = Path(out).expanduser()
    ranges = partition([p.source for p in corpus.passages], shards) if shards > 1 else None
    if out.exists() and not (out.is_dir() and (_is_memory_dir(out) or not any(out.iterdir()))):
        raise HetmemError(f"refusing to write the memory to {out}: it exists and is not a hetmem memory directory")
    try:
        out.mkdir(parents=True, exist_ok=True)  # a plain mkdir: the umask applies
        with _locked(out, wait=True):
            _sweep(out)
            current = _pointer(out)[1]
            name = f"v{_next_version(out, current)}"
            new = out / name
            tmp = make_temp_dir(out, f"{TMP_PREFIX}{os.getpid()}-")
            try:
                sums = _write_data(tmp, corpus, memory, ranges)
                _fsync_dir(tmp)
                os.rename(tmp, new)
                _fsync_dir(out)
                meta = _meta(method, corpus, memory, build_ms, name, sums)
                if ranges:
                    meta["shards"] = [list(r) for r in ranges]
                write_json_atomic(out / META, meta, fsync=True)  # the commit
                _fsync_dir(out)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                if _pointer(out)[1] != name:  # not committed (Ctrl-C can land just after os.replace)
                    shutil.rmtree(new, ignore_errors=True)
                raise
            _sweep(out)  # the replaced folder (or a format-1 memory's files)
    except OSError as exc:
        raise HetmemError(f"cannot write the memory to {out}: {exc.strerror or exc}") from None
    return out


def _meta(method, corpus: Corpus, memory: Memory, build_ms: float, data_dir: str, sums: dict) -> dict:
    return {
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
        "data_dir": data_dir,
        "files": list(sums),
        "sha256": sums,
    }


def _write_data(d: Path, corpus: Corpus, memory: Memory, ranges=None) -> dict[str, str]:
    """Write the data files into ``d`` (``ranges``: a sharded memory's shards); return each file's sha256
    (each is flushed to disk)."""
    with open(d / "passages.jsonl", "w", encoding="utf-8") as fh:
        for p in corpus.passages:
            fh.write(json.dumps(p.to_json(), ensure_ascii=False) + "\n")
    files = ["passages.jsonl"]
    if ranges:
        files += write_shards(d, memory, ranges)
        for i in range(len(ranges)):
            _fsync_dir(d / shard_dir(i))
        return {f: file_sha256(d / f, fsync=True) for f in files}
    if "bm25" in memory.meta:
        st = memory.meta["bm25"]
        sp.save_npz(d / "bm25_tf.npz", st.tf)
        terms = np.empty(len(st.vocab), dtype=object)
        for t, i in st.vocab.items():
            terms[i] = t
        np.savez(d / "bm25_meta.npz", doc_len=st.doc_len, terms=terms.astype(str))
        files += ["bm25_tf.npz", "bm25_meta.npz"]
    if "faiss" in memory.meta:
        import faiss

        faiss.write_index(memory.meta["faiss"], str(d / "dense.faiss"))
        files.append("dense.faiss")
    return {f: file_sha256(d / f, fsync=True) for f in files}


def _fsync_dir(d: Path) -> None:
    """Make renames inside ``d`` durable (where the platform can fsync a directory)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _is_memory_dir(d: Path) -> bool:
    return (d / META).is_file() or (d / LOCK).is_file()


@contextmanager
def _locked(d: Path, wait: bool):
    """Hold the memory's exclusive lock; yield whether it is held. ``wait``: a writer (creates the lock
    file and waits for another writer); otherwise try once and yield False if busy or not possible."""
    if fcntl is None:
        yield wait
        return
    try:
        fd = os.open(d / LOCK, os.O_RDWR | (os.O_CREAT if wait else 0), 0o666)
    except OSError:
        if wait:
            raise
        yield False  # no lock file (format 1) or a read-only memory: read it, sweep nothing
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = True
        except BlockingIOError:
            held = False
            if wait:
                print(f"[hetmem] waiting for another process writing the memory {d}", file=sys.stderr, flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
                held = True
        except OSError:  # a file system without locks: a writer goes on alone, an open does not sweep
            held = wait
        yield held
    finally:
        os.close(fd)


def _pointer(d: Path) -> tuple[str, str | None]:
    """("none", None) without memory.json, ("bad", None) if it cannot be read, ("flat", None) for
    format 1, ("ok", data_dir) for format 2."""
    try:
        meta = json.loads((d / META).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "none", None
    except (OSError, ValueError):
        return "bad", None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return "bad", None
    if meta.get("format_version") == 1:
        return "flat", None
    name = meta.get("data_dir")
    if meta.get("format_version") != FORMAT_VERSION or not isinstance(name, str) or not _VERSION.fullmatch(name):
        return "bad", None
    return "ok", name


def _next_version(d: Path, current: str | None) -> int:
    ns = [int(m.group(1)) for e in os.scandir(d) if (m := _VERSION.fullmatch(e.name))]
    if current:
        ns.append(int(_VERSION.fullmatch(current).group(1)))
    return max(ns, default=0) + 1


def _sweep(d: Path) -> None:
    """Remove what interrupted saves left in (and beside) memory ``d``. Only under the lock."""
    state, ref = _pointer(d)
    if state == "bad":  # a damaged memory.json: touch nothing, the user decides
        return
    for e in list(os.scandir(d)):
        n = e.name
        if (n.startswith(TMP_PREFIX)
                or (n.startswith(f".{META}.") and n.endswith(".tmp"))  # write_atomic's temporary file
                or (_VERSION.fullmatch(n) and n != ref and e.is_dir(follow_symlinks=False))
                or (state == "ok" and n in DATA_FILES)):  # a replaced format-1 memory's files
            _remove(Path(e.path))
    if state in ("ok", "flat"):
        _sweep_old_siblings(d)


def _sweep_old_siblings(d: Path) -> None:
    """The previous release wrote ``.NAME.tmp*`` beside the memory and parked the old one in
    ``.NAME.old<pid>``; an interrupted save left them there."""
    prefix = f".{d.name}."
    try:
        for e in list(os.scandir(d.parent)):
            if not e.name.startswith(prefix) or not e.is_dir(follow_symlinks=False):
                continue
            rest = e.name[len(prefix):]
            m = re.fullmatch(r"old([0-9]+)", rest)
            if (m and not pid_alive(int(m.group(1)))) or (
                    re.fullmatch(r"tmp[a-z0-9_]{8}", rest) and time.time() - _newest_mtime(Path(e.path)) > STALE_S):
                _remove(Path(e.path))
    except OSError:  # housekeeping: an unreadable parent is no reason to fail
        pass


def _recover_old_sibling(d: Path) -> None:
    """No memory at ``d`` but the previous release's parked copy beside it: the save that parked it died
    between its two renames. Put the copy back."""
    try:
        parked = [Path(e.path) for e in os.scandir(d.parent)
                  if (m := re.fullmatch(re.escape(f".{d.name}.old") + "([0-9]+)", e.name))
                  and not pid_alive(int(m.group(1))) and (Path(e.path) / META).is_file()]
        if parked:
            src = max(parked, key=_newest_mtime)
            os.rename(src, d)
            print(f"[hetmem] recovered the memory {d} from {src.name}, left by an interrupted 'hetmem index'",
                  file=sys.stderr, flush=True)
    except OSError:
        pass


def _newest_mtime(p: Path) -> float:
    newest = p.stat().st_mtime
    for root, dirs, files in os.walk(p):
        for f in dirs + files:
            try:
                newest = max(newest, os.stat(os.path.join(root, f), follow_symlinks=False).st_mtime)
            except OSError:
                pass
    return newest


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink()
        except OSError:
            pass


def _bm25_params(method) -> tuple[str, ...]:
    return ("k1", "b") if hasattr(method, "k1") else ()


def read_meta(path: str | Path) -> dict:
    """Open memory ``path``: sweep what an interrupted save left (if no writer is active), read memory.json."""
    d = Path(path).expanduser()
    if not d.exists():
        _recover_old_sibling(d)
    if not d.is_dir():
        raise HetmemError(f"memory {path} does not exist or is not a directory (build one with 'hetmem index')")
    try:
        with _locked(d, wait=False) as held:
            if held:
                _sweep(d)
    except OSError:
        pass  # sweeping is housekeeping: a read-only memory is still read
    return _read_meta_file(d, path)


def _read_meta_file(d: Path, path) -> dict:
    try:
        meta = json.loads((d / META).read_text(encoding="utf-8"))
    except FileNotFoundError:
        if (d / LOCK).is_file():
            raise HetmemError(f"memory {path} holds no finished memory: the 'hetmem index' writing it was interrupted "
                              "(run it again)") from None
        raise HetmemError(f"{path} is not a hetmem memory: it has no {META} (build one with 'hetmem index')") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HetmemError(f"memory {path} has an unreadable {META}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise HetmemError(f"{path} is not a hetmem RAG memory")
    if meta.get("format_version") not in READ_VERSIONS:
        raise HetmemError(f"memory {path} has format version {meta.get('format_version')}, this hetmem reads "
                          f"versions {' and '.join(map(str, READ_VERSIONS))}: rebuild it with 'hetmem index'")
    files = meta.get("files", [])
    sharded = "shards" in meta
    if not isinstance(files, list) or any(f not in DATA_FILES and not (sharded and is_shard_file(f)) for f in files) or (
            sharded and not _valid_shards(meta)) or (
            meta["format_version"] >= 2 and (not isinstance(meta.get("data_dir"), str)
                                            or not _VERSION.fullmatch(meta["data_dir"])
                                            or not isinstance(meta.get("sha256"), dict)
                                            or sorted(meta["sha256"]) != sorted(files))):
        raise HetmemError(f"memory {path} has a damaged {META}: its data folder, file list or sha256 entries "
                          "are not what hetmem writes (rebuild it with 'hetmem index')")
    return meta


def _valid_shards(meta: dict) -> bool:
    sh = meta.get("shards")
    n = meta.get("n_passages")
    if not isinstance(sh, list) or not sh or not isinstance(n, int):
        return False
    ok = all(isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) for x in r) for r in sh)
    return ok and sh[0][0] == 0 and sh[-1][1] == n and all(a[1] == b[0] for a, b in zip(sh, sh[1:]))


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


class _Replaced(Exception):
    """A file of the memory vanished while it was read: perhaps a concurrent save replaced it."""


def load_memory(path: str | Path, meta: dict) -> tuple[Corpus, Memory]:
    """Load the memory ``meta`` (from read_meta) describes. If a concurrent save removes its folder
    meanwhile, load the new memory instead when it has the same settings (``meta`` is updated)."""
    d = Path(path).expanduser()
    for _ in range(3):
        try:
            return _load(path, d / meta.get("data_dir", "."), meta)
        except _Replaced as gone:
            new = _read_meta_file(d, path)
            if new.get("data_dir") == meta.get("data_dir") and new.get("format_version") == meta.get("format_version"):
                raise HetmemError(f"memory {path} is incomplete: {gone} missing (rebuild it with 'hetmem index')") from None
            if any(new.get(k) != meta.get(k) for k in ("method", "params", "embedding_model", "embedding_dim")):
                raise HetmemError(f"memory {path} was replaced, with other settings, while it was read: run again") from None
            meta.clear()
            meta.update(new)
    raise HetmemError(f"memory {path} kept being replaced while it was read: run again")


def _load(path, d: Path, meta: dict) -> tuple[Corpus, Memory]:
    import faiss

    missing = [f for f in meta.get("files", []) if not (d / f).is_file()]
    if missing:
        raise _Replaced(", ".join(missing))
    sharded = "shards" in meta  # the head holds the passages and the vocabulary; a shard checks its own files
    try:
        for f, want in meta.get("sha256", {}).items():
            if sharded and f not in ("passages.jsonl", GLOBAL_FILE):
                continue
            if file_sha256(d / f) != want:
                raise HetmemError(f"memory {path} is damaged: {f} does not match its sha256 in {META} "
                                  "(rebuild it with 'hetmem index')")
        passages = []
        with open(d / "passages.jsonl", encoding="utf-8") as fh:
            for line in fh:
                o = json.loads(line)
                passages.append(Passage(o["id"], o["source"], o["text"], o.get("title")))
        n = len(passages)
        if n != meta["n_passages"]:
            raise ValueError(f"{n} passages, memory.json says {meta['n_passages']}")
        mem = Memory(kind={"rag-bm25": "bm25", "rag-dense": "dense"}.get(meta["method"], "hybrid"), n_units=n)
        if sharded:
            mem.meta["sharded"] = {"path": str(Path(path).expanduser().resolve()), "meta": dict(meta),
                                   "n_shards": len(meta["shards"]),
                                   "vocab": read_vocab(path, meta) if GLOBAL_FILE in meta["files"] else None}
            if "embedding_model" in meta and meta.get("embedding_model"):
                mem.meta.update(embed_model=meta["embedding_model"], dim=meta.get("embedding_dim"),
                                index_type=meta["params"].get("dense_index", "flat"))
        elif "bm25_tf.npz" in meta["files"]:
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
    except FileNotFoundError as exc:
        raise _Replaced(Path(exc.filename or "a file").name) from None
    except Exception as exc:  # noqa: BLE001 -- any decoding failure means a damaged memory
        raise HetmemError(f"memory {path} is damaged: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    corpus = Corpus(passages, meta.get("corpus", ""), meta.get("n_documents", 0),
                    meta["params"].get("passage_tokens", 0), meta["params"].get("passage_overlap", 0))
    return corpus, mem
