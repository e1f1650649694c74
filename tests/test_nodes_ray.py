"""Memory nodes as Ray actors (one local Ray for the module): for every layout and 1, 2 and 3 nodes the
selections and greedy tokens equal the in-process run's; a node SIGKILLed mid-decode comes back and the
output does not change; an error on a node reaches the caller as one line."""

from __future__ import annotations

import os

import pytest
import torch

from hetmem.errors import HetmemError
from hetmem.llm.generate import generate
from hetmem.methods import get_method
from hetmem.testing import tiny_model

ray = pytest.importorskip("ray")

from hetmem.runtime.nodes.client import LAYOUTS, NodeMethod  # noqa: E402
from hetmem.runtime.nodes.cluster import NodeCluster  # noqa: E402

PROMPT, NEW = 300, 10
QUEST = dict(budget=48, page_size=8, dense_layers=0)


@pytest.fixture(scope="module")
def nodes():
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=5, include_dashboard=False, log_to_driver=False, configure_logging=False)
    cluster = NodeCluster(3, timeout_s=120)
    yield cluster
    cluster.close()
    ray.shutdown()


@pytest.fixture(scope="module")
def model():
    return tiny_model(layers=2, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def prompt():
    torch.manual_seed(1)
    return torch.randint(3, 100, (1, PROMPT))


class Recorder:
    """The method, with each Retrieval's selection kept (and an optional action at the n-th one)."""

    def __init__(self, method, at=None, action=None):
        self._m, self.selections, self.at, self.action = method, [], at, action

    def __getattr__(self, name):
        return getattr(self._m, name)

    def pipeline(self, device, timer, layer_idx=0):
        p = self._m.pipeline(device, timer, layer_idx=layer_idx)
        if p.retrieval is not None:
            inner, rec = p.retrieval, self

            class Rec:
                kind, device, name = inner.kind, inner.device, inner.name

                def select(self, scores, memory):
                    sel = inner.select(scores, memory)
                    rec.selections.append(sel.indices.clone())
                    if rec.at is not None and len(rec.selections) == rec.at:
                        rec.action()
                    return sel

            p.retrieval = Rec()
        return p


def reference(model, prompt, name, params):
    rec = Recorder(get_method(name, **params))
    res = generate(model, prompt, rec, NEW, progress=False, prefill_chunk=128)
    return res.token_ids, rec.selections


def on_nodes(model, prompt, cluster, layout, name, params, rounds=1, **kw):
    rec = Recorder(get_method(name, **params), **kw)
    nm = NodeMethod(rec, cluster, layout, rounds=rounds)
    res = generate(model, prompt, nm, NEW, progress=False, prefill_chunk=128)
    nm.close_session()
    return res.token_ids, rec.selections


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_every_layout_matches_in_process(nodes, model, prompt, n):
    tokens, sels = reference(model, prompt, "quest", QUEST)
    assert len(sels) == 2 * (NEW - 1)
    sub = NodeCluster(n, actors=nodes.actors)  # the first n of the module's nodes
    try:
        for layout, rounds in [(lay, 1) for lay in LAYOUTS] + [("attention", 2)]:
            t, s = on_nodes(model, prompt, sub, layout, "quest", QUEST, rounds=rounds)
            assert same(s, sels), (n, layout, rounds)
            assert t == tokens, (n, layout, rounds)
        # every node held a shard and answered: bytes went both ways on each
        moved = {tr["node"] for tr in sub.ledger.transfers() if tr["direction"] == "node->head" and tr["bytes"]}
        assert moved == set(range(n))
    finally:
        sub.close()


def test_seer_top_k_on_two_nodes(nodes, model, prompt):
    params = dict(budget=32, page_size=8)
    tokens, sels = reference(model, prompt, "seer", params)
    sub = NodeCluster(2, actors=nodes.actors)
    try:
        t, s = on_nodes(model, prompt, sub, "attention", "seer", params)
    finally:
        sub.close()
    assert same(s, sels) and t == tokens


def test_node_killed_mid_decode_changes_nothing(model, prompt):
    """A fresh pair of nodes (the module's nodes stay untouched; the fixture's Ray has 2 spare CPUs for them).
    Node 1 is SIGKILLed after the 7th decode selection, once in the attention layout and once in the kv layout;
    its channel closes, Ray restarts it, the head re-hydrates it and opens the channel again, the output is
    unchanged."""
    tokens, sels = reference(model, prompt, "quest", QUEST)
    cluster = NodeCluster(2, timeout_s=120)
    try:
        for k, layout in enumerate(["attention", "kv"]):
            before = list(cluster.pids)
            t, s = on_nodes(model, prompt, cluster, layout, "quest", QUEST, at=7, action=lambda: cluster.kill(1))
            assert cluster.restarts == k + 1 and cluster.pids[1] != before[1]
            assert same(s, sels) and t == tokens, layout
        assert cluster.record()["transport"] == "socket" and cluster.record()["fallback"] is None
    finally:
        cluster.close()


@pytest.mark.parametrize("transport", ["compiled", "plain"])
def test_ray_transports_match_the_socket_channel(nodes, model, prompt, transport):
    """The compiled graph and plain actor calls (the transports the benchmark compares with the default socket
    channel) carry the same batches: same selections and tokens."""
    tokens, sels = reference(model, prompt, "quest", QUEST)
    sub = NodeCluster(2, actors=nodes.actors, transport=transport)
    try:
        t, s = on_nodes(model, prompt, sub, "attention", "quest", QUEST)
        assert sub.record()["transport"] == transport
    finally:
        sub.release_graph()
        sub.close()
    assert same(s, sels) and t == tokens


def test_a_node_error_is_one_line(nodes):
    sub = NodeCluster(1, actors=nodes.actors, timeout_s=30)
    try:
        with pytest.raises(HetmemError) as e:
            sub.call([[{"op": "score", "cache": "nope", "layer": 0}]], phase="decode", step="relevancy")
        assert "\n" not in str(e.value) and "KeyError" in str(e.value)
    finally:
        sub.close()


@pytest.mark.embedded
def test_smollm2_through_two_nodes(nodes):
    from hetmem.llm.models import load_model

    lm = load_model("smollm2")
    ids = lm.tokenizer("The passkey is 73914. " + "Grass is green and the sky is blue. " * 60
                       + "What is the passkey? The passkey is", return_tensors="pt").input_ids
    params = dict(budget=128)
    want = generate(lm.model, ids, get_method("quest", **params), 6, progress=False).token_ids
    sub = NodeCluster(2, actors=nodes.actors)
    try:
        nm = NodeMethod(get_method("quest", **params), sub, "attention")
        got = generate(lm.model, ids, nm, 6, progress=False).token_ids
        nm.close_session()
    finally:
        sub.close()
    assert got == want


def test_planned_schedule_runs_its_layout_on_nodes(nodes, tmp_path, capsys):
    """A host+memnode schedule (as hetmem plan --system host+memnode writes it) runs through --placement: the rule
    for the prompt's size picks the layout and the node count; the answer is the in-process one."""
    import json

    from hetmem.cli import main
    from hetmem.testing import save_tiny_model_dir

    model = save_tiny_model_dir(tmp_path / "m", "llama", max_position_embeddings=512)
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("Alpha beta gamma delta. The code word is kiwi. " * 6, encoding="utf-8")
    sch = {"schema": "hetmem.schedule/1", "system": "host+memnode", "rules": {"quest": [
        {"max_size": 100, "devices": {"prepare": "nodes"}, "layout": "index", "memory_nodes": 1},
        {"max_size": None, "devices": {"prepare": "nodes", "relevancy": "nodes", "apply": "nodes"},
         "layout": "attention", "memory_nodes": 1, "predicted_latency_us": 1.0}]}}
    (tmp_path / "schedule.json").write_text(json.dumps(sch))
    base = ["run", "--method", "quest", "--budget", "64", "--page-size", "8", "--dense-layers", "0", "--model",
            str(model), "--context", str(ctx), "--question", "What?", "--max-new-tokens", "3", "--json"]
    capsys.readouterr()
    assert main(base) == 0
    want = json.loads(capsys.readouterr().out)
    assert main(base + ["--placement", str(tmp_path / "schedule.json")]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["answer"] == want["answer"]
    assert got["placement_rule"]["layout"] == "attention" and got["memory_nodes"]["n"] == 1
    assert got["memory_nodes"]["layout"] == "attention" and got["steps"]["apply"]["ran_on"] == ["node0"]


def test_split_budget_one_round(nodes, model, prompt, monkeypatch):
    """Split budget: one node selecting the whole budget is the exact selection (tokens identical); with 2 and 3
    nodes each step's selection holds each node's share, the sink and the recent pages, in one call per layer."""
    from hetmem.runtime.nodes import client

    tokens, sels = reference(model, prompt, "quest", QUEST)
    m = get_method("quest", **QUEST)
    inner = client.SplitRetrieval.select
    for n in (1, 2, 3):
        sub = NodeCluster(n, actors=nodes.actors)
        try:
            rec = Recorder(get_method("quest", **QUEST))

            def select(self, scores, memory, _rec=rec):
                sel = inner(self, scores, memory)
                _rec.selections.append(sel.indices.clone())
                return sel

            monkeypatch.setattr(client.SplitRetrieval, "select", select)
            nm = NodeMethod(rec, sub, "attention", split_budget=True)
            res = generate(model, prompt, nm, NEW, progress=False, prefill_chunk=128)
            nm.close_session()
            dec = sub.ledger.summary()["decode"]
        finally:
            sub.close()
        if n == 1:
            assert same(rec.selections, sels) and res.token_ids == tokens
        assert dec["calls"] == 2 * (NEW - 1)  # one call per sparse layer per decode step (exact mode: two)
        for s in rec.selections:
            pages = s.max().item() + 1
            assert s.shape[-1] == m.budget_pages
            for i, b in enumerate(client.node_budgets(m.budget_pages, n)):
                assert bool(((s % n) == i).sum(-1).eq(b).all())
            assert bool((s == 0).any(-1).all()) and bool((s == pages - 1).any(-1).all())  # sink and recent kept
    with pytest.raises(HetmemError, match="--split-budget runs with --layout attention"):
        NodeMethod(get_method("quest", **QUEST), nodes, "kv", split_budget=True)


def test_split_budget_record_reports_both_recalls(nodes, tmp_path):
    from hetmem.llm.models import load_model
    from hetmem.runtime.nodes.run import answer_on_nodes
    from hetmem.testing import save_tiny_model_dir

    lm = load_model(str(save_tiny_model_dir(tmp_path / "m", "llama", max_position_embeddings=1024)))
    ctx = "Alpha beta gamma delta. The code word is kiwi. " * 8
    recs = {}
    for n in (1, 2):
        sub = NodeCluster(n, actors=nodes.actors)
        try:
            recs[n] = answer_on_nodes(lm, get_method("quest", **QUEST), ctx, "What?", n_nodes=n, layout="attention",
                                      max_new_tokens=4, progress=False, cluster=sub, split_budget=True, recall=True)
        finally:
            sub.close()
    for n, r in recs.items():
        split, exact = r["recall"]["attention_mass_recall"], r["recall_exact"]["attention_mass_recall"]
        assert 0 < split <= 1.0 + 1e-6 and 0 < exact <= 1.0 + 1e-6
        assert r["memory_nodes"]["split_budget"] and r["measurement_ms"]["recall_exact"] >= 0
    assert recs[1]["recall"]["recall_per_layer"] == recs[1]["recall_exact"]["recall_per_layer"]  # 1 node: exact


def test_single_round_attention_makes_one_call_per_layer(nodes, model, prompt):
    """The default attention layout: the decode step's only call per layer carries the scores and the candidate
    pages' partials (no 'apply' round trip), and the result is the in-process one (checked above)."""
    sub = NodeCluster(2, actors=nodes.actors)
    try:
        on_nodes(model, prompt, sub, "attention", "quest", QUEST)
        rows = [t for t in sub.ledger.transfers() if t["phase"] == "decode" and t["direction"] == "head->node"]
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) >= 2:  # each local node pinned to a core of its own, every thread of it
            assert sub.record()["pinned_cores"] == {"node0": cpus[0], "node1": cpus[1]}
            for i, pid in enumerate(sub.pids):
                assert all(os.sched_getaffinity(int(t)) == {cpus[i]} for t in os.listdir(f"/proc/{pid}/task"))
    finally:
        sub.close()
    assert {t["step"] for t in rows} == {"relevancy"}
    assert {(t["node"], t["layer"]): t["calls"] for t in rows} == {(i, j): NEW - 1 for i in range(2) for j in range(2)}


def test_batch_engine_on_nodes_batches_sequences(nodes, model):
    """The serving engine with memory nodes: eight sequences (quest at three budgets, one in the two-round
    mode's engine below, and dense in-process) decode together; each sequence's greedy tokens equal its
    in-process ``generate``, and a decode step makes ONE call per layer per node for all the node-backed
    sequences (calls per layer = engine steps, fewer than the sequences' decode tokens)."""
    from hetmem.runtime.batch_engine import BatchEngine
    from hetmem.runtime.engine_api import GenRequest, Sampling
    from hetmem.testing import char_tokenizer

    from test_batch_engine import Collector

    g = torch.Generator().manual_seed(5)
    specs = [("quest", dict(QUEST, budget=b)) for b in (32, 48, 64)] * 2 + [("dense", {})] * 2
    prompts = [torch.randint(3, 100, (150 + 17 * i,), generator=g).tolist() for i in range(len(specs))]
    refs = [generate(model, torch.tensor([p]), get_method(n, **kw), 6, progress=False, eos_token_ids={127}).token_ids
            for p, (n, kw) in zip(prompts, specs)]
    for rounds in (1, 2):
        sub = NodeCluster(2, actors=nodes.actors)
        eng = BatchEngine(model, char_tokenizer(), model_name="tiny", max_batch=8, pool_tokens=8 * 512,
                          prefill_chunk=512, eos_token_ids={127}, cluster=sub, rounds=rounds)
        try:
            c = Collector()
            reqs = [GenRequest(f"r{i}", p, n, kw, Sampling(max_tokens=6)) for i, (p, (n, kw)) in
                    enumerate(zip(prompts, specs))]
            for r in reqs:
                eng.submit(r, c)
            got = c.wait([r.request_id for r in reqs])
            for r, ref in zip(reqs, refs):
                assert got[r.request_id]["error"] is None, got[r.request_id]["error"]
                assert got[r.request_id]["ids"] == ref, (rounds, r.method, r.params)
            eng.close()  # (its step count is final once its loop stopped)
            steps = eng.stats()["steps"]
            calls = {}
            for t in sub.ledger.transfers():
                if t["phase"] == "decode" and t["direction"] == "head->node" and t["step"] == "relevancy":
                    calls[(t["node"], t["layer"])] = t["calls"]
        finally:
            eng.close()
            sub.close()
        assert set(calls) == {(i, j) for i in range(2) for j in range(2)}
        node_tokens = 6 * 5  # six quest sequences, 5 decode steps each after the prefill's token
        assert all(n <= steps < node_tokens for n in calls.values()), (rounds, calls, steps)


def test_batch_engine_node_killed_mid_batch_changes_nothing(model):
    """A node SIGKILLed while the batch engine decodes four node-backed sequences together: Ray restarts it,
    the head re-hydrates every live sequence's shard, and every sequence's tokens are unchanged."""
    from hetmem.runtime.batch_engine import BatchEngine
    from hetmem.runtime.engine_api import GenRequest, Sampling
    from hetmem.testing import char_tokenizer

    from test_batch_engine import Collector

    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, 100, (160 + 23 * i,), generator=g).tolist() for i in range(4)]
    refs = [generate(model, torch.tensor([p]), get_method("quest", **QUEST), 8, progress=False,
                     eos_token_ids={127}).token_ids for p in prompts]
    cluster = NodeCluster(2, timeout_s=120)
    eng = BatchEngine(model, char_tokenizer(), model_name="tiny", max_batch=4, pool_tokens=4 * 512,
                      prefill_chunk=512, eos_token_ids={127}, cluster=cluster)
    try:
        c = Collector()
        reqs = [GenRequest(f"k{i}", p, "quest", QUEST, Sampling(max_tokens=8)) for i, p in enumerate(prompts)]
        for r in reqs:
            eng.submit(r, c)
        with c.cv:
            assert c.cv.wait_for(lambda: all(len(c.res.get(r.request_id, {}).get("ids", ())) >= 3 for r in reqs), 60)
        cluster.kill(1)
        got = c.wait([r.request_id for r in reqs])
        assert cluster.restarts == 1
        for r, ref in zip(reqs, refs):
            assert got[r.request_id]["error"] is None and got[r.request_id]["ids"] == ref
    finally:
        eng.close()
        cluster.close()


def test_single_round_falls_back_to_a_second_round_when_a_node_lacks_a_partial(nodes, model, prompt, monkeypatch):
    """Each node attends only its best few candidates (client.ATTEND_SLACK); when the global selection takes a
    page a node did not attend, that step asks for a second round: selections and tokens stay the in-process
    ones, and the record counts the second rounds."""
    import hetmem.runtime.nodes.client as client

    tokens, sels = reference(model, prompt, "quest", QUEST)
    monkeypatch.setattr(client, "ATTEND_SLACK", 0.01)  # one candidate per node: most steps need the second round
    sub = NodeCluster(2, actors=nodes.actors)
    try:
        rec = Recorder(get_method("quest", **QUEST))
        nm = NodeMethod(rec, sub, "attention")
        res = generate(model, prompt, nm, NEW, progress=False, prefill_chunk=128)
        nm.close_session()
        steps = {t["step"] for t in sub.ledger.transfers() if t["phase"] == "decode"}
    finally:
        sub.close()
    assert same(rec.selections, sels) and res.token_ids == tokens
    assert nm.second_rounds > 0 and steps == {"relevancy", "apply"}
