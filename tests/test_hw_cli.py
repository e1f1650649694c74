"""hetmem plan writes plan.json / schedule.json / a table; hetmem run --placement runs steps on their backends."""

import json

import pytest

from hetmem.cli import main
from hetmem.testing import save_tiny_model_dir


def _profile(path):
    """A minimal hetmem.profile/1 (the profiler's schema, docs/profile-schema.md) for quest at two lengths."""
    recs = []
    for L in (4096, 65536):
        pages = L // 16
        per = {
            "prepare": ("reduce", 2 * 8 * 128, 8 * 128 * 4 * 3, 8 * 128 * 4 * 2),
            "relevancy": ("gemv", 4 * 32 * pages * 128, 8 * pages * 128 * 4 * 2, 8 * pages * 4),
            "retrieval": ("topk", 8 * pages, 8 * pages * 4, 8 * 64 * 8),
            "apply": ("attention", 4 * 32 * 1024 * 128, 8 * 1024 * 128 * 4 * 2, 32 * 128 * 4),
        }
        for step, (cls, fl, br, bw) in per.items():
            recs.append({"method": "quest", "params": {}, "length": L, "phase": "decode", "step": step, "status": "ok",
                         "op_class": cls, "device": "cpu", "dtype": "float32", "ms": 1.0, "calls": 30 * 4, "tokens": 4,
                         "layers": 32, "flops": fl * 120, "bytes_read": br * 120, "bytes_written": bw * 120,
                         "per_call": {"ms": 0.01, "flops": fl, "bytes_read": br, "bytes_written": bw},
                         "ops": [{"op": step, "class": cls, "flops": fl, "bytes_read": br, "bytes_written": bw}]})
    prof = {"schema": "hetmem.profile/1", "mode": "sweep", "shape": {"name": "llama3-8b", "layers": 32, "heads": 32,
            "kv_heads": 8, "head_dim": 128}, "device": "cpu", "dtype": "float32", "batch": 1, "runs": [], "records": recs}
    path.write_text(json.dumps(prof))
    return path


def test_plan_writes_files(tmp_path, capsys):
    prof = _profile(tmp_path / "profile.json")
    out = tmp_path / "plan"
    assert main(["plan", "--profile", str(prof), "--system", "mi210+u55c", "--objective", "edp", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "MODELLED" in table and "quest" in table
    plan = json.loads((out / "plan.json").read_text())
    assert plan["source"] == "modelled" and len(plan["entries"]) == 2
    e = plan["entries"][0]
    assert {"best", "all_gpu", "speedup", "energy_ratio"} <= set(e)
    assert e["all_gpu"]["devices"] == {s: "mi210" for s in ("prepare", "relevancy", "retrieval", "apply")}
    assert e["best"]["source"] == "modelled"
    assert e["speedup"] == pytest.approx(e["all_gpu"]["latency_us"] / e["best"]["latency_us"], rel=1e-3)
    sch = json.loads((out / "schedule.json").read_text())
    assert sch["system"] == "mi210+u55c" and sch["rules"]["quest"][-1]["max_size"] is None


def test_plan_errors(tmp_path, capsys):
    assert main(["plan", "--profile", str(tmp_path / "none.json"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["plan", "--profile", str(bad), "--out", str(tmp_path)]) == 2
    assert "not a hetmem profile" in capsys.readouterr().err
    prof = _profile(tmp_path / "p.json")
    assert main(["plan", "--profile", str(prof), "--objective", "speed", "--out", str(tmp_path)]) == 2
    assert "unknown objective" in capsys.readouterr().err


def test_run_placement_fpga_emu_same_answer(tmp_path, capsys):
    model = save_tiny_model_dir(tmp_path / "m", "llama", max_position_embeddings=512)
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("Alpha beta gamma delta. The code word is kiwi. " * 6, encoding="utf-8")
    sched = tmp_path / "schedule.json"
    sched.write_text(json.dumps({"rules": {"quest": [{"max_size": None, "devices": {
        "prepare": "host-cpu", "relevancy": "u55c", "retrieval": "u55c", "apply": "cpu"}}]}}))
    base = ["run", "--method", "quest", "--budget", "64", "--page-size", "16", "--dense-layers", "0", "--model", str(model),
            "--context", str(ctx), "--question", "What is the code word?", "--max-new-tokens", "4", "--json"]
    assert main(base) == 0
    ref = json.loads(capsys.readouterr().out)
    assert main(base + ["--placement", str(sched)]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["answer"] == ref["answer"]  # int16 scoring picked the same pages here
    assert rec["placement"]["relevancy"] == {"device": "u55c", "backend": "fpga-emu", "time_source": "modelled",
                                             "note": "u55c emulated (ops.fpga_emu), time modelled"}
    assert rec["steps"]["relevancy"]["source"] == "modelled" and rec["steps"]["retrieval"]["source"] == "modelled"
    assert rec["steps"]["apply"]["source"] == "measured" and rec["steps"]["relevancy"]["calls"] > 0
    assert rec["steps"]["relevancy"]["ms"] > 0 and "emulation_wall_ms" in rec["steps"]["relevancy"]["phases"]["decode"]
    # the modelled figure adds the host<->FPGA transfers over the catalogue's link, and says so
    fm = rec["fpga_modelled"]
    assert fm["link"]["name"] == "pcie4-x16" and fm["link"]["system"] == "host+u55c" and fm["fpga"]["macs_per_cycle"] == 3010
    assert any("transfers over the link" in s for s in fm["includes"]) and fm["transfer_ms"]["decode"] > 0
    swap = sum(p["ms"] - p["emulation_wall_ms"] for st in ("relevancy", "retrieval")
               for p in [rec["steps"][st]["phases"]["decode"]])
    assert rec["decode_ms_fpga_modelled"] == pytest.approx(rec["decode_ms"] + swap + fm["transfer_ms"]["decode"], abs=2e-3)
    n_kv = json.loads((model / "config.json").read_text())["num_key_value_heads"]
    calls = rec["steps"]["retrieval"]["phases"]["decode"]["calls"]
    assert fm["per_step"]["retrieval"]["decode"]["bytes"] == calls * (64 // 16) * n_kv * 4  # int32 page ids back
    assert fm["per_step"]["relevancy"]["prefill"]["bytes"] > 0  # the prompt's page bounds go to the FPGA
    # a step with no fpga-emu kernel is refused in one line
    sched.write_text(json.dumps({"rules": {"quest": [{"devices": {"apply": "u55c"}}]}}))
    assert main(base + ["--placement", str(sched)]) == 2
    assert "has no fpga-emu kernel" in capsys.readouterr().err


@pytest.mark.parametrize("method,extra", [("dsa", ["--budget", "64"]), ("seer", ["--threshold", "0.05", "--page-size", "16"])])
def test_run_placement_other_methods(tmp_path, capsys, method, extra):
    model = save_tiny_model_dir(tmp_path / "m", "llama", max_position_embeddings=512)
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("Alpha beta gamma delta. The code word is kiwi. " * 6, encoding="utf-8")
    sched = tmp_path / "schedule.json"
    sched.write_text(json.dumps({"rules": {method: [{"devices": {"relevancy": "u55c", "retrieval": "u55c"}}]}}))
    base = ["run", "--method", method, *extra, "--dense-layers", "0", "--model", str(model), "--context", str(ctx),
            "--question", "What is the code word?", "--max-new-tokens", "3", "--json"]
    assert main(base) == 0
    ref = json.loads(capsys.readouterr().out)
    assert main(base + ["--placement", str(sched)]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["answer"] == ref["answer"]
    assert rec["steps"]["retrieval"]["source"] == "modelled" and rec["steps"]["retrieval"]["calls"] > 0
    assert rec["steps"]["prepare"]["source"] == "measured"


def test_plan_kv_dtype_retargets_bytes(tmp_path, capsys):
    from hetmem.hw.workloads import read_profile, workloads_from_profile

    prof = read_profile(_profile(tmp_path / "p.json"))
    f32 = {w.size: w for w in workloads_from_profile(prof)}
    bf16 = {w.size: w for w in workloads_from_profile(prof, kv_dtype="bfloat16")}
    rel32, rel16 = f32[4096].steps["relevancy"].ops[0], bf16[4096].steps["relevancy"].ops[0]
    assert rel16.bytes_read == rel32.bytes_read / 2 and rel16.bytes_written == rel32.bytes_written  # scores stay fp32
    assert bf16[4096].query_bytes == f32[4096].query_bytes / 2
    assert main(["plan", "--profile", str(tmp_path / "p.json"), "--kv-dtype", "bfloat16", "--out", str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o" / "plan.json").read_text())["kv_dtype"] == "bfloat16"


def test_plan_schedule_drives_run(tmp_path, capsys):
    """The schedule hetmem plan writes is what hetmem run --placement reads (GPU devices fall back to cpu here)."""
    prof = _profile(tmp_path / "profile.json")
    assert main(["plan", "--profile", str(prof), "--system", "mi210+u55c", "--out", str(tmp_path / "plan")]) == 0
    capsys.readouterr()
    model = save_tiny_model_dir(tmp_path / "m", "llama", max_position_embeddings=512)
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("Alpha beta gamma delta. The code word is kiwi. " * 6, encoding="utf-8")
    assert main(["run", "--method", "quest", "--budget", "64", "--dense-layers", "0", "--model", str(model), "--context",
                 str(ctx), "--question", "What?", "--max-new-tokens", "2", "--json",
                 "--placement", str(tmp_path / "plan" / "schedule.json")]) == 0
    rec = json.loads(capsys.readouterr().out)
    sch = json.loads((tmp_path / "plan" / "schedule.json").read_text())
    want = sch["rules"]["quest"][0]["devices"]  # a ~300-token prompt falls under the first rule
    assert {s: p["device"] for s, p in rec["placement"].items()} == want
    for s, p in rec["placement"].items():
        assert p["backend"] == ("fpga-emu" if want[s] == "u55c" else "cpu")
        assert rec["steps"][s]["source"] == ("modelled" if want[s] == "u55c" else "measured")
