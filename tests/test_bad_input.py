"""Bad input, as a new user types it: every case is one line ``hetmem: error: ...`` naming the bad value or
file, exit code 2, no traceback, and it is caught before any long work (no model loads: each case is fast).

One row per kind of mistake. Placeholders in the argv: CTX a good context file, EMPTY an empty file, BIN a
binary file, DIR a directory, BADJSON a file that is not JSON, LISTJSON a JSON list, UNREL a non-empty
folder hetmem did not write, QBAD a questions file with a bad line, OUT a fresh output path.
"""

from __future__ import annotations

import time

import pytest

from hetmem.cli import main

RUN = ["run", "--context", "CTX", "--question", "q"]
EVAL = ["eval", "--tasks", "niah-single", "--lengths", "4k", "--methods", "dense", "--out", "OUT"]

CASES = [
    # (id, argv, a fragment the one-line message must contain)
    ("no-command", [], "no command given: use one of run, demo, methods, index, profile, plan, devices, train, eval"),
    ("unknown-subcommand", ["frobnicate"], "invalid choice"),
    ("unknown-method", ["run", "--method", "nope", "--context", "CTX", "--question", "q"], "invalid choice"),
    ("threads-zero", RUN + ["--method", "dense", "--threads", "0"], "--threads must be at least 1"),
    ("unknown-device", RUN + ["--method", "quest", "--device", "tpu"], "unknown --device 'tpu'"),
    ("cuda-without-gpu", RUN + ["--method", "dense", "--device", "cuda"], "no CUDA device"),
    ("unknown-model", RUN + ["--method", "dense", "--model", "/nonexistent/model"], "unknown model '/nonexistent/model'"),
    ("unknown-dtype", RUN + ["--method", "dense", "--dtype", "int3", "--model", "smollm2"], "unknown dtype 'int3'"),
    ("budget-below-a-page", RUN + ["--method", "quest", "--budget", "8"], "smaller than one page"),
    ("budget-zero", RUN + ["--method", "oracle", "--budget", "0"], "--budget must be at least 1"),
    ("budget-not-a-number", RUN + ["--method", "quest", "--budget", "lots"], "invalid int value"),
    ("option-method-lacks", RUN + ["--method", "quest", "--threshold", "0.1"], "--threshold is not a parameter of method 'quest'"),
    ("gates-for-quest", RUN + ["--method", "quest", "--gates", "DIR"], "--gates is not a parameter of method 'quest'"),
    ("gates-not-a-dir", RUN + ["--method", "seer", "--gates", "CTX"], "is not a directory"),
    ("gates-empty-dir", RUN + ["--method", "dsa", "--gates", "DIR"], "holds no gates.safetensors"),
    ("threshold-out-of-range", RUN + ["--method", "seer", "--threshold", "1.5"], "--threshold must be between 0 and"),
    ("heavy-ratio-out-of-range", RUN + ["--method", "h2o", "--heavy-ratio", "1.5"], "--heavy-ratio must be between 0 and"),
    ("heavy-ratio-nan", RUN + ["--method", "h2o", "--heavy-ratio", "nan"], "--heavy-ratio must be a finite number"),
    ("snapkv-even-kernel", RUN + ["--method", "snapkv", "--kernel", "4"], "--kernel must be a positive odd number"),
    ("kvquant-bits", RUN + ["--method", "kvquant", "--bits", "3"], "--bits must be one of"),
    ("negative-dense-layers", RUN + ["--method", "quest", "--dense-layers", "-1"], "--dense-layers must be at least 0"),
    ("context-missing", ["run", "--method", "dense", "--context", "/nonexistent.txt", "--question", "q"], "does not exist"),
    ("context-is-a-dir", ["run", "--method", "dense", "--context", "DIR", "--question", "q"], "is a directory, not a file"),
    ("context-empty", ["run", "--method", "dense", "--context", "EMPTY", "--question", "q"], "is empty"),
    ("context-binary", ["run", "--method", "dense", "--context", "BIN", "--question", "q"], "is not UTF-8 text"),
    ("context-not-given", ["run", "--method", "quest", "--question", "q"], "--context FILE is required"),
    ("question-empty", ["run", "--method", "dense", "--context", "CTX", "--question", "  "], "the question is empty"),
    ("max-new-tokens-zero", RUN + ["--method", "dense", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    ("k1-nan", ["run", "--method", "rag-bm25", "--corpus", "CTX", "--question", "q", "--k1", "nan"], "--k1 must be a finite number"),
    ("k1-inf", ["run", "--method", "rag-bm25", "--corpus", "CTX", "--question", "q", "--k1", "inf"], "--k1 must be a finite number"),
    ("rrf-k-nan", ["run", "--method", "rag-hybrid", "--corpus", "CTX", "--question", "q", "--rrf-k", "nan"], "--rrf-k must be a finite number"),
    ("alpha-out-of-range", ["run", "--method", "rag-hybrid", "--corpus", "CTX", "--question", "q", "--alpha", "2"], "--alpha must be between 0 and 1"),
    ("fusion-unknown", ["run", "--method", "rag-hybrid", "--corpus", "CTX", "--question", "q", "--fusion", "max"], "--fusion must be one of"),
    ("rag-with-context", ["run", "--method", "rag-bm25", "--context", "CTX", "--corpus", "CTX", "--question", "q"], "--context is for in-model attention methods"),
    ("rag-no-corpus", ["run", "--method", "rag-bm25", "--question", "q"], "needs exactly one of --corpus PATH or --memory DIR"),
    ("rag-questions-missing", ["run", "--method", "rag-bm25", "--corpus", "CTX", "--questions", "/nonexistent.jsonl"], "does not exist"),
    ("rag-questions-bad-line", ["run", "--method", "rag-bm25", "--corpus", "CTX", "--questions", "QBAD"], "line 1: not valid JSON"),
    ("rag-corpus-binary", ["run", "--method", "rag-bm25", "--corpus", "BIN", "--question", "q"], "is not UTF-8 text"),
    ("placement-missing", RUN + ["--method", "quest", "--placement", "/nonexistent.json"], "does not exist"),
    ("placement-not-json", RUN + ["--method", "quest", "--placement", "BADJSON"], "is not valid JSON"),
    ("demo-tokens-zero", ["demo", "--tokens", "0"], "--tokens must be at least 64"),
    ("demo-tokens-negative", ["demo", "--tokens", "-50"], "--tokens must be at least 64"),
    ("demo-page-size-zero", ["demo", "--page-size", "0"], "--page-size must be at least 1"),
    ("train-lr-nan", ["train", "--method", "seer", "--out", "OUT", "--lr", "nan"], "--lr must be a positive number"),
    ("train-lr-negative", ["train", "--method", "seer", "--out", "OUT", "--lr", "-1"], "--lr must be a positive number"),
    ("train-eval-budget-negative", ["train", "--method", "seer", "--out", "OUT", "--eval-budget", "-5"], "--eval-budget must be at least 1"),
    ("train-steps-zero", ["train", "--method", "seer", "--out", "OUT", "--steps", "0"], "--steps must be at least 1"),
    ("train-out-is-a-file", ["train", "--method", "seer", "--out", "CTX"], "exists and is not a directory"),
    ("train-out-unrelated", ["train", "--method", "dsa", "--out", "UNREL"], "non-empty directory that hetmem did not write"),
    ("train-out-in-proc", ["train", "--method", "seer", "--out", "/proc/hetmem-out"], "cannot write to --out /proc/hetmem-out"),
    ("train-text-missing", ["train", "--method", "seer", "--out", "OUT", "--text", "/nonexistent.txt"], "does not exist"),
    ("plan-out-unrelated", ["plan", "--paper", "--out", "UNREL"], "non-empty directory that hetmem did not write"),
    ("plan-objective", ["plan", "--paper", "--objective", "speed", "--out", "OUT"], "unknown objective 'speed'"),
    ("plan-profile-missing", ["plan", "--profile", "/nonexistent.json", "--out", "OUT"], "does not exist"),
    ("plan-profile-not-json", ["plan", "--profile", "BADJSON", "--out", "OUT"], "is not valid JSON"),
    ("plan-profile-a-list", ["plan", "--profile", "LISTJSON", "--out", "OUT"], "is not a hetmem profile"),
    ("index-out-is-a-file", ["index", "--corpus", "CTX", "--method", "rag-bm25", "--out", "CTX"], "is not a hetmem memory directory"),
    ("index-corpus-missing", ["index", "--corpus", "/nonexistent", "--method", "rag-bm25", "--out", "OUT"], "does not exist"),
    ("index-option-for-other-method", ["index", "--corpus", "CTX", "--method", "rag-bm25", "--out", "OUT", "--embed-model", "x"],
     "--embed-model is not a parameter of method 'rag-bm25'"),
    ("model-config-wrong-type", RUN + ["--method", "dense", "--model", "BADCFG"], "cannot read the model config"),
    ("memory-json-a-list", ["run", "--method", "rag-bm25", "--memory", "MEMLIST", "--question", "q"], "is not a hetmem RAG memory"),
    ("memory-json-no-method", ["run", "--method", "rag-bm25", "--memory", "MEMNOMETH", "--question", "q"], "is not a hetmem RAG memory"),
    ("plan-profile-records-not-objects", ["plan", "--profile", "PROFBAD", "--out", "OUT"], "record 0 is a int, not an object"),
    ("index-out-in-proc", ["index", "--corpus", "CTX", "--method", "rag-bm25", "--out", "/proc/hetmem-out"], "cannot write the memory to /proc/hetmem-out"),
    ("profile-out-in-proc", ["profile", "--methods", "dense", "--lengths", "1k", "--shape", "llama3-8b", "--out", "/proc/hetmem-out"],
     "cannot write to --out /proc/hetmem-out"),
    ("profile-out-unrelated", ["profile", "--methods", "dense", "--lengths", "1k", "--shape", "llama3-8b", "--out", "UNREL"],
     "non-empty directory that hetmem did not write"),
    ("profile-bad-length", ["profile", "--methods", "dense", "--lengths", "abc", "--shape", "llama3-8b", "--out", "OUT"], "bad length 'abc'"),
    ("eval-unknown-task", EVAL[:2] + ["nope"] + EVAL[3:], "--tasks: unknown task 'nope'"),
    ("eval-bad-length", EVAL + ["--lengths", "4x"], "--lengths: '4x' is not a length"),
    ("eval-length-too-short", EVAL + ["--lengths", "64"], "must be a whole number of at least 128 tokens"),
    ("eval-bad-budget", EVAL + ["--budgets", "2/1"], "must be a fraction in (0, 1]"),
    ("eval-budget-not-a-number", EVAL + ["--budgets", "lots"], "--budgets: 'lots' is not a budget"),
    ("eval-method-param", EVAL + ["--methods", "quest:threshold=0.1"], "'threshold' is not a parameter of method 'quest'"),
    ("eval-method-bad-value", EVAL + ["--methods", "seer:threshold=2"], "--threshold must be between"),
    ("eval-unknown-method", EVAL + ["--methods", "dense,nope"], "--methods: unknown method 'nope'"),
    ("eval-samples-zero", EVAL + ["--samples", "0"], "--samples must be at least 1"),
    ("eval-duplicate-task", EVAL[:2] + ["vt,vt"] + EVAL[3:], "--tasks lists vt more than once"),
    ("eval-out-unrelated", EVAL + ["--out", "UNREL"], "non-empty directory that hetmem did not write"),
    ("profile-unknown-method", ["profile", "--methods", "nope", "--lengths", "1k", "--shape", "llama3-8b", "--out", "OUT"], "unknown method 'nope'"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad-input")
    (d / "ctx.txt").write_text("The code word is plum. " * 20)
    (d / "empty.txt").write_text("")
    (d / "bin.txt").write_bytes(b"\xff\xfe\x00\x81 not text")
    (d / "dir").mkdir()
    (d / "bad.json").write_text("[1, 2")
    (d / "list.json").write_text("[1, 2]")
    (d / "unrelated").mkdir()
    (d / "unrelated" / "thesis.tex").write_text("do not overwrite")
    (d / "qbad.jsonl").write_text("{not json\n")
    (d / "badcfg").mkdir()
    (d / "badcfg" / "config.json").write_text('{"model_type": "llama", "hidden_size": "big", "num_hidden_layers": 2}')
    for name, text in (("memlist", "[1, 2]"), ("memnometh", '{"format": 2}')):
        (d / name).mkdir()
        (d / name / "memory.json").write_text(text)
    (d / "prof_bad.json").write_text('{"schema": "hetmem.profile/1", "records": [1, 2]}')
    return d


@pytest.mark.parametrize("argv,fragment", [pytest.param(a, f, id=i) for i, a, f in CASES])
def test_bad_input_is_one_clear_line(files, tmp_path, capsys, argv, fragment):
    subst = {"CTX": files / "ctx.txt", "EMPTY": files / "empty.txt", "BIN": files / "bin.txt", "DIR": files / "dir",
             "BADJSON": files / "bad.json", "LISTJSON": files / "list.json", "UNREL": files / "unrelated",
             "QBAD": files / "qbad.jsonl", "OUT": tmp_path / "out", "BADCFG": files / "badcfg",
             "MEMLIST": files / "memlist", "MEMNOMETH": files / "memnometh", "PROFBAD": files / "prof_bad.json"}
    t0 = time.perf_counter()
    code = main([str(subst.get(a, a)) for a in argv])
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("[hetmem]")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("hetmem: error: "), err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in err and "internal error" not in err
    assert seconds < 20, f"caught only after {seconds:.1f} s of work"
    assert sorted(p.name for p in (files / "unrelated").iterdir()) == ["thesis.tex"]  # nothing written there


def test_the_table_covers_at_least_forty_kinds():
    assert len({i for i, _, _ in CASES}) >= 40


@pytest.mark.parametrize("content", [b"\x00\xff\xfe binary", b"[1, 2]", b"{\"schema\": 3}", "ENTRY:{}", "ENTRY:zeros",
                                     "ENTRY:absurd", "ENTRY:strings"])
def test_a_damaged_calibration_cache_is_measured_again_and_named(tmp_path, monkeypatch, capsys, content):
    """A calibration cache is ours: a binary, wrongly shaped, empty, zero, absurd or string entry is never used
    as is; it is measured again, with one line naming the file."""
    import json

    from hetmem.hw import calibrate as cal

    monkeypatch.setenv("HETMEM_CACHE", str(tmp_path))
    monkeypatch.setattr(cal, "measure", lambda device, dtype, quick=False: {"copy_gbps": 10.0, "matmul_gflops": 50.0,
                                                                            "measured_at": "now", "source": "measured"})
    path = cal.cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        key = cal.calibration_key("cpu", "float32")
        bad = {"ENTRY:{}": {}, "ENTRY:zeros": {"copy_gbps": 0, "matmul_gflops": 0},
               "ENTRY:absurd": {"copy_gbps": 1e12, "matmul_gflops": 50.0},
               "ENTRY:strings": {"copy_gbps": "fast", "matmul_gflops": "x"}}[content]
        content = json.dumps({"schema": cal.CACHE_SCHEMA, "entries": {cal.key_id(key): {**bad, "key": key}}}).encode()
    path.write_bytes(content)
    got = cal.calibrate("cpu", "float32")
    assert got["copy_gbps"] == 10.0 and got["cached"] is False
    err = capsys.readouterr().err
    if content.startswith(b"{\"schema\": \"hetmem"):
        assert str(path) in err and "measuring again" in err
    assert cal.calibrate("cpu", "float32")["cached"] is True  # the fresh entry is used next time
