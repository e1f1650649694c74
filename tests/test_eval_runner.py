"""The eval sweep on a tiny random model: the shared prefill answers exactly as a fresh prefill per method,
resume runs only what is missing, and ``hetmem eval`` writes every artifact."""

from __future__ import annotations

import json

import pytest
import torch

from hetmem.cli import main
from hetmem.errors import HetmemError
from hetmem.eval.runner import EvalPlan, Sweep
from hetmem.eval.spec import parse_budget, parse_method
from hetmem.llm.generate import generate, prefill_once
from hetmem.llm.models import LoadedModel
from hetmem.methods import get_method
from hetmem.testing import char_tokenizer, save_tiny_model_dir, tiny_model

# Every in-model family: dense, sparse attention (page, block, token, oracle), compressed KV (decode-time
# eviction, prefill-observing eviction, quantised cache). Small pages so 1/4 of a tiny prompt is several pages.
METHODS = ["dense", "quest:page_size=8:dense_layers=0", "seer:page_size=8", "dsa:recent=8", "oracle", "streaming",
           "snapkv:window=8", "h2o", "kvquant:group_size=8"]
OWN_PREFILL = {"h2o", "kvquant:group_size=8", "snapkv:window=8"}


@pytest.fixture(scope="module")
def lm():
    return LoadedModel("tiny-qwen2", tiny_model("qwen2", layers=3, max_position_embeddings=1024), char_tokenizer(), 1024)


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _plan(methods, samples=1, budgets=("1/4",), share=True, tasks=("niah-single",)):
    return EvalPlan(list(tasks), [("300", 300)], [parse_method(m) for m in methods],
                    [parse_budget(b) for b in budgets], samples, share_prefill=share)


def test_shared_prefill_answers_as_a_fresh_prefill(lm, tmp_path):
    shared, fresh = tmp_path / "shared", tmp_path / "fresh"
    for d, share in ((shared, True), (fresh, False)):
        d.mkdir()
        Sweep(_plan(METHODS, share=share), lm, d, progress=False).run()
    a = {x["method"]: x for x in _lines(shared / "results.jsonl")}
    b = {x["method"]: x for x in _lines(fresh / "results.jsonl")}
    assert set(a) == set(b) == set(METHODS)
    for m in METHODS:
        assert a[m]["status"] == b[m]["status"] == "ok", (a[m].get("reason"), b[m].get("reason"))
        assert a[m]["answer"] == b[m]["answer"], m
        assert a[m]["kv_bytes"] == b[m]["kv_bytes"], m
        assert a[m]["attention_mass_recall"] == pytest.approx(b[m]["attention_mass_recall"]) \
            if b[m]["attention_mass_recall"] is not None else a[m]["attention_mass_recall"] is None
        assert b[m]["prefill"] == "own"
        assert a[m]["prefill"] == ("own" if m in OWN_PREFILL else "shared"), m
    # one prefill per context: every shared line reports the same measured prefill
    assert len({a[m]["prefill_ms"] for m in METHODS if m not in OWN_PREFILL}) == 1
    assert "observes every prefill chunk" in a["h2o"]["prefill_note"]
    # snapkv keeps the last `window` prefill queries across chunks (so a short last chunk needs the one before):
    # it cannot replay only the last chunk, and takes its own prefill
    assert "observes every prefill chunk" in a["snapkv:window=8"]["prefill_note"] and a["dense"]["shared_prefill"] == "copy"
    assert "own KV cache layer" in a["kvquant:group_size=8"]["prefill_note"]
    assert a["oracle"]["attention_mass_recall"] == pytest.approx(1.0)
    assert 0 < a["seer:page_size=8"]["attention_mass_recall"] <= 1.0


@pytest.mark.parametrize("name,kw", [("quest", {"budget": 64, "page_size": 8, "dense_layers": 0}),
                                     ("seer", {"budget": 64, "page_size": 8}), ("dsa", {"budget": 64}),
                                     ("streaming", {"budget": 64})])
def test_shared_prefill_logits_match_chunked_fresh_prefill(lm, name, kw):
    """Prepare over the copied KV as one span equals Prepare run per prefill chunk (64-token chunks here)."""
    ids = torch.randint(3, 100, (1, 300), generator=torch.Generator().manual_seed(1))
    fresh = generate(lm.model, ids, get_method(name, **kw), 10, progress=False, keep_logits=True, prefill_chunk=64)
    p = prefill_once(lm.model, ids, prefill_chunk=64, keep_hidden=True, progress=False)
    shared = generate(lm.model, ids, get_method(name, **kw), 10, progress=False, keep_logits=True, prefilled=p)
    assert shared.token_ids == fresh.token_ids
    for x, y in zip(shared.logits, fresh.logits):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    assert shared.shared_prefill_ms == p.prefill_ms and shared.prefill_ms < p.prefill_ms


def test_generate_refuses_what_cannot_share(lm):
    ids = torch.randint(3, 100, (1, 100), generator=torch.Generator().manual_seed(2))
    p = prefill_once(lm.model, ids, progress=False)
    for name in ("h2o", "snapkv"):  # their Prepare learns from prefill queries across chunks
        with pytest.raises(HetmemError, match="observes every prefill chunk's queries"):
            generate(lm.model, ids, get_method(name, budget=40), 4, progress=False, prefilled=p)
    with pytest.raises(HetmemError, match="needs the prefill's attention inputs"):
        generate(lm.model, ids, get_method("dsa", budget=40), 4, progress=False, prefilled=p)
    with pytest.raises(HetmemError, match="other input ids"):
        generate(lm.model, ids[:, :-1], get_method("dense"), 4, progress=False, prefilled=p)


def test_resume_skips_finished_lines(lm, tmp_path):
    plan = _plan(["dense", "quest:page_size=8:dense_layers=0"], samples=2, budgets=("1/4", "1/2"))
    first = Sweep(plan, lm, tmp_path, progress=False)
    assert first.run() == 6  # 2 samples x (dense + quest at 2 budgets)
    path = tmp_path / "results.jsonl"
    done = path.read_text()
    again = Sweep(plan, lm, tmp_path, progress=False)
    assert again.pending() == 0 and again.run() == 0
    assert path.read_text() == done  # nothing re-run, nothing rewritten
    # an interrupted sweep: the last line lost, the one before torn in the middle of its write
    lines = done.splitlines(keepends=True)
    path.write_text("".join(lines[:-2]) + lines[-2][: len(lines[-2]) // 2])
    third = Sweep(plan, lm, tmp_path, progress=False)
    assert third.pending() == 2
    assert third.run() == 2
    now = _lines(path)
    assert len(now) == 6 and len({(x["sample"], x["method"], x["budget"]) for x in now}) == 6
    assert [x["run_id"] for x in now[:4]] == [first.run_id] * 4 and {x["run_id"] for x in now[4:]} == {third.run_id}
    assert now[:4] == [json.loads(x) for x in lines[:4]]


def test_line_that_cannot_run_is_skipped_with_its_reason(lm, tmp_path):
    plan = _plan(["quest:page_size=64", "kvquant:group_size=32"], budgets=("1/8",))
    Sweep(plan, lm, tmp_path, progress=False).run()
    by = {x["method"]: x for x in _lines(tmp_path / "results.jsonl")}
    assert by["quest:page_size=64"]["status"] == "skipped"
    assert "smaller than one page" in by["quest:page_size=64"]["reason"]
    assert by["kvquant:group_size=32"]["status"] == "skipped"
    assert "does not divide the model's cached value dim" in by["kvquant:group_size=32"]["reason"]


def test_rag_method_uses_the_context_as_corpus(lm, tmp_path):
    Sweep(_plan(["rag-bm25:passage_tokens=16:passage_overlap=0:top_k=2"]), lm, tmp_path, progress=False).run()
    (x,) = _lines(tmp_path / "results.jsonl")
    assert x["status"] == "ok" and x["prefill"] == "rag" and x["budget"] == "-"
    assert x["passages"] >= 3 and x["rag_prompt_tokens"] > 0  # the context was split into passages, 2 retrieved


def test_cli_writes_every_artifact_and_resumes(tmp_path, capsys):
    model = save_tiny_model_dir(tmp_path / "model", "qwen2", layers=3, max_position_embeddings=1024)
    out = tmp_path / "eval"
    argv = ["eval", "--tasks", "niah-grid,vt", "--lengths", "200,300", "--methods",
            "dense,quest:page_size=8:dense_layers=0,snapkv:window=8", "--budgets", "1/2,1/4", "--samples", "2",
            "--model", str(model), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["accuracy_vs_budget.png", "niah_grid.png", "recall_vs_accuracy.png", "results.jsonl",
                     "runs.jsonl", "summary.md"]
    lines = _lines(out / "results.jsonl")
    assert len(lines) == 2 * 2 * 2 * 5
    run = _lines(out / "runs.jsonl")[0]
    assert run["command"].startswith("hetmem eval") or run["command"].startswith("hetmem")
    assert {"commit", "date", "cpu", "threads"} <= set(run)
    summary = (out / "summary.md").read_text()
    assert "| niah-grid | 200 | quest:page_size=8:dense_layers=0 | 1/2 |" in summary
    assert "95% CI" in summary and "One prefill per context" in summary
    capsys.readouterr()
    assert main(argv) == 0  # everything done: no model load, the report is rewritten
    err = capsys.readouterr().err
    assert "40 already in" in err and "loaded" not in err
    assert main(argv + ["--seed", "3"]) == 2  # another seed into the same results
    assert "with --seed 0" in capsys.readouterr().err


def test_every_registered_method_runs_through_the_same_interface(lm, tmp_path):
    """Every method in the registry, at its defaults, gets a line: answered, or skipped with its reason (kvquant's
    default group of 32 does not divide the tiny model's head dim of 16)."""
    from hetmem.methods import REGISTRY

    Sweep(_plan(sorted(REGISTRY)), lm, tmp_path, progress=False).run()
    by = {x["method"]: x for x in _lines(tmp_path / "results.jsonl")}
    assert set(by) == set(REGISTRY)
    for name, x in by.items():
        assert x["status"] == "ok" or x["reason"], name
    # kvquant's default group does not divide the tiny head dim; lact refuses models without a fast-weight layer;
    # memagent's default chunk cannot hold its prompt plus memory on this tiny window
    assert {n for n, x in by.items() if x["status"] != "ok"} <= {"kvquant", "lact", "memagent"}
