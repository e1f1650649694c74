"""Compressed contextual memory (memagent, hmt, lact): steps run and are timed, memagent's bound, hmt's
zero-memory equivalence, save/load and training, the LaCT update, refusals (tiny random models)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from hetmem.cli import main as hetmem_main
from hetmem.core.timer import StepTimer
from hetmem.errors import HetmemError
from hetmem.llm.generate import fork_cache, prefill
from hetmem.llm.models import LoadedModel
from hetmem.methods import REGISTRY, get_method
from hetmem.methods.gates import save_gates
from hetmem.methods.hmt import hmt_pipeline, init_params, load_params, process_segments
from hetmem.ops.fast_weight import NAMES, fw_apply, fw_forward, fw_grads, fw_loss, init_fast_weights
from hetmem.runtime.contextual import answer_contextual
from hetmem.testing import char_tokenizer, tiny_model
from hetmem.train.distill import HMTObjective, train

STEPS = ("prepare", "relevancy", "retrieval", "apply")


@pytest.fixture(scope="module")
def lm():
    return LoadedModel("tiny", tiny_model(max_position_embeddings=4096), char_tokenizer(), 4096)


def test_family_and_registry():
    for name in ("memagent", "hmt", "lact"):
        assert REGISTRY[name].family == "contextual-memory"


def test_prefix_cache_reuse_matches_full_prefill(lm):
    ids = torch.randint(3, 100, (1, 40))
    _, full = prefill(lm.model, ids)
    pre, _ = prefill(lm.model, ids[:, :25])
    _, cont = prefill(lm.model, ids[:, 25:], fork_cache(lm.model, pre, 40))
    assert torch.allclose(full, cont, atol=1e-5)
    assert pre.layers[0].length == 25  # the prefix itself is untouched by the fork


def test_memagent_steps_timed_and_memory_bounded(lm):
    m = get_method("memagent", chunk_tokens=600, memory_tokens=12)
    rec = answer_contextual(lm, m, "The quick brown fox jumps over the lazy dog. " * 12, "What jumps?", 4)
    for s in STEPS:
        assert rec["steps"][s]["calls"] >= 1 and rec["steps"][s]["ms"] > 0
    assert rec["chunks"] >= 2 and rec["llm_calls"] == rec["chunks"] + 1
    assert rec["steps"]["relevancy"]["calls"] == rec["chunks"] == len(rec["memory_after_chunk"])
    assert all(h["memory_tokens"] <= 12 for h in rec["memory_after_chunk"])
    assert rec["tokens_prefilled"] < rec["tokens_read"]  # the prefix is read every call, prefilled once


def test_memagent_chunk_too_small_names_smallest(lm):
    with pytest.raises(HetmemError, match="smallest that works is (\\d+)") as e:
        answer_contextual(lm, get_method("memagent", chunk_tokens=100, memory_tokens=12), "abc " * 50, "q?", 4)
    need = int(e.value.args[0].rsplit(" ", 1)[1])
    rec = answer_contextual(lm, get_method("memagent", chunk_tokens=need, memory_tokens=12), "abc " * 5, "q?", 2)
    assert rec["chunk_context_tokens"] == 1


def test_hmt_zero_memory_entries_equals_segment_baseline(lm):
    ids = torch.randint(3, 100, (1, 48))
    p = init_params(64, embed=lm.model.get_input_embeddings().weight)
    outs, mem = process_segments(hmt_pipeline(p, 16, 0), lm.model, p, ids, 16)
    for i, o in enumerate(outs):
        assert torch.allclose(o, lm.model(input_ids=ids[:, 16 * i : 16 * i + 16]).logits, atol=1e-5)
    assert mem.tensors["M"].shape[1] == 3
    outs2, _ = process_segments(hmt_pipeline(p, 16, 2), lm.model, p, ids, 16)
    assert not torch.allclose(outs2[1], outs[1])  # with memory the second segment changes


def test_hmt_steps_timed_and_untrained_said(lm, tmp_path, monkeypatch):
    monkeypatch.setenv("HETMEM_CACHE", str(tmp_path))
    rec = answer_contextual(lm, get_method("hmt", segment_tokens=32, memory_entries=4), "abc def " * 12, "q?", 3)
    for s in STEPS:
        assert rec["steps"][s]["calls"] >= 1
    assert rec["hmt"]["trained"] is False and "untrained" in rec["hmt"]["note"]


def test_hmt_training_lowers_loss_and_weights_roundtrip(lm, tmp_path):
    obj = HMTObjective(lm.model, segment_tokens=16, memory_entries=4)
    chunks = [torch.randint(3, 100, (1, 48)) for _ in range(2)]
    before = float(obj.chunk_loss(chunks[0]).detach())
    train(lm.model, obj, chunks[:1], chunks[1:], 8, lr=2e-2, progress=False)
    assert float(obj.chunk_loss(chunks[0])) < before
    save_gates(tmp_path, "hmt", obj.export(), obj.meta())
    loaded, meta = load_params(tmp_path, 64)
    for k, v in obj.export().items():
        assert torch.equal(loaded[k], v)
    assert meta["segment_tokens"] == 16
    rec = answer_contextual(lm, get_method("hmt", segment_tokens=16, hmt_weights=str(tmp_path)), "abc " * 10, "q?", 2)
    assert rec["hmt"]["trained"] is True


def _alignment(W, k, v):
    y = fw_apply(W, k)
    return float((y * v).sum(-1).mean()), float(F.cosine_similarity(y, v, dim=-1).mean())


def _check_update(k, v):
    m = get_method("lact", chunk_tokens=k.shape[1], rank=8)
    pipe = m.pipeline("cpu", StepTimer())
    memory = pipe.build((k, v))
    W0 = {n: memory.tensors[n].clone() for n in NAMES}
    dot0, cos0 = _alignment(W0, k, v)
    pipe.select(memory, None)
    dot1, cos1 = _alignment(memory.tensors, k, v)
    assert dot1 > dot0 and cos1 > cos0


def test_lact_gradient_matches_autograd():
    W = init_fast_weights(2, 16, 16, 4)
    k, v = torch.randn(2, 32, 16), torch.randn(2, 32, 16)
    g = fw_grads(W, fw_forward(W, k)[1], v)
    Wa = {n: t.clone().requires_grad_(True) for n, t in W.items()}
    fw_loss(fw_forward(Wa, k)[0], v).sum().backward()
    for n in NAMES:
        assert torch.allclose(Wa[n].grad, g[n], atol=1e-5)


def test_lact_update_aligns_random_kv():
    torch.manual_seed(0)
    _check_update(torch.randn(4, 256, 32), torch.randn(4, 256, 32))


def test_lact_steps_timed_over_chunks():
    m = get_method("lact", chunk_tokens=64, rank=4)
    timer = StepTimer()
    pipe = m.pipeline("cpu", timer)
    q = k = v = torch.randn(2, 200, 16)
    out, mem = m.process(pipe, k, v, q)
    assert out.shape == q.shape and mem.n_units == 4
    assert all(timer.summary()[s]["calls"] == 4 for s in STEPS)


def test_lact_refused_on_models(capsys, tmp_path):
    ctx = tmp_path / "c.txt"
    ctx.write_text("hello")
    code = hetmem_main(["run", "--method", "lact", "--model", "smollm2", "--context", str(ctx), "--question", "q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("hetmem: error: lact is not an answer-producing method") and "\n" not in err


def test_cli_memagent_json(tmp_path, capsys):
    from hetmem.testing import save_tiny_model_dir

    d = save_tiny_model_dir(tmp_path / "m", max_position_embeddings=4096)
    ctx = tmp_path / "c.txt"
    ctx.write_text("The pass key is 12345. " * 10)
    code = hetmem_main(["run", "--method", "memagent", "--model", str(d), "--context", str(ctx), "--question", "key?",
                        "--chunk-tokens", "700", "--memory-tokens", "8", "--max-new-tokens", "2", "--json"])
    rec = json.loads(capsys.readouterr().out)
    assert code == 0 and rec["method"] == "memagent" and rec["time_source"] == "measured"
    assert {"answer", "steps", "tokens", "llm_calls", "tokens_read", "tokens_written", "memory_after_chunk"} <= set(rec)


@pytest.mark.embedded
def test_lact_update_aligns_smollm2_kv():
    from hetmem.llm.models import load_model
    from hetmem.tasks.haystack import essay_text

    lm = load_model("smollm2")
    ids = lm.tokenizer(essay_text()[:4000], return_tensors="pt")["input_ids"][:, :256]
    cache, _ = prefill(lm.model, ids)
    layer = cache.layers[5]
    k, v = layer.buf_k[0, :, : layer.length], layer.buf_v[0, :, : layer.length]  # [H_kv, T, D] real K and V
    _check_update(k / k.norm(dim=-1, keepdim=True), v / v.norm(dim=-1, keepdim=True))


# -- profile and plan ----------------------------------------------------------------------------------------------
PROFILE_ARTIFACTS = ("profile.json", "summary.md", "overhead.png", "roofline.png", "trace.json")


@pytest.fixture()
def calibrated(tmp_path, monkeypatch):
    from hetmem.hw.calibrate import calibrate

    monkeypatch.setenv("HETMEM_CACHE", str(tmp_path / "cache"))
    calibrate("cpu", "float32", quick=True)  # the CLI reuses it


def test_profile_and_plan_contextual_methods_real_model(calibrated, tmp_path):
    from hetmem.testing import save_tiny_model_dir

    d = save_tiny_model_dir(tmp_path / "m", "llama", max_position_embeddings=1024, layers=2)
    out = tmp_path / "prof"
    # 1500 tokens is over the tiny model's 1024-token window: the contextual methods read it in bounded calls
    code = hetmem_main(["profile", "--methods", "memagent,hmt,lact", "--lengths", "200,1500", "--model", str(d),
                        "--out", str(out), "--no-progress", "--decode-tokens", "2", "--chunk-tokens", "900",
                        "--memory-tokens", "8", "--segment-tokens", "64", "--threads", str(torch.get_num_threads())])
    assert code == 0
    doc = json.loads((out / "profile.json").read_text())
    runs = {(r["method"], r["length"]): r for r in doc["runs"]}
    assert all(r["status"] == "ok" for r in runs.values()), [r["reason"] for r in runs.values()]
    for (m, L), r in runs.items():
        ph = r["phases"]["context"]
        assert ph["total_ms"] > 0 and 0 < ph["overhead"] <= ph["overhead_incl_apply"] <= 1
        assert m in ("lact",) or ph["llm_calls"] >= 2
    recs = {(r["method"], r["length"], r["step"]): r for r in doc["records"] if r["phase"] == "context"}
    for m in ("memagent", "hmt", "lact"):
        for s in STEPS + ("rest", "total"):
            assert recs[(m, 200, s)]["status"] == "ok" and recs[(m, 200, s)]["ms"] is not None
        for s in STEPS:
            assert recs[(m, 200, s)]["bytes_read"] > 0 and recs[(m, 200, s)]["calls"] >= 1  # counted
    assert recs[("memagent", 1500, "relevancy")]["calls"] > recs[("memagent", 200, "relevancy")]["calls"]
    assert recs[("lact", 200, "relevancy")]["calls"] == 2  # one chunk x 2 layers (one timed, scaled)
    for name in PROFILE_ARTIFACTS:
        assert (out / name).exists()
    summary = (out / "summary.md").read_text()
    assert "| memagent | 1500 | ok | context |" in summary and "chunk reads and memory writes" in summary
    # the planner takes the contextual workloads (per context token)
    pout = tmp_path / "plan"
    assert hetmem_main(["plan", "--profile", str(out / "profile.json"), "--out", str(pout)]) == 0
    plan = json.loads((pout / "plan.json").read_text())
    got = {(e["method"], e["size"]): e for e in plan["entries"]}
    assert {("memagent", 200), ("hmt", 200), ("lact", 200)} <= set(got)
    assert got[("lact", 200)]["unit"].startswith("per context token")


def test_profile_sweep_runs_lact_and_skips_model_methods(calibrated, tmp_path):
    out = tmp_path / "sweep"
    code = hetmem_main(["profile", "--methods", "lact,memagent", "--lengths", "4k", "--shape", "tiny", "--out", str(out),
                        "--no-progress", "--threads", str(torch.get_num_threads())])
    assert code == 0
    runs = {r["method"]: r for r in json.loads((out / "profile.json").read_text())["runs"]}
    assert runs["lact"]["status"] == "ok" and runs["lact"]["phases"]["context"]["tokens"] == 4096
    assert runs["memagent"]["status"] == "skipped" and "--model" in runs["memagent"]["reason"]
