"""Crash safety of what hetmem writes to disk.

A RAG memory is replaced in one atomic step: a failure injected at every file-system step of a save
(an exception, Ctrl-C, or a crash that runs no clean-up at all) leaves the old memory or the new one,
bit-identical, never neither; the next open or save removes what the failed one left. A real SIGKILL
in the middle of a save does the same. The model cache's temporary folder is removed on Ctrl-C, and
stale ones are swept without touching a live writer's. Folders are created with the user's umask.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
import scipy.sparse as sp

from hetmem.errors import HetmemError
from hetmem.methods import get_method
from hetmem.rag import store
from hetmem.rag.corpus import load_corpus
from hetmem.rag.store import load_memory, read_meta, save_memory
from hetmem.runtime.rag import RagSession

TOPICS = ["copper mining", "river ferries", "glass furnaces", "beekeeping", "star charts", "clock repair"]
KEEP = {"memory.json", ".hetmem.lock"}


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for i, t in enumerate(TOPICS):
        (d / f"doc{i}.txt").write_text(f"Notes on {t}. The guild of {t} met in hall {i} every spring. " * 3)
    return d


@pytest.fixture(scope="module")
def memories(corpus_dir, tmp_path_factory):
    """Two different rag-hybrid memories (all four data files), built once, and a reference save of each."""
    from transformers import BertConfig, BertModel

    from hetmem.rag.embed import resolve_embed_model

    src, _ = resolve_embed_model(None)
    enc = tmp_path_factory.mktemp("tinybert")
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / f, enc / f)
    BertModel(BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(enc)
    out = {}
    for which, (size, overlap) in {"old": (128, 32), "new": (24, 4)}.items():
        m = get_method("rag-hybrid", embed_model=str(enc), passage_tokens=size, passage_overlap=overlap)
        s = RagSession.build(m, load_corpus(corpus_dir, size, overlap, verbose=False))
        ref = tmp_path_factory.mktemp(f"ref-{which}") / "mem"
        save_memory(ref, m, s.corpus, s.memory, s.memory_info["build_ms"])
        out[which] = {"args": (m, s.corpus, s.memory, s.memory_info["build_ms"]), "ref": ref}
    assert len(out["old"]["args"][1]) != len(out["new"]["args"][1])
    return out


def _save(out, mem):
    return save_memory(out, *mem["args"])


def _fingerprint(d: Path) -> tuple[dict, dict]:
    """(memory.json without its time stamp and folder name, sha256 of each data file's bytes), computed
    here rather than trusted from memory.json."""
    meta = json.loads((d / "memory.json").read_text())
    data = d / meta.get("data_dir", ".")
    sums = {f: hashlib.sha256((data / f).read_bytes()).hexdigest() for f in meta["files"]}
    return {k: v for k, v in meta.items() if k not in ("created", "data_dir", "format_version")}, sums


def _which(out: Path, memories, old_fp=None) -> str | None:
    """'old' or 'new': the memory at ``out`` is bit-identical to one of them, and loads; None: no memory.
    ``old_fp``: the old memory's fingerprint, if not the old reference's (a format-1 memory)."""
    if not (out / "memory.json").exists():
        return None
    fp = _fingerprint(out)
    fps = {"old": old_fp or _fingerprint(memories["old"]["ref"]), "new": _fingerprint(memories["new"]["ref"])}
    found = [w for w in ("old", "new") if fps[w] == fp]
    assert len(found) == 1, f"the memory at {out} is neither the old nor the new one: {sorted(os.listdir(out))}"
    corpus, mem = load_memory(out, read_meta(out))
    assert len(corpus) == len(memories[found[0]]["args"][1]) == mem.meta["faiss"].ntotal
    return found[0]


def _assert_clean(out: Path) -> None:
    """Only the memory is left: memory.json, the lock, the folder memory.json names (and nothing beside)."""
    assert sorted(os.listdir(out.parent)) == ([out.name] if out.exists() else [])
    if out.exists():
        meta = json.loads((out / "memory.json").read_text()) if (out / "memory.json").exists() else {}
        keep = KEEP | ({meta["data_dir"]} if "data_dir" in meta else set(meta.get("files", [])))
        assert set(os.listdir(out)) <= keep, sorted(os.listdir(out))


class Boom(Exception):
    pass


# Every file-system step a save takes. Path.mkdir and tempfile.mkdtemp call os.mkdir; write_atomic
# calls os.chmod and os.replace; shutil.rmtree is the clean-up; scipy's save_npz calls numpy.
STEPS = [(os, "mkdir"), (os, "chmod"), (os, "rename"), (os, "replace"), (os, "fsync"), (shutil, "rmtree"),
         (sp, "save_npz"), (np, "savez"), (np, "savez_compressed"), (faiss, "write_index")]


class Injector:
    """Raise at the k-th step (before or after it runs). ``crash``: from then on every step does nothing,
    as if the process had died there: no clean-up runs (the lock is released, as the kernel would)."""

    def __init__(self, monkeypatch, k=None, when="before", exc=Boom, crash=False):
        self.n, self.k, self.when, self.exc, self.crash, self.dead = 0, k, when, exc, crash, False
        for mod, name in STEPS:
            monkeypatch.setattr(mod, name, self._wrap(getattr(mod, name)))

    def _wrap(self, fn):
        def step(*a, **kw):
            if self.dead:
                return None
            self.n += 1
            hit = self.n == self.k
            if hit and self.when == "before":
                self._fire()
            r = fn(*a, **kw)
            if hit and self.when == "after":
                self._fire()
            return r
        return step

    def _fire(self):
        self.dead = self.crash
        raise self.exc()


def _count_steps(monkeypatch, out, mem) -> int:
    with monkeypatch.context() as mp:
        inj = Injector(mp)
        _save(out, mem)
    return inj.n


def _setup(scenario, out, memories):
    if out.exists():
        shutil.rmtree(out)
    if scenario == "replace":
        shutil.copytree(memories["old"]["ref"], out)
    elif scenario == "empty":
        out.mkdir()
    elif scenario == "format1":  # what the previous release wrote: the files next to memory.json, no hashes
        ref = memories["old"]["ref"]
        meta = json.loads((ref / "memory.json").read_text())
        out.mkdir()
        for f in meta["files"]:
            shutil.copy(ref / meta["data_dir"] / f, out / f)
        flat = {k: v for k, v in meta.items() if k not in ("data_dir", "sha256")}
        (out / "memory.json").write_text(json.dumps(dict(flat, format_version=1), indent=1))


@pytest.mark.parametrize("scenario", ["replace", "fresh", "empty", "format1"])
def test_failure_at_every_step_leaves_old_or_new(scenario, memories, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # still a step below; real flushes only cost time here
    out = tmp_path / "parent" / "mem"
    out.parent.mkdir()
    _setup(scenario, out, memories)
    before = _fingerprint(out) if (out / "memory.json").exists() else None
    n = _count_steps(monkeypatch, out, memories["new"])
    assert n >= 15  # mkdir, temp folder, four data files flushed, rename, commit, clean-up
    seen = set()
    for k in range(1, n + 1):
        for when in ("before", "after"):
            for exc, crash in ((Boom, False), (KeyboardInterrupt, False), (Boom, True)):
                if crash and when == "before" and k > 1:
                    continue  # on disk the same as a crash after step k - 1
                _setup(scenario, out, memories)
                with monkeypatch.context() as mp:
                    inj = Injector(mp, k, when, exc, crash)
                    try:
                        _save(out, memories["new"])
                        raised = False
                    except (Boom, KeyboardInterrupt):
                        raised = True
                assert raised or inj.n >= k  # a step that failed on its own (mkdir of an existing folder)
                # the old memory or the new one, complete and bit-identical (the open in _which sweeps)
                state = _which(out, memories, before)
                assert state in ({"old", "new"} if before else {None, "new"}), (k, when, exc, crash)
                if not raised:
                    assert state == "new"
                if state is None:
                    with pytest.raises(HetmemError, match="interrupted|does not exist|has no memory.json"):
                        read_meta(out)  # the open sweeps what the failed save left
                _assert_clean(out)
                seen.add(state)
                _save(out, memories["new"])  # and the next save works
                assert _which(out, memories) == "new"
                _assert_clean(out)
    assert seen == ({"old", "new"} if before else {None, "new"})


def test_ctrl_c_right_after_the_commit_keeps_the_new_memory(memories, tmp_path, monkeypatch):
    """The old code's Ctrl-C clean-up deleted the new memory when the interrupt landed after the rename."""
    out = tmp_path / "mem"
    shutil.copytree(memories["old"]["ref"], out)
    real = os.replace

    def replace_then_interrupt(src, dst):
        real(src, dst)
        if Path(dst).name == "memory.json":
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        _save(out, memories["new"])
    monkeypatch.undo()
    assert _which(out, memories) == "new"
    _assert_clean(out)


def test_sigkill_between_data_and_commit(memories, corpus_dir, tmp_path):
    """A real crash: a child process saving over the memory is killed (SIGKILL, no clean-up, no finally)
    after its new data folder is in place and before memory.json names it."""
    out = tmp_path / "mem"
    shutil.copytree(memories["old"]["ref"], out)
    before = (out / "memory.json").read_bytes()
    script = textwrap.dedent(f"""
        import os, signal
        from hetmem.methods import get_method
        from hetmem.rag.corpus import load_corpus
        from hetmem.rag.store import save_memory
        from hetmem.runtime.rag import RagSession
        m = get_method("rag-bm25")
        s = RagSession.build(m, load_corpus({str(corpus_dir)!r}, verbose=False))
        real = os.rename
        def rename_then_die(a, b):
            real(a, b)
            os.kill(os.getpid(), signal.SIGKILL)
        os.rename = rename_then_die
        save_memory({str(out)!r}, m, s.corpus, s.memory, 1.0)
    """)
    src = str(Path(store.__file__).resolve().parents[2])  # this checkout's hetmem, not another install's
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr
    assert "v2" in os.listdir(out)  # the dead save's complete but uncommitted folder
    assert (out / "memory.json").read_bytes() == before
    assert _which(out, memories) == "old"  # (this opens it: the kernel released the dead writer's lock)
    assert sorted(os.listdir(out)) == [".hetmem.lock", "memory.json", "v1"]


def test_an_open_never_sweeps_a_live_writers_work(memories, tmp_path):
    out = tmp_path / "mem"
    _save(out, memories["old"])
    with store._locked(out, wait=True) as held:  # a writer at work (another open file: flock conflicts)
        assert held
        (out / ".hetmem-tmp-1-abcdefgh").mkdir()
        (out / "v7").mkdir()
        read_meta(out)
        assert {".hetmem-tmp-1-abcdefgh", "v7"} <= set(os.listdir(out))
        # a second writer waits for the first
        t = threading.Thread(target=_save, args=(out, memories["new"]))
        t.start()
        time.sleep(0.5)
        assert t.is_alive() and _which(out, memories) == "old"
    t.join(60)
    assert _which(out, memories) == "new"
    _assert_clean(out)
    assert json.loads((out / "memory.json").read_text())["data_dir"] == "v2"


def test_reader_follows_a_concurrent_replacement(memories, tmp_path):
    out = tmp_path / "mem"
    _save(out, memories["old"])
    meta = read_meta(out)
    _save(out, memories["old"])  # replaced (same settings) between read_meta and load_memory
    corpus, _ = load_memory(out, meta)
    assert meta["data_dir"] == "v2" and len(corpus) == len(memories["old"]["args"][1])
    meta = read_meta(out)
    _save(out, memories["new"])  # replaced with other settings: the caller checked the old ones
    with pytest.raises(HetmemError, match="was replaced, with other settings, while it was read: run again"):
        load_memory(out, meta)


def test_previous_release_leftovers(memories, tmp_path, capsys):
    """The previous release parked the old memory in .NAME.old<pid> between two renames: if it died
    there, the next open puts it back; beside a memory, such a copy and old temporary folders go."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "mem"
    shutil.copytree(memories["old"]["ref"], tmp_path / f".mem.old{dead.pid}")
    assert _which(tmp_path / f".mem.old{dead.pid}", memories) == "old"
    read_meta(out)
    assert "recovered the memory" in capsys.readouterr().err
    assert _which(out, memories) == "old"
    shutil.copytree(out, tmp_path / f".mem.old{dead.pid}")
    stale, fresh = tmp_path / ".mem.tmpabcd1234", tmp_path / ".mem.tmpzzzz9999"
    for d in (stale, fresh):
        d.mkdir()
        (d / "passages.jsonl").write_text("{}")
    hours_ago = time.time() - 2 * 3600
    for p in (stale / "passages.jsonl", stale):
        os.utime(p, (hours_ago, hours_ago))
    _save(out, memories["new"])
    assert sorted(os.listdir(tmp_path)) == [".mem.tmpzzzz9999", "mem"]  # a recent one may be a live writer's


def test_folders_honour_the_umask(memories, tmp_path):
    old = os.umask(0o027)
    try:
        out = _save(tmp_path / "mem", memories["old"])
    finally:
        os.umask(old)
    meta = json.loads((out / "memory.json").read_text())
    assert (out.stat().st_mode & 0o777, (out / meta["data_dir"]).stat().st_mode & 0o777) == (0o750, 0o750)
    for f in ["memory.json", *(f"{meta['data_dir']}/{f}" for f in meta["files"])]:
        assert (out / f).stat().st_mode & 0o777 == 0o640, f


# --- the model cache (src/hetmem/llm/models.py) ---

def _tiny():
    from hetmem.testing import char_tokenizer, tiny_model

    return tiny_model(layers=1), char_tokenizer()


def test_model_cache_ctrl_c_leaves_no_temp_folder_and_umask(tmp_path):
    from hetmem.llm import models

    target = tmp_path / "models" / "tiny-v2"
    model, tok = _tiny()
    real = tok.save_pretrained

    def save_then_interrupt(d, **kw):
        real(d, **kw)  # the weights and the tokenizer are on disk: the big temp folder the issue saw
        assert any(Path(d).iterdir())
        raise KeyboardInterrupt

    tok.save_pretrained = save_then_interrupt
    with pytest.raises(KeyboardInterrupt):
        models._save_cache(model, tok, target, {"model": "tiny", "format": 2})
    assert os.listdir(target.parent) == []
    tok.save_pretrained = real
    old = os.umask(0o027)
    try:
        models._save_cache(model, tok, target, {"model": "tiny", "format": 2})
    finally:
        os.umask(old)
    assert os.listdir(target.parent) == ["tiny-v2"] and (target / "hetmem.json").is_file()
    assert target.stat().st_mode & 0o777 == 0o750


def test_model_cache_sweeps_only_abandoned_temp_folders(tmp_path, monkeypatch, capsys):
    from hetmem.llm import models

    monkeypatch.setenv("HETMEM_CACHE", str(tmp_path))
    mdir = tmp_path / "models"
    target = mdir / f"smollm2-v{models.CACHE_FORMAT}"
    target.mkdir(parents=True)
    (target / "hetmem.json").write_text("{}")  # already converted: ensure_embedded returns at once
    dead = subprocess.Popen(["true"])
    dead.wait()
    me, host = os.getpid(), models._host_tag()
    other = "0123abcd" if host != "0123abcd" else "4567abcd"
    names = {
        f"{target.name}.tmp-{dead.pid}-{host}-abcdefgh": "gone",  # its writer died
        f"{target.name}.tmp-{me}-{host}-abcdefg1": "kept",  # a live writer (this process)
        f"{target.name}.tmp-{me}-{other}-abcdefg2": "kept",  # another host's, recent: cannot tell
        f"{target.name}.tmp-{me}-{other}-abcdefg3": "gone old",  # another host's, untouched for 2 h
        f"{target.name}.tmp-{me}-{host}-abcdefg4": "gone old",  # pid alive but untouched for 2 h (pid reused)
        f"{target.name}.tmpabcdefgh": "gone old",  # the previous release's name, untouched for 2 h
        f"{target.name}.tmpabcdefg5": "kept",  # the previous release's name, recent
        "notes": "kept old",  # not ours
    }
    hours_ago = time.time() - 2 * 3600
    for name, fate in names.items():
        d = mdir / name
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"\0" * 1024)
        if fate.endswith("old"):
            for p in (d / "model.safetensors", d):
                os.utime(p, (hours_ago, hours_ago))
    assert models.ensure_embedded("smollm2") == target
    left = set(os.listdir(mdir))
    assert left == {target.name} | {n for n, f in names.items() if f.startswith("kept")}
    assert capsys.readouterr().err.count("left by an interrupted model conversion") == 4
