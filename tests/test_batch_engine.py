"""The page pool and the continuous-batching engine (issue 10, part A), on tiny random-weight models."""

from __future__ import annotations

import threading

import pytest
import torch

from hetmem.errors import HetmemError
from hetmem.llm import attention
from hetmem.llm.generate import generate
from hetmem.llm.page_pool import PagePool, PooledLayer, PoolExhausted
from hetmem.methods import get_method
from hetmem.runtime.batch_engine import BatchEngine, PooledCache, PooledRuntime
from hetmem.runtime.engine_api import GenRequest, Sampling
from hetmem.testing import char_tokenizer, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(layers=2)


@pytest.fixture(scope="module")
def engine(model):
    eng = BatchEngine(model, char_tokenizer(), model_name="tiny", max_batch=16, pool_tokens=16 * 512,
                      prefill_chunk=96, eos_token_ids={127})  # random weights: no early EOS
    yield eng
    eng.close()


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 100, (n,), generator=g).tolist()


class Collector:
    """Token events per request; ``wait()`` until every submitted request has finished."""

    def __init__(self):
        self.res: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.cv = threading.Condition(self.lock)

    def __call__(self, ev):
        with self.cv:
            r = self.res.setdefault(ev.request_id, {"ids": [], "text": "", "finish": None})
            if ev.token_id is not None:
                r["ids"].append(ev.token_id)
            r["text"] += ev.text
            if ev.finish_reason:
                r.update(finish=ev.finish_reason, error=ev.error, usage=ev.usage, report=ev.report)
            self.cv.notify_all()

    def tokens(self, rid: str) -> int:
        with self.lock:
            return len(self.res.get(rid, {}).get("ids", ()))

    def wait(self, rids, timeout: float = 120.0) -> dict:
        with self.cv:
            ok = self.cv.wait_for(lambda: all(self.res.get(r, {}).get("finish") for r in rids), timeout)
        assert ok, "requests did not finish"
        return {r: self.res[r] for r in rids}


def run_alone(engine, req: GenRequest) -> dict:
    c = Collector()
    engine.submit(req, c)
    return c.wait([req.request_id])[req.request_id]


# -- the pool ----------------------------------------------------------------------------------------------
def test_pool_alloc_free_reuse():
    pool = PagePool(8, 4, kv_heads=2, key_dim=3, value_dim=3)
    a = PooledLayer(pool, 4, None, capacity=12)
    b = PooledLayer(pool, 4, None, capacity=12)
    ka = torch.randn(1, 2, 10, 3)
    a.write(ka, ka + 1)
    kb = torch.randn(1, 2, 5, 3)
    b.write(kb, kb + 1)
    assert a.blocks == [0, 1, 2] and b.blocks == [3, 4] and pool.n_free == 3
    assert torch.equal(a.gather(0, 10)[0], ka) and torch.equal(b.gather(0, 5)[1], kb + 1)
    a.release()
    assert pool.n_free == 6 and a.blocks == []
    c = PooledLayer(pool, 4, None, capacity=12)
    kc = torch.randn(1, 2, 9, 3)
    c.write(kc, kc)
    assert sorted(c.blocks) == [0, 1, 2]  # a's pages, reused
    assert torch.equal(b.gather(0, 5)[0], kb)  # b untouched by a leaving and c joining
    assert torch.equal(c.buf_k[:, :, :9], kc)  # the staged logical copy
    b.write(kb[:, :, :1], kb[:, :, :1])  # b's 6th token: its second page still has room
    assert b.blocks == [3, 4]
    with pytest.raises(PoolExhausted):
        PooledLayer(pool, 4, None, capacity=64).write(torch.randn(1, 2, 40, 3), torch.randn(1, 2, 40, 3))


def test_compact_gives_pages_back():
    pool = PagePool(8, 4, kv_heads=1, key_dim=2, value_dim=2)
    a = PooledLayer(pool, 4, None, capacity=32)
    k = torch.arange(20.0).reshape(1, 1, 10, 2)
    a.write(k, k)
    keep = torch.tensor([[[0, 1, 8, 9]]])
    a.compact(keep)
    assert a.length == 4 and len(a.blocks) == 1 and pool.n_free == 7
    assert torch.equal(a.gather(0, 4)[0], k[:, :, [0, 1, 8, 9]])


# -- the pooled cache computes what PagedKVCache computes ----------------------------------------------------------
def _pooled_logits(model, ids: list[int], method, steps: int) -> list[torch.Tensor]:
    """Greedy decode through a PooledCache (B=1): the logits of every step."""
    attention.install(model)
    from hetmem.core.timer import StepTimer

    method.bind(model)
    timer = StepTimer()
    n_layers = model.config.num_hidden_layers
    pools = [PagePool(64, 16, 2, 16, 16) for _ in range(n_layers)]
    views = [PooledLayer(pools[i], getattr(method, "page_size", 16), method.pipeline("cpu", timer, layer_idx=i),
                         len(ids) + steps) for i in range(n_layers)]
    cache = PooledCache(views)
    rt = PooledRuntime(cache, "cpu")
    out = []
    with torch.inference_mode(), rt.activate():
        rt.prefill = True
        logits = model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True).logits[:, -1]
        rt.prefill = False
        for _ in range(steps):
            out.append(logits.float())
            nxt = logits.argmax(-1).view(1, 1)
            logits = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits[:, -1]
    return out, timer


@pytest.mark.parametrize("name,params", [("dense", {}), ("quest", {"budget": 48, "page_size": 16, "dense_layers": 0})])
def test_pooled_cache_matches_paged_cache(model, name, params):
    ids = _prompt(150, 3)
    ref = generate(model, torch.tensor([ids]), get_method(name, **params), 8, progress=False, keep_logits=True)
    got, timer = _pooled_logits(model, ids, get_method(name, **params), 8)
    for a, b in zip(ref.logits, got):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
    if name == "quest":  # the budget really selects: 3 of 10+ pages
        assert timer.phase_calls("relevancy", "prefill") + timer.phase_calls("relevancy", "decode") > 0


# -- the engine ------------------------------------------------------------------------------------------------
MIXED = [
    ("dense", {}),
    ("quest", {"budget": 64, "dense_layers": 0}),
    ("quest", {"budget": 32, "page_size": 8, "dense_layers": 1}),
    ("streaming", {"budget": 48, "sink": 4}),
    ("oracle", {"budget": 40}),
    ("seer", {"budget": 64}),
    ("dsa", {"budget": 48}),
    ("quest", {"budget": 128, "dense_layers": 0}),
]


def _mixed_requests(n: int = 16) -> list[GenRequest]:
    reqs = []
    for i in range(n):
        name, params = MIXED[i % len(MIXED)]
        reqs.append(GenRequest(f"r{i}", _prompt(40 + 23 * i, 100 + i), name, dict(params),
                               Sampling(max_tokens=12 + (i % 5))))
    return reqs


def test_greedy_identical_alone_and_in_a_batch_of_16_mixed_methods(engine):
    reqs = _mixed_requests(16)
    alone = {r.request_id: run_alone(engine, r)["ids"] for r in reqs}
    c = Collector()
    for wave in (reqs[:5], reqs[5:11], reqs[11:]):  # later waves join while the earlier ones decode
        for r in wave:
            engine.submit(r, c)
        first = wave[0].request_id
        with c.cv:
            c.cv.wait_for(lambda: len(c.res.get(first, {}).get("ids", ())) >= 2, 60)
    got = c.wait([r.request_id for r in reqs])
    for r in reqs:
        assert got[r.request_id]["error"] is None, got[r.request_id]["error"]
        assert got[r.request_id]["ids"] == alone[r.request_id], (r.method, r.params)
        assert len(alone[r.request_id]) == r.sampling.max_tokens
    st = engine.stats()
    assert st["pool_free_pages"] == st["pool_pages"] and st["running"] == 0 and st["queue_depth"] == 0
    assert engine._committed == 0
    assert {s["method"] for s in st["step_ms"]} >= {"dense", "quest", "seer", "streaming"}


def test_engine_matches_generate(engine, model):
    ids = _prompt(120, 9)
    for name, params in [("dense", {}), ("quest", {"budget": 48, "dense_layers": 0})]:
        ref = generate(model, torch.tensor([ids]), get_method(name, **params), 10, progress=False, eos_token_ids={127})
        got = run_alone(engine, GenRequest("g", ids, name, params, Sampling(max_tokens=10)))
        assert got["ids"] == ref.token_ids
        assert got["usage"] == {"prompt_tokens": 120, "completion_tokens": len(ref.token_ids)}
        assert got["report"]["method"] == name and got["report"]["steps"]["apply"]["calls"] > 0


def test_seeded_sampling_identical_alone_and_batched(engine):
    s = Sampling(max_tokens=16, temperature=0.9, top_p=0.9, seed=1234)
    reqs = [GenRequest(f"s{i}", _prompt(60 + 9 * i, 7 + i), ("quest" if i % 2 else "dense"),
                       {"budget": 32, "dense_layers": 0} if i % 2 else {}, s) for i in range(6)]
    alone = {r.request_id: run_alone(engine, r)["ids"] for r in reqs[:2]}
    c = Collector()
    for r in reqs:
        engine.submit(r, c)
    got = c.wait([r.request_id for r in reqs])
    for rid, ids in alone.items():
        assert got[rid]["ids"] == ids
    again = run_alone(engine, GenRequest("x", reqs[0].prompt_ids, "dense", {}, Sampling(max_tokens=16, temperature=0.9,
                                                                                            top_p=0.9, seed=99)))
    assert again["ids"] != alone["s0"]  # another seed, another sample


def test_stop_strings_are_cut(engine):
    ids = _prompt(50, 21)
    full = run_alone(engine, GenRequest("f", ids, sampling=Sampling(max_tokens=20)))
    text = full["text"]
    assert full["finish"] in ("length", "stop") and len(text) >= 6
    stop = text[3:5]
    cut = text.find(stop)
    got = run_alone(engine, GenRequest("t", ids, sampling=Sampling(max_tokens=20, stop=("@@@@", stop))))
    assert got["finish"] == "stop" and got["text"] == text[:cut]


def test_refusals_in_one_line(engine):
    for name, params, match in [("h2o", {}, "observes prefill"), ("kvquant", {}, "own KV cache"),
                                ("nosuch", {}, "nosuch"), ("quest", {"budget": 0}, "budget")]:
        with pytest.raises(HetmemError, match=match):
            engine.submit(GenRequest("e", [5, 6, 7], name, params), lambda ev: None)
    with pytest.raises(HetmemError, match="over the window"):
        engine.submit(GenRequest("w", [5] * 600), lambda ev: None)
    with pytest.raises(HetmemError, match="empty"):
        engine.submit(GenRequest("w", []), lambda ev: None)


def test_cancel_frees_pages(engine):
    c = Collector()
    engine.submit(GenRequest("long", _prompt(100, 5), sampling=Sampling(max_tokens=300)), c)
    with c.cv:
        c.cv.wait_for(lambda: len(c.res.get("long", {}).get("ids", ())) >= 3, 60)
    engine.cancel("long")
    for _ in range(200):
        st = engine.stats()
        if st["running"] == 0 and st["pool_free_pages"] == st["pool_pages"]:
            break
        threading.Event().wait(0.05)
    assert st["running"] == 0 and st["pool_free_pages"] == st["pool_pages"]


@pytest.mark.embedded
def test_smollm2_passkey_through_the_engine_dense_and_quest():
    from hetmem.llm.models import load_model
    from hetmem.llm.prompt import build_prompt_ids, eos_ids
    from hetmem.tasks.haystack import passkey_task

    smol = load_model("smollm2")
    task = passkey_task(smol.tokenizer, 1200, seed=7, depth=0.5)
    ids = build_prompt_ids(smol.tokenizer, task.context, task.question)[0].tolist()
    eng = BatchEngine(smol.model, smol.tokenizer, model_name=smol.name, max_batch=4, pool_tokens=4096,
                      eos_token_ids=eos_ids(smol.tokenizer, smol.model))
    try:
        c = Collector()
        eng.submit(GenRequest("dense", ids, "dense", {}, Sampling(max_tokens=12)), c)
        eng.submit(GenRequest("quest", ids, "quest", {"budget": 512}, Sampling(max_tokens=12)), c)
        got = c.wait(["dense", "quest"], timeout=600)
    finally:
        eng.close()
    assert len(ids) > 1000
    for name in ("dense", "quest"):
        assert task.passkey in got[name]["text"], (name, got[name]["text"])
    assert got["quest"]["report"]["steps"]["relevancy"]["calls"] > 0


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(engine, monkeypatch):
    import hetmem.runtime.batch_engine as be

    def boom(*a, **k):
        raise RuntimeError("injected")

    monkeypatch.setattr(be, "decode_attend", boom)
    bad = run_alone(engine, GenRequest("bad", _prompt(30, 1), sampling=Sampling(max_tokens=5)))
    assert bad["finish"] == "error" and "injected" in bad["error"] and "\n" not in bad["error"]
    monkeypatch.undo()
    good = run_alone(engine, GenRequest("good", _prompt(30, 1), sampling=Sampling(max_tokens=5)))
    assert good["finish"] == "length" and len(good["ids"]) == 5
    st = engine.stats()
    assert st["pool_free_pages"] == st["pool_pages"]


def test_step_observations_for_histograms(engine):
    engine.observations()
    run_alone(engine, GenRequest("o", _prompt(40, 2), "quest", {"budget": 32, "dense_layers": 0},
                                 Sampling(max_tokens=4)))
    obs = engine.observations()
    steps = {(m, s, ph) for m, s, ph, d, ms in obs}
    assert {("quest", "relevancy", "decode"), ("quest", "apply", "prefill"), ("quest", "apply", "decode")} <= steps
    assert all(ms >= 0 and d == "cpu" for *_, d, ms in obs) and engine.observations() == []
