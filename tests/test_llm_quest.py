"""Quest inside tiny random-weight Llama and Qwen2 models, built from configs."""

import pytest
import torch

from hetmem.llm.generate import generate
from hetmem.llm.paged_cache import PagedKVCache
from hetmem.methods import get_method
from hetmem.ops import sparse_attention
from hetmem.ops.page_minmax import page_minmax
from hetmem.testing import tiny_model

ARCHS = ["llama", "qwen2"]


def _prompt(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 120, (1, n), generator=g)


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return tiny_model(request.param)


def test_both_methods_run(model):
    ids = _prompt(100)
    for m in (get_method("dense"), get_method("quest", budget=32, page_size=8, dense_layers=0)):
        res = generate(model, ids, m, 6, progress=False, prefill_chunk=48)
        assert len(res.token_ids) == 6
        s = res.timer.summary()
        assert s["apply"]["calls"] > 0
    # quest ran every step of its pipeline in decode, in every layer
    n_layers = model.config.num_hidden_layers
    assert s["relevancy"]["phases"]["decode"]["calls"] == 5 * n_layers
    assert s["retrieval"]["phases"]["decode"]["calls"] == 5 * n_layers
    assert s["prepare"]["phases"]["decode"]["calls"] == 5 * n_layers


def test_quest_full_budget_reproduces_dense_logits(model):
    ids = _prompt(90, seed=1)
    dense = generate(model, ids, get_method("dense"), 8, progress=False, keep_logits=True)
    quest = generate(model, ids, get_method("quest", budget=4096, page_size=16, dense_layers=0), 8, progress=False, keep_logits=True)
    assert dense.token_ids == quest.token_ids
    for a, b in zip(dense.logits, quest.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_quest_budget_covering_context_via_gather_path_matches_dense(model, monkeypatch):
    """Force the gather path even when every page is selected: the gathered attention equals dense."""
    from hetmem.methods import shared as quest_mod

    orig = quest_mod.GatherAttention.apply

    def always_gather(self, raw, selection, target):
        k, v = sparse_attention.gather_selected_kv(
            raw.buf_k, raw.buf_v, selection.indices, selection.unit_size, selection.length
        )
        return sparse_attention.grouped_decode_attention(target.q, k, v, target.scale)

    monkeypatch.setattr(quest_mod.GatherAttention, "apply", always_gather)
    ids = _prompt(75, seed=2)
    dense = generate(model, ids, get_method("dense"), 5, progress=False, keep_logits=True)
    quest = generate(model, ids, get_method("quest", budget=4096, page_size=8, dense_layers=0), 5, progress=False, keep_logits=True)
    monkeypatch.setattr(quest_mod.GatherAttention, "apply", orig)
    for a, b in zip(dense.logits, quest.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_small_budget_attends_only_to_the_budget(model, monkeypatch):
    """Apply attends over at most `budget` tokens (gathered, or read in place): it does not mask."""
    from hetmem.methods import shared as quest_mod

    seen = []
    real = quest_mod.grouped_decode_attention

    def spy(q, k, v, scale, **kw):
        seen.append(k.shape[2])
        return real(q, k, v, scale, **kw)

    real_paged = quest_mod.paged_decode_attention

    def spy_paged(q, k, v, pages, P, start, length, scale, **kw):  # in place: count the selected pages' tokens
        out = real_paged(q, k, v, pages, P, start, length, scale, **kw)
        if out is not None:
            seen.append(sum(min(p * P + P, length) - max(p * P, start) for p in pages[0, 0].tolist()))
        return out

    monkeypatch.setattr(quest_mod, "grouped_decode_attention", spy)
    monkeypatch.setattr(quest_mod, "paged_decode_attention", spy_paged)
    ids = _prompt(200, seed=3)
    res = generate(model, ids, get_method("quest", budget=48, page_size=8, dense_layers=0), 6, progress=False, keep_logits=True)
    # every layer, every decode step: exactly 6 pages, the last one (the recent page) partial
    n_layers = model.config.num_hidden_layers
    want = [5 * 8 + L - 8 * (-(-L // 8) - 1) for L in range(201, 206) for _ in range(n_layers)]
    assert seen == want
    assert all(torch.isfinite(x).all() for x in res.logits)
    dense = generate(model, ids, get_method("dense"), 6, progress=False, keep_logits=True)
    # with 48 of ~200 tokens the output differs from dense (the test would catch a method that ignored the budget)
    assert any(not torch.allclose(a, b, atol=1e-3) for a, b in zip(dense.logits[1:], res.logits[1:]))


def test_paged_cache_prepare_keeps_page_bounds_current(model):
    ids = _prompt(61, seed=4)
    method = get_method("quest", budget=32, page_size=8, dense_layers=0)
    from hetmem.llm import attention

    attention.install(model)
    n_layers = model.config.num_hidden_layers
    from hetmem.core.timer import StepTimer

    timer = StepTimer()
    cache = PagedKVCache(n_layers, 8, [method.pipeline("cpu", timer) for _ in range(n_layers)])
    rt = attention.SparseRuntime(cache)
    with torch.inference_mode(), rt.activate():
        out = model(input_ids=ids[:, :40], past_key_values=cache, use_cache=True)  # prefill in two chunks
        out = model(input_ids=ids[:, 40:], past_key_values=cache, use_cache=True)
        for t in range(13):  # decode past a page boundary and past the initial capacity
            nxt = out.logits[:, -1:].argmax(-1)
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
    for layer in cache.layers:
        L = layer.length
        assert L == 61 + 13
        mn, mx = page_minmax(layer.buf_k[:, :, :L], 8)
        n = mn.shape[2]
        assert layer.memory.n_units == n
        assert torch.equal(layer.memory.tensors["kmin"][:, :, :n], mn)
        assert torch.equal(layer.memory.tensors["kmax"][:, :, :n], mx)


def test_dense_layers_stay_dense(model):
    res = generate(model, _prompt(80), get_method("quest", budget=32, page_size=8, dense_layers=1), 4, progress=False)
    s = res.timer.summary()
    assert s["relevancy"]["calls"] == 3 * (model.config.num_hidden_layers - 1)


@pytest.mark.parametrize("name,params", [("dense", {}), ("quest", {"budget": 16, "page_size": 8, "dense_layers": 0}),
                                         ("h2o", {"budget": 24}), ("kvquant", {"group_size": 8})])
def test_prefill_attention_goes_through_the_methods_apply_step(monkeypatch, name, params):
    """Prefill's Apply is the method's Apply step too (its ``prefill``), timed as apply: one call per layer and
    prefill chunk, and the output is what the model's own attention computes."""
    from hetmem.core.pipeline import MemoryPipeline
    from hetmem.methods.shared import DensePrefill

    calls = []
    real = MemoryPipeline.prefill_apply

    def spy(self, raw, target):
        calls.append(isinstance(self.apply, DensePrefill))
        return real(self, raw, target)

    monkeypatch.setattr(MemoryPipeline, "prefill_apply", spy)
    model = tiny_model("llama")
    res = generate(model, _prompt(50), get_method(name, **params), 2, progress=False, prefill_chunk=20)
    assert len(calls) == model.config.num_hidden_layers * 3  # 50 tokens in chunks of 20
    assert all(calls)  # every Apply step has the prefill entry point
    assert res.timer.phase_calls("apply", "prefill") == len(calls)
