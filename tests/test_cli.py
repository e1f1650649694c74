"""The CLI: bad input gets one clear line and a non-zero exit; --json reports real per-step measurements."""

import json
import subprocess
import sys

import pytest

from hetmem.cli import main
from hetmem.testing import save_tiny_model_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    # a 160-token window so "context longer than the window" is cheap to hit
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "m", "llama", max_position_embeddings=160)


@pytest.fixture()
def ctx(tmp_path):
    p = tmp_path / "ctx.txt"
    p.write_text("Alpha beta gamma. The code word is kiwi. Delta epsilon.\n", encoding="utf-8")
    return p


def _err(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    assert code != 0
    lines = [l for l in err.strip().splitlines() if not l.startswith("[hetmem]")]
    assert len(lines) == 1, err
    assert lines[0].startswith("hetmem: error:"), err
    assert "Traceback" not in err
    return lines[0]


def test_unknown_method(capsys, ctx):
    msg = _err(capsys, ["run", "--method", "nope", "--context", str(ctx), "--question", "q"])
    assert "nope" in msg and "dense" in msg


def test_unknown_model(capsys, ctx):
    msg = _err(capsys, ["run", "--method", "dense", "--model", "no-such-model", "--context", str(ctx), "--question", "q"])
    assert "unknown model" in msg


def test_budget_smaller_than_a_page(capsys, ctx):
    msg = _err(capsys, ["run", "--method", "quest", "--budget", "8", "--page-size", "16", "--context", str(ctx), "--question", "q"])
    assert "smaller than one page" in msg


def test_missing_and_empty_and_binary_context(capsys, tmp_path):
    assert "does not exist" in _err(capsys, ["run", "--method", "dense", "--context", str(tmp_path / "x.txt"), "--question", "q"])
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert "is empty" in _err(capsys, ["run", "--method", "dense", "--context", str(empty), "--question", "q"])
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81abc")
    assert "UTF-8" in _err(capsys, ["run", "--method", "dense", "--context", str(binary), "--question", "q"])


def test_empty_question(capsys, ctx):
    assert "question is empty" in _err(capsys, ["run", "--method", "dense", "--context", str(ctx), "--question", "  "])


def test_context_longer_than_window(capsys, tmp_path, tiny_dir):
    long = tmp_path / "long.txt"
    long.write_text("word " * 100)
    msg = _err(capsys, ["run", "--method", "dense", "--model", str(tiny_dir), "--context", str(long), "--question", "q"])
    assert "window" in msg and "160" in msg


def test_no_command(capsys):
    _err(capsys, [])


@pytest.mark.parametrize("method", ["dense", "quest"])
def test_run_json_reports_measured_steps(capsys, ctx, tiny_dir, method):
    opts = ["--budget", "32", "--page-size", "8", "--dense-layers", "0"] if method == "quest" else []
    code = main(["run", "--method", method, *opts, "--model", str(tiny_dir),
                 "--context", str(ctx), "--question", "What is the code word?", "--max-new-tokens", "5", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    rec = json.loads(out)
    for key in ("answer", "method", "model", "total_ms", "tokens", "steps"):
        assert key in rec
    assert rec["method"] == method and rec["time_source"] == "measured"
    assert rec["tokens"]["generated"] == 5 and rec["tokens"]["prompt"] > 32
    assert set(rec["steps"]) == {"prepare", "relevancy", "retrieval", "apply"}
    for s in rec["steps"].values():
        assert s["ms"] >= 0 and isinstance(s["calls"], int)
    assert rec["steps"]["apply"]["calls"] > 0 and rec["steps"]["apply"]["ms"] > 0
    if method == "quest":
        assert rec["steps"]["relevancy"]["calls"] == 4 * 2  # 4 decode steps x 2 layers
        assert rec["steps"]["prepare"]["ms"] > 0
    else:
        assert rec["steps"]["relevancy"]["calls"] == 0


def test_entry_point_exits_nonzero_without_traceback(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "hetmem.cli", "run", "--method", "quest", "--budget", "4",
         "--context", str(tmp_path / "missing.txt"), "--question", "q"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.strip() == "hetmem: error: --budget 4 is smaller than one page (16 tokens)"


def test_methods_lists_dense_and_quest(capsys):
    assert main(["methods", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {"dense", "quest"} <= set(rows)
    assert rows["quest"]["params"]["page_size"] == 16


def test_gates_for_a_method_without_gates(capsys, ctx):
    msg = _err(capsys, ["run", "--method", "quest", "--gates", "/nope", "--context", str(ctx), "--question", "q"])
    assert "--gates" in msg and "quest" in msg


def test_an_option_the_method_does_not_take_is_an_error(capsys, ctx):
    msg = _err(capsys, ["run", "--method", "quest", "--threshold", "0.1", "--context", str(ctx), "--question", "q"])
    assert "--threshold is not a parameter of method 'quest'" in msg and "--budget" in msg


def test_budget_off_the_page_grid_is_said_and_recorded(capsys, ctx, tiny_dir):
    code = main(["run", "--method", "quest", "--budget", "36", "--page-size", "8", "--dense-layers", "0", "--model",
                 str(tiny_dir), "--context", str(ctx), "--question", "q", "--max-new-tokens", "2", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "hetmem: note: --budget 36 is not a multiple of --page-size 8: quest attends 32 tokens (4 pages)" in err
    assert json.loads(out)["notes"] == ["--budget 36 is not a multiple of --page-size 8: quest attends 32 tokens (4 pages)"]


def test_no_step_timing_and_recall_is_measurement_not_method_time(capsys, ctx, tiny_dir):
    base = ["run", "--method", "quest", "--budget", "16", "--page-size", "8", "--dense-layers", "0", "--model",
            str(tiny_dir), "--context", str(ctx), "--question", "q", "--max-new-tokens", "4", "--json"]
    assert main(base + ["--no-step-timing"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["step_timing"]["enabled"] is False
    assert all(s["calls"] == 0 for s in rec["steps"].values())  # nothing timed
    assert main(base + ["--recall"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["step_timing"]["enabled"] is True and rec["recall"]["attention_mass_recall"] is not None
    m = rec["measurement_ms"]["recall"]
    assert m > 0 and m == pytest.approx(rec["recall"]["measure_ms"], abs=1e-3)


def test_a_sigint_after_main_returned_exits_130(tmp_path):
    """Ctrl-C arriving once the command is done (as Python shuts down) exits 130, not by the signal (-2)."""
    script = tmp_path / "late_sigint.py"
    script.write_text("import os, signal, sys, time\n"
                      "from hetmem.cli import main\n"
                      "sys.argv = ['hetmem', 'methods']\n"
                      "code = main()\n"
                      "os.kill(os.getpid(), signal.SIGINT)  # a late Ctrl-C\n"
                      "time.sleep(30)\n"
                      "sys.exit(code)\n", encoding="utf-8")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 130, (r.returncode, r.stderr[-500:])
    assert r.stderr.strip().endswith("hetmem: interrupted") and "Traceback" not in r.stderr
