"""The documents' figures come from the benchmark records, and are up to date with them.

benchmarks/make_results.py renders benchmarks/RESULTS.md and the ``<!-- results:NAME:begin/end -->``
blocks of README.md and docs/*.md from benchmarks/results/*.jsonl. These tests run no benchmark: they
regenerate the documents from the committed records and compare.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import _record  # noqa: E402
import make_results  # noqa: E402


def test_documents_match_the_committed_records():
    stale = [str(p.relative_to(ROOT)) for p in make_results.stale(ROOT)]
    assert not stale, f"out of date with benchmarks/results: {stale}; run python benchmarks/make_results.py"


def test_readme_has_generated_blocks_and_every_block_name_is_known():
    text = (ROOT / "README.md").read_text()
    names = make_results.MARK.findall(text)
    assert {"demo", "profile", "profiler-overhead"} <= {n for n, _ in names}
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for name, _ in make_results.MARK.findall(doc.read_text()):
            assert make_results.known_block(name, ROOT), f"{doc.name}: unknown block {name}"


def _fake_root(tmp_path: Path, bench: str, block: str) -> tuple[Path, dict]:
    """A repository with one committed record of ``bench`` and a README holding ``block``."""
    recs = make_results.Records(ROOT).all(bench)
    if not recs:
        pytest.skip(f"no committed record of {bench}")
    root = tmp_path / "repo"
    (root / "benchmarks" / "results").mkdir(parents=True)
    (root / "docs").mkdir()
    rec = json.loads(json.dumps(recs[-1]))
    (root / "benchmarks" / "results" / f"{bench}.jsonl").write_text(json.dumps(rec) + "\n")
    readme = f"# x\n\nhand text\n<!-- results:{block}:begin -->\nstale\n<!-- results:{block}:end -->\nmore hand text\n"
    (root / "README.md").write_text(readme)
    return root, rec


def test_a_changed_record_makes_the_documents_stale(tmp_path):
    root, rec = _fake_root(tmp_path, "bench_bm25", "bm25")
    gen = make_results.generate(root)
    readme = gen[root / "README.md"]
    assert readme.startswith("# x\n\nhand text\n") and readme.endswith("more hand text\n")
    assert f"{rec['figures']['ratio']['value']:.2f}x" in readme
    assert rec["git"]["commit"][:10] in readme and f"{rec['torch_threads']} torch thread" in readme
    for p, text in gen.items():
        p.write_text(text)
    assert make_results.stale(root) == []
    # a new record (a later run) replaces the figure: the committed documents are now out of date
    rec["figures"]["ratio"]["value"] = 123.456
    with open(root / "benchmarks" / "results" / "bench_bm25.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    assert set(make_results.stale(root)) == {root / "README.md", root / "benchmarks" / "RESULTS.md"}
    assert "123.46x" in make_results.generate(root)[root / "README.md"]


def test_bad_markers_and_unknown_blocks_are_errors():
    records = make_results.Records(ROOT)
    with pytest.raises(ValueError, match="unknown results block"):
        make_results.render_markers("<!-- results:nope:begin -->\n<!-- results:nope:end -->", records)
    with pytest.raises(ValueError, match="unbalanced"):
        make_results.render_markers("<!-- results:bm25:begin -->\n", records)


def test_a_block_without_a_record_says_so(tmp_path):
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "README.md").write_text("<!-- results:demo:begin -->\n<!-- results:demo:end -->\n")
    text = make_results.generate(root)[root / "README.md"]
    assert "No recorded run of `record_demo` yet" in text


def test_record_carries_provenance_and_validates_figures(tmp_path, monkeypatch):
    monkeypatch.setenv("HETMEM_RESULTS_DIR", str(tmp_path))
    r = _record.Record("unit_bench", argv=[str(ROOT / "benchmarks" / "unit_bench.py"), "--x", "1"])
    r.setting(x=1).figure("speed", 1.5, "x").figure("time", 2.0, "us", source="modelled", note="n")
    with pytest.raises(ValueError):
        r.figure("bad", 1.0, "x", source="guessed")
    with pytest.raises(ValueError):
        r.figure("nan", math.nan, "x")
    with pytest.raises(TypeError):
        r.figure("text", "fast", "x")
    with pytest.raises(ValueError):
        r.figure("speed", 2.0, "x")
    path = r.write(ok=True)
    r.write(ok=False)
    recs = _record.read_records(path)
    assert [x["ok"] for x in recs] == [True, False]
    rec = recs[0]
    assert rec["command"] == "python benchmarks/unit_bench.py --x 1"
    assert rec["figures"]["time"] == {"value": 2.0, "unit": "us", "source": "modelled", "note": "n"}
    assert len(rec["git"]["commit"]) == 40 and isinstance(rec["git"]["dirty"], bool)
    assert rec["machine"]["cores_available"] >= 1 and rec["torch_threads"] >= 1
    assert rec["versions"]["torch"] and rec["versions"]["transformers"]
    assert set(rec["load1"]) == {"start", "end"} and rec["date"].endswith("Z")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"schema": "other"}\n')
    with pytest.raises(ValueError, match="not a hetmem.bench-record"):
        _record.read_records(bad)


def test_the_readme_profile_image_is_the_recorded_one():
    rec = make_results.Records(ROOT).latest("record_profile")
    if rec is None or "image" not in rec["details"]:
        pytest.skip("no recorded profile image")
    img = rec["details"]["image"]
    assert hashlib.sha256((ROOT / img["path"]).read_bytes()).hexdigest() == img["sha256"]
    assert img["path"] in (ROOT / "README.md").read_text()


def test_results_dir_is_only_records():
    for p in (ROOT / "benchmarks" / "results").glob("*"):
        assert p.suffix == ".jsonl", f"{p.name}: benchmarks/results holds only <bench>.jsonl records"
        _record.read_records(p)


def test_demo_json_prints_one_object_with_the_task_and_both_runs(tmp_path, capsys):
    from hetmem.cli import main
    from hetmem.testing import save_tiny_model_dir

    model = save_tiny_model_dir(tmp_path / "m", "llama")
    code = main(["demo", "--json", "--model", str(model), "--tokens", "120", "--seed", "3", "--max-new-tokens", "3"])
    out, err = capsys.readouterr()
    assert code in (0, 1)  # a random-weight model does not find the passkey
    obj = json.loads(out)  # stdout is the one JSON object, nothing else
    assert set(obj["task"]) >= {"passkey", "depth", "tokens"} and obj["task"]["tokens"] == 120
    assert obj["task"]["passkey"] in err  # the readable lines went to stderr
    assert [r["method"] for r in obj["runs"].values()] == ["dense", "quest"]
    for r in obj["runs"].values():
        assert r["correct"] == (obj["task"]["passkey"] in r["answer"])
        assert set(r["steps"]) == {"prepare", "relevancy", "retrieval", "apply"} and r["time_source"] == "measured"
    assert obj["correct"] == all(r["correct"] for r in obj["runs"].values()) and code == (0 if obj["correct"] else 1)
