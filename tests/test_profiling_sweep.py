"""`hetmem profile`: calibration cache, a tiny sweep writing all five artifacts, resume, skip-with-reason,
and a real (tiny random-weight) model end to end."""

import json

import pytest
import torch

from hetmem.cli import main
from hetmem.hw import calibrate as cal_mod
from hetmem.hw.calibrate import calibrate
from hetmem.testing import save_tiny_model_dir

ARTIFACTS = ("profile.json", "summary.md", "overhead.png", "roofline.png", "trace.json")


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HETMEM_CACHE", str(tmp_path / "cache"))
    # pre-fill the calibration cache quickly (the CLI then reuses it: that is the cache under test too)
    calibrate("cpu", "float32", quick=True)
    return tmp_path / "cache"


def test_calibration_is_measured_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HETMEM_CACHE", str(tmp_path))
    first = calibrate("cpu", "float32", quick=True)
    assert first["cached"] is False and first["source"] == "measured"
    assert first["copy_gbps"] > 0.05 and first["matmul_gflops"] > 0.05
    again = calibrate("cpu", "float32", quick=True)
    assert again["cached"] is True and again["copy_gbps"] == first["copy_gbps"]
    data = json.loads((tmp_path / "calibration.json").read_text())
    kid = cal_mod.key_id(cal_mod.calibration_key("cpu", "float32"))
    assert data["entries"][kid]["key"]["device"] == "cpu" and data["entries"][kid]["key"]["dtype"] == "float32"
    redo = calibrate("cpu", "float32", force=True, quick=True)
    assert redo["cached"] is False
    (tmp_path / "calibration.json").write_text("{not json")  # a corrupt cache is re-measured, not fatal
    assert calibrate("cpu", "float32", quick=True)["cached"] is False


def test_calibration_cache_is_keyed_on_cores_torch_and_threads(tmp_path, monkeypatch):
    """A cached calibration is reused only on the same key: other available cores, another torch version or
    another thread count re-measure instead of silently reusing stale figures."""
    import os

    monkeypatch.setenv("HETMEM_CACHE", str(tmp_path))
    first = calibrate("cpu", "float32", quick=True)
    key = first["key"]
    assert key["cores_available"] == len(os.sched_getaffinity(0)) and key["torch"] == torch.__version__
    assert key["threads"] == torch.get_num_threads() and key["cpu"] and first["measured_at"]
    assert first["key_id"] == cal_mod.key_id(key)
    assert calibrate("cpu", "float32", quick=True)["cached"] is True

    monkeypatch.setattr(cal_mod, "cores_available", lambda: key["cores_available"] + 7)
    moved = calibrate("cpu", "float32", quick=True)
    assert moved["cached"] is False and moved["key"]["cores_available"] == key["cores_available"] + 7
    monkeypatch.undo()
    monkeypatch.setenv("HETMEM_CACHE", str(tmp_path))
    assert calibrate("cpu", "float32", quick=True)["cached"] is True  # the first entry is still there

    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert calibrate("cpu", "float32", quick=True)["cached"] is False
    monkeypatch.undo()
    monkeypatch.setenv("HETMEM_CACHE", str(tmp_path))

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        other = calibrate("cpu", "float32", quick=True)
        assert other["cached"] is False and other["key"]["threads"] == threads + 1
    finally:
        torch.set_num_threads(threads)
    # an entry whose stored key does not match (edited, or a hash collision) is not trusted
    data = json.loads((tmp_path / "calibration.json").read_text())
    data["entries"][first["key_id"]]["key"]["cpu"] = "some other cpu"
    (tmp_path / "calibration.json").write_text(json.dumps(data))
    assert calibrate("cpu", "float32", quick=True)["cached"] is False


def _profile(out, *extra, lengths="1k,2k", methods="dense,quest"):
    return main(["profile", "--methods", methods, "--lengths", lengths, "--shape", "tiny", "--out", str(out),
                 "--no-progress", "--decode-tokens", "2", "--budget", "256",
                 "--threads", str(torch.get_num_threads()),  # the thread count the cache fixture calibrated with
                 *extra])


def test_tiny_sweep_writes_all_artifacts_and_resumes(cache, tmp_path, capsys, monkeypatch):
    from hetmem.ops import fast

    monkeypatch.setattr(fast, "_lib", lambda: None)  # the torch path, whose Apply gathers (timed as apply.gather)
    out = tmp_path / "prof"
    assert _profile(out, "--roofline-devices", "u55c,h100") == 0
    for name in ARTIFACTS:
        assert (out / name).stat().st_size > 0, name
    assert (out / "overhead.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "roofline.png").read_bytes()[:4] == b"\x89PNG"
    doc = json.loads((out / "profile.json").read_text())
    assert doc["schema"] == "hetmem.profile/1" and doc["mode"] == "sweep" and doc["shape"]["name"] == "tiny"
    assert doc["calibration"]["source"] == "measured" and doc["calibration"]["copy_gbps"] > 0
    # roofline.png: the measured roof, then each catalogue device's datasheet roof, each with its own ridge
    from hetmem.profiling.artifacts import roofs

    rs = roofs(doc)
    assert [(r["name"], r["source"]) for r in rs] == [("cpu", "measured"), ("u55c", "datasheet"), ("h100", "datasheet")]
    assert len({round(r["peak"] / r["bw"], 6) for r in rs}) == 3
    # the run record says when the calibration was measured and under which key (the cache fixture made it)
    cal = doc["calibration"]
    assert cal["cached"] is True and cal["measured_at"] and cal["key"]["threads"] == doc["threads"]
    assert cal["key_id"] == json.loads((cache / "calibration.json").read_text())["entries"][cal["key_id"]]["key_id"]
    assert {(r["method"], r["length"]) for r in doc["runs"]} == {("dense", 1024), ("dense", 2048),
                                                               ("quest", 1024), ("quest", 2048)}
    steps = {r["step"] for r in doc["records"] if r["method"] == "quest" and r["length"] == 2048 and r["phase"] == "decode"}
    assert steps == {"prepare", "relevancy", "retrieval", "apply", "apply.gather", "rest", "total"}
    dense_steps = {r["step"] for r in doc["records"] if r["method"] == "dense" and r["phase"] == "decode"}
    assert dense_steps == {"apply", "rest", "total"}
    for r in doc["records"]:
        assert r["status"] == "ok" and r["ms"] is not None and r["ms"] >= 0
        assert "measured" in r["time_source"] and r["count_source"] == "analytic"
        if r["step"] != "total":
            assert r["flops"] is not None and r["bytes_read"] > 0, r
    run = next(r for r in doc["runs"] if r["method"] == "quest" and r["length"] == 2048)
    ov = run["phases"]["decode"]
    # quest keeps dense_layers=2 of the tiny shape's 4 layers dense: one layer of each kind is timed
    assert [t["scaled_to"] for t in run["phases"]["layers_timed"]] == [2, 2]
    recs = {r["step"]: r for r in doc["records"] if r["method"] == "quest" and r["length"] == 2048 and r["phase"] == "decode"}
    # ops cover every layer: 2 dense + 2 quest layers x 2 tokens of attention, the gather in the quest ones only
    apply = recs["apply"]
    assert apply["calls"] == 8
    ops = {o["op"]: o for o in apply["ops"]}
    assert ops["decode_attention"]["calls"] == 8
    assert [o["calls"] for o in apply["ops"] if "gather" in o["op"]] == [4]
    for r in recs.values():
        if r["ops"]:
            assert sum(o["total"]["flops"] for o in r["ops"]) == pytest.approx(r["flops"], rel=1e-9)
            assert sum(o["bytes_read"] for o in r["ops"]) == pytest.approx(r["per_call"]["bytes_read"], rel=1e-9)
    mem = sum(recs[s]["ms"] for s in ("prepare", "relevancy", "retrieval", "apply.gather"))
    assert ov["overhead"] == pytest.approx(mem / recs["total"]["ms"], rel=1e-3, abs=1e-4)
    assert 0 < ov["overhead"] < ov["overhead_incl_apply"] <= 1
    trace = json.loads((out / "trace.json").read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert spans and all(e["dur"] >= 0 and "ts" in e for e in spans)
    assert {"relevancy", "apply.gather"} <= {e["name"] for e in spans}
    summary = (out / "summary.md").read_text()
    assert "measured" in summary and "| quest | 2k |" in summary
    assert f"reused from the cache (measured at {cal['measured_at']}), key {cal['key_id']}" in summary
    assert f"{cal['key']['cores_available']} cores available" in summary

    # resume: the four done runs are kept as they were, only 4k runs
    before = {(r["method"], r["length"], r["phase"], r["step"]): r["ms"] for r in doc["records"]}
    capsys.readouterr()
    assert _profile(out, lengths="1k,2k,4k") == 0
    assert "resuming" in capsys.readouterr().err
    doc2 = json.loads((out / "profile.json").read_text())
    after = {(r["method"], r["length"], r["phase"], r["step"]): r["ms"] for r in doc2["records"]}
    assert {k: after[k] for k in before} == before
    assert {r["length"] for r in doc2["runs"]} == {1024, 2048, 4096} and len(doc2["runs"]) == 6
    pids = {e["pid"] for e in json.loads((out / "trace.json").read_text())["traceEvents"]}
    assert len(pids) == 6

    # other settings in the same DIR are refused with one line
    assert _profile(out, "--page-size", "32") == 2
    assert "use another --out" in capsys.readouterr().err


def test_skips_with_reason_and_goes_on(cache, tmp_path, capsys, monkeypatch):
    shape = tmp_path / "small.json"
    shape.write_text(json.dumps({"name": "small-window", "layers": 4, "heads": 4, "kv_heads": 2, "head_dim": 16,
                                 "hidden": 64, "intermediate": 128, "vocab": 128, "max_context": 1500}))
    out = tmp_path / "skip"
    code = main(["profile", "--methods", "dense,quest", "--lengths", "1k,2k", "--shape", str(shape), "--out", str(out),
                 "--no-progress", "--decode-tokens", "2", "--budget", "256"])
    assert code == 0
    doc = json.loads((out / "profile.json").read_text())
    runs = {(r["method"], r["length"]): r for r in doc["runs"]}
    assert runs[("dense", 1024)]["status"] == "ok" and runs[("quest", 1024)]["status"] == "ok"
    for m in ("dense", "quest"):
        r = runs[(m, 2048)]
        assert r["status"] == "skipped" and "over the window" in r["reason"]
    skipped = [r for r in doc["records"] if r["status"] == "skipped"]
    assert skipped and all(r["reason"] and r["ms"] is None for r in skipped)
    assert {r["step"] for r in skipped if r["method"] == "quest"} >= {"prepare", "relevancy", "retrieval", "apply"}
    assert "skipped" in (out / "summary.md").read_text()

    # a length that would not fit in memory is skipped with the estimate, not attempted
    import hetmem.profiling.sweep as sweep

    monkeypatch.setattr(sweep, "_avail_bytes", lambda: 1_000_000)
    out2 = tmp_path / "oom"
    assert _profile(out2, lengths="4k", methods="dense") == 0
    doc = json.loads((out2 / "profile.json").read_text())
    assert doc["runs"][0]["status"] == "skipped" and "out of memory" in doc["runs"][0]["reason"]


def test_length_names_the_context_shortened_to_fit_the_window(cache, tmp_path, capsys):
    """A length at the window is not skipped: the context is shortened by the warm-up + decode tokens, and
    the run, its records, the summary and stderr say so in one line."""
    shape = tmp_path / "w1k.json"
    shape.write_text(json.dumps({"name": "w1k", "layers": 4, "heads": 4, "kv_heads": 2, "head_dim": 16,
                                 "hidden": 64, "intermediate": 128, "vocab": 128, "max_context": 1024}))
    out = tmp_path / "fit"
    code = main(["profile", "--methods", "dense,quest", "--lengths", "1k,2k", "--shape", str(shape), "--out", str(out),
                 "--no-progress", "--decode-tokens", "2", "--warmup", "1", "--budget", "256"])
    assert code == 0
    err = capsys.readouterr().err
    doc = json.loads((out / "profile.json").read_text())
    runs = {(r["method"], r["length"]): r for r in doc["runs"]}
    for m in ("dense", "quest"):
        r = runs[(m, 1024)]
        assert r["status"] == "ok" and r["context_tokens"] == 1021
        assert "shortened from 1024 to 1021 tokens" in r["note"] and "1 warm-up + 2 timed decode steps" in r["note"]
        assert f"{m} @ 1024: context shortened" in err
        assert r["phases"]["decode"]["total_ms"] > 0
        recs = [x for x in doc["records"] if x["method"] == m and x["length"] == 1024]
        assert recs and all(x["context_tokens"] == 1021 for x in recs)
        # a length over the window itself is still skipped, with its reason
        assert runs[(m, 2048)]["status"] == "skipped" and "over the window" in runs[(m, 2048)]["reason"]
    prep = next(x for x in doc["records"] if x["method"] == "quest" and x["phase"] == "prefill" and x["step"] == "prepare")
    assert prep["tokens"] == 1021  # the prefill wrote the shortened context
    assert "shortened from 1024 to 1021" in (out / "summary.md").read_text()


def test_fit_context_rules():
    from hetmem.profiling.sweep import fit_context, window_reason

    assert fit_context(1000, 5, 1024, "m", "x") == (1000, None)
    ctx, note = fit_context(131072, 5, 131072, "llama3-8b", "1 warm-up + 4 timed decode steps")
    assert ctx == 131067 and note.startswith("context shortened from 131072 to 131067")
    assert window_reason(131072, 5, 131072, "llama3-8b") is None
    assert "over the window" in window_reason(131073, 5, 131072, "llama3-8b")
    assert "over the window" in window_reason(100, 200, 200, "m")  # no room left for a context


def test_bad_input_is_one_line(cache, tmp_path, capsys):
    for argv in (["--lengths", "4q"], ["--methods", "nosuch"], ["--shape", "nosuch-model"],
                 ["--roofline-devices", "nosuch-gpu"]):
        args = {"--methods": "dense", "--lengths": "1k", "--shape": "tiny"}
        args.update(dict(zip(argv[::2], argv[1::2])))
        code = main(["profile", *sum(([k, v] for k, v in args.items()), []), "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err[-1].startswith("hetmem: error:") and "Traceback" not in "\n".join(err)


def test_real_tiny_model_end_to_end(cache, tmp_path):
    model_dir = save_tiny_model_dir(tmp_path / "m", "llama", max_position_embeddings=512, layers=3)
    out = tmp_path / "real"
    code = main(["profile", "--methods", "dense,quest", "--lengths", "128,256,512,600", "--model", str(model_dir),
                 "--out", str(out), "--no-progress", "--decode-tokens", "2", "--budget", "64", "--page-size", "16"])
    assert code == 0
    doc = json.loads((out / "profile.json").read_text())
    assert doc["mode"] == "model" and doc["shape"]["layers"] == 3
    runs = {(r["method"], r["length"]): r for r in doc["runs"]}
    assert runs[("quest", 600)]["status"] == "skipped" and "window" in runs[("quest", 600)]["reason"]
    # 512 names the whole window: the prompt is shortened by the 2 decode steps + the first generated token
    assert runs[("quest", 512)]["status"] == "ok" and runs[("quest", 512)]["context_tokens"] == 509
    assert "shortened from 512 to 509" in runs[("quest", 512)]["note"]
    q = runs[("quest", 256)]
    assert q["status"] == "ok"
    for ph in ("prefill", "decode"):
        assert q["phases"][ph]["total_ms"] > 0 and 0 <= q["phases"][ph]["overhead"] <= 1
    recs = {(r["phase"], r["step"]): r for r in doc["records"] if r["method"] == "quest" and r["length"] == 256}
    # decode: 3 layers, 1 of them sparse (quest keeps 2 dense) -> relevancy called once per token
    assert recs[("decode", "relevancy")]["calls"] == 2
    assert recs[("decode", "apply")]["calls"] == 2 * 3
    assert recs[("prefill", "apply")]["flops"] > 0  # dense prefill attention, counted analytically
    assert recs[("prefill", "total")]["ms"] >= recs[("prefill", "apply")]["ms"]
    for name in ARTIFACTS:
        assert (out / name).exists()
