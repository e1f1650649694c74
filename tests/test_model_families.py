"""Every supported model family, one table (``hetmem.llm.families.SUPPORTED_FAMILIES``).

Per row: a tiny random-weight config saved with ``save_pretrained`` and loaded through ``load_model``;

* hetmem ``dense`` greedy == transformers' eager attention greedy (no cache: the model's own masks and
  arithmetic), with a prompt 4x the sliding window, prefilled in chunks;
* the row's feature really changes the output (a window of 4096, no soft-cap, another multiplier give
  different logits), so the equality above could fail;
* every selecting method at a budget covering the context == dense; at a small budget each runs, selects
  inside sliding windows, and its recall is measured.

Adding a family is one row of the table.
"""

import json

import pytest
import torch

from hetmem.errors import HetmemError
from hetmem.llm.families import SUPPORTED_FAMILIES, check_supported, render_readme
from hetmem.llm.generate import generate
from hetmem.llm.models import load_model
from hetmem.methods import REGISTRY, get_method
from hetmem.testing import save_family_dir

PROMPT, NEW, CHUNK, PAGE = 48, 8, 20, 4
ROWS = {f.id: f for f in SUPPORTED_FAMILIES}
SPARSE = ["quest", "seer", "dsa", "oracle"]
EVICTING = ["streaming", "h2o", "snapkv"]
FULL = {"quest": dict(page_size=PAGE, dense_layers=0), "seer": dict(page_size=PAGE), "dsa": {}, "oracle": {},
        "streaming": {}, "h2o": {}, "snapkv": dict(window=8)}


def _prompt(seed=0):
    return torch.randint(4, 100, (1, PROMPT), generator=torch.Generator().manual_seed(seed))


def _eager_greedy(path, ids, n=NEW, **overrides):
    """transformers' own eager attention, no cache: (greedy tokens, logits of each step)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager", **overrides).eval()
    toks, logits = [], []
    with torch.no_grad():
        for _ in range(n):
            last = model(ids).logits[:, -1].float()
            logits.append(last)
            toks.append(int(last.argmax(-1)))
            ids = torch.cat([ids, torch.tensor([[toks[-1]]])], dim=1)
    return toks, logits


@pytest.fixture(scope="module", params=list(ROWS))
def row(request, tmp_path_factory):
    fam = ROWS[request.param]
    path = save_family_dir(tmp_path_factory.mktemp(fam.id), fam)
    lm = load_model(str(path))
    ids = _prompt()
    dense = generate(lm.model, ids, get_method("dense"), NEW, progress=False, keep_logits=True, prefill_chunk=CHUNK)
    return fam, path, lm, ids, dense


def test_dense_equals_transformers_eager(row):
    fam, path, lm, ids, dense = row
    assert lm.model.config.model_type == fam.model_type
    toks, logits = _eager_greedy(path, ids)
    assert dense.token_ids == toks
    for a, b in zip(dense.logits, logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for key, value in fam.bites.items():  # the feature matters here: without it the logits differ
        other = _eager_greedy(path, ids, n=1, **{key: value})[1][0]
        assert (other - logits[0]).abs().max() > 1e-2, f"{fam.id}: {key}={value} changes nothing"


@pytest.mark.parametrize("name", SPARSE + EVICTING)
def test_full_budget_equals_dense(row, name):
    fam, path, lm, ids, dense = row
    res = generate(lm.model, ids, get_method(name, budget=10**6, **FULL[name]), NEW, progress=False,
                   keep_logits=True, prefill_chunk=CHUNK)
    assert res.token_ids == dense.token_ids
    for a, b in zip(res.logits, dense.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    if fam.bites.get("sliding_window") or "sliding_window" in fam.config and fam.config["sliding_window"]:
        assert res.memory["sliding_window_layers"]["layers"]


@pytest.mark.parametrize("name", SPARSE)
def test_small_budget_selects_inside_windows(row, name, monkeypatch):
    """Budget 8 tokens (2 pages): every selection lies inside its layer's window and the Apply attends over at
    most the budget (+ a partial page); recall vs the oracle is measured."""
    fam, path, lm, ids, dense = row
    from hetmem.core.pipeline import MemoryPipeline

    seen = []
    real = MemoryPipeline.query_and_apply

    def spy(self, memory, query, raw, target):
        out = real(self, memory, query, raw, target)
        sel = self.last_selection
        if sel is not None:
            ids_ = sel.to_indices()
            lo = int(ids_.min()) * sel.unit_size
            seen.append((raw.is_sliding, raw.window_start, sel.start, lo + sel.unit_size, sel.selected_tokens))
        return out

    monkeypatch.setattr(MemoryPipeline, "query_and_apply", spy)
    params = {"page_size": PAGE, "dense_layers": 0} if name in ("quest", "seer") else {}
    if name == "dsa":
        params["recent"] = 4
    res = generate(lm.model, ids, get_method(name, budget=8, **params), NEW, progress=False, keep_logits=True,
                   recall=True, prefill_chunk=CHUNK)
    assert all(torch.isfinite(x).all() for x in res.logits)
    assert seen and max(s[4] for s in seen) <= 8 + PAGE
    for sliding, ws, start, first_end, _ in seen:
        assert start == ws  # the selection knows the window start
        assert first_end > start  # the first selected unit reaches into the window
    if any(s[0] for s in seen):
        assert any(s[1] > 0 for s in seen if s[0])  # the window had moved: the check above was not vacuous
        assert "inside the window" in res.memory["sliding_window_layers"]["note"]
    assert 0 < res.recall["attention_mass_recall"] <= 1 + 1e-5


@pytest.mark.parametrize("name", EVICTING)
def test_eviction_leaves_window_layers_to_their_window(row, name, monkeypatch):
    fam, path, lm, ids, dense = row
    from hetmem.llm.paged_cache import PagedKVLayer

    compacted = []
    real = PagedKVLayer.compact
    monkeypatch.setattr(PagedKVLayer, "compact", lambda self, keep: (compacted.append(self.is_sliding), real(self, keep)))
    res = generate(lm.model, ids, get_method(name, budget=16, **({"window": 8} if name == "snapkv" else {})), 4,
                   progress=False, prefill_chunk=CHUNK)
    from hetmem.llm.arch import describe

    assert not any(compacted)  # evicted on full-attention layers only
    assert bool(compacted) == (None in describe(lm.model).windows)
    if "sliding_window_layers" in res.memory:
        assert "keep their window whole" in res.memory["sliding_window_layers"]["note"]


def test_kvquant_residual_covering_the_context_equals_dense(row):
    """Nothing quantised (the exact tail holds every token): dense's tokens and logits, with the row's windows,
    soft-capping, sinks and MLA latent cache."""
    fam, path, lm, ids, dense = row
    res = generate(lm.model, ids, get_method("kvquant", group_size=4, residual=10**4), NEW, progress=False,
                   keep_logits=True, prefill_chunk=CHUNK)
    assert res.memory["tokens_quantized"] == 0
    assert res.token_ids == dense.token_ids
    for a, b in zip(res.logits, dense.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_kvquant_quantises_inside_windows_and_the_latent_once(row):
    """8-bit codes with a short exact tail: close to dense; window layers drop the quantised groups that left
    the window (memory bounded by it); an MLA layer holds one set of codes (the latent), no value codes."""
    fam, path, lm, ids, dense = row
    from hetmem.llm.arch import describe

    cache = []
    method = get_method("kvquant", bits=8, group_size=4, residual=4)
    real = method.report
    method.report = lambda c: (cache.append(c), real(c))[1]
    res = generate(lm.model, ids, method, NEW, progress=False, keep_logits=True, prefill_chunk=CHUNK)
    assert res.memory["tokens_quantized"] > 0 and res.memory["kv_bytes"] < dense.memory["kv_bytes"]
    n = next((i for i, (x, y) in enumerate(zip(res.token_ids, dense.token_ids)) if x != y), NEW - 1)
    err = max(float((x - y).norm() / y.norm()) for x, y in zip(res.logits[: n + 1], dense.logits[: n + 1]))
    assert err < 0.05, err  # compared up to the first differing token
    a = describe(lm.model)
    for layer, w in zip(cache[0].layers, a.windows):
        t = layer.memory.tensors
        assert ("v_codes" in t) == (a.mla_rank is None)
        if w is not None:  # the window layer keeps at most its window (+ trim slack, tail and a group)
            assert layer.length <= w + layer._trim_slack() + 4 + 4 < layer.seen


@pytest.mark.parametrize("fid", ["phi3", "deepseek_v3", "gemma2"])
@pytest.mark.parametrize("name", ["seer", "dsa"])
def test_trained_gates_attach_to_any_projection_layout(tmp_path, fid, name):
    """hetmem train's objectives find the q/k projections (fused qkv, MLA's low-rank q and latent kv) and the
    trained weights load into the method."""
    from hetmem.testing import family_model
    from hetmem.train.distill import OBJECTIVES, train
    from hetmem.methods.gates import save_gates

    model = family_model(ROWS[fid])
    chunk = _prompt(3)[:, :40].repeat_interleave(2, dim=1)
    kw = {"page_size": PAGE} if name == "seer" else {"index_heads": 2, "recent": 4}
    obj = OBJECTIVES[name](model, **kw) if name == "seer" else OBJECTIVES[name](model, min_pos=8, **kw)
    rec = train(model, obj, [chunk], [chunk], steps=2, lr=1e-2, eval_budget=16, progress=False)
    assert all(torch.isfinite(torch.tensor(rec["train_loss"])))
    save_gates(tmp_path / "g", name, obj.export(), obj.meta())
    method = get_method(name, gates=str(tmp_path / "g"), budget=16, **kw)
    res = generate(model, _prompt(), method, 3, progress=False, recall=True)
    assert len(res.token_ids) == 3 and 0 < res.recall["attention_mass_recall"] <= 1 + 1e-5


def test_sliding_layer_matches_transformers_window_layer_and_keeps_its_memory_aligned():
    """Mask sizes and the keys a prefill chunk sees equal transformers' DynamicSlidingWindowLayer; whole pages
    are dropped as the window moves, the quest page bounds moving with them."""
    from transformers.cache_utils import DynamicSlidingWindowLayer

    from hetmem.llm.paged_cache import PagedKVLayer
    from hetmem.ops.page_minmax import page_minmax
    from hetmem.core.timer import StepTimer

    W, P = 12, 4
    layer = PagedKVLayer(P, get_method("quest", page_size=P, budget=8, dense_layers=0).pipeline("cpu", StepTimer()),
                         reserve_tokens=1000, sliding_window=W)
    ref = DynamicSlidingWindowLayer(W)
    keys = torch.randn(1, 2, 100, 8)
    spans = [(0, 7), (7, 30), (30, 31), (31, 50)] + [(t, t + 1) for t in range(50, 100)]
    for s, e in spans:
        assert layer.get_mask_sizes(e - s) == ref.get_mask_sizes(e - s)
        k, _ = layer.update(keys[:, :, s:e], keys[:, :, s:e].clone())
        k_ref, _ = ref.update(keys[:, :, s:e], keys[:, :, s:e].clone())
        if e - s > 1:  # prefill: the chunk sees exactly what transformers' window layer shows it
            torch.testing.assert_close(k, k_ref)
        stored = layer.length
        assert stored <= W + layer._trim_slack() + (e - s)  # memory stays bounded by the window
        torch.testing.assert_close(layer.buf_k[:, :, :stored], keys[:, :, e - stored : e])
        mn, mx = page_minmax(layer.buf_k[:, :, :stored], P)
        n = mn.shape[2]
        assert torch.equal(layer.memory.tensors["kmin"][:, :, :n], mn)
        assert torch.equal(layer.memory.tensors["kmax"][:, :, :n], mx)
        assert layer.memory.meta["window_start"] == max(0, stored - W)
    assert layer.capacity <= 2 * (W + layer._trim_slack() + P)


# -- refusals -----------------------------------------------------------------------------------------------------
def _config_dir(tmp_path, cfg: dict):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path  # no weights: a refusal must come before any weight is read


@pytest.mark.parametrize("cfg,words", [
    ({"model_type": "starcoder2"}, ["starcoder2", "not among the families"]),
    ({"model_type": "no_such_arch"}, ["no_such_arch", "not among"]),
    ({"model_type": "llama4"}, ["llama4", "chunked attention"]),
    ({"model_type": "gemma3_text", "use_bidirectional_attention": True, "num_hidden_layers": 2},
     ["gemma3_text", "use_bidirectional_attention"]),
])
def test_unsupported_families_are_refused_before_loading_weights(tmp_path, cfg, words, capsys):
    from hetmem.cli import main

    path = _config_dir(tmp_path, cfg)
    with pytest.raises(HetmemError) as e:
        load_model(str(path))
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words)
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("hello", encoding="utf-8")
    assert main(["run", "--method", "dense", "--model", str(path), "--context", str(ctx), "--question", "q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hetmem: error: model type") and "\n" not in err


def test_unsupported_layer_type_is_refused():
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("qwen2", num_hidden_layers=2, layer_types=["full_attention", "chunked_attention"])
    with pytest.raises(HetmemError, match="chunked_attention"):
        check_supported(cfg)


# -- generated listings -------------------------------------------------------------------------------------------
def test_readme_support_table_is_generated_from_the_table():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert render_readme(readme) == readme, "run: python -m hetmem.llm.families README.md"


def test_methods_json_lists_the_families(capsys):
    from hetmem.cli import main

    assert main(["methods", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    types = sorted({f.model_type for f in SUPPORTED_FAMILIES})
    for name in SPARSE + EVICTING + ["dense"]:
        assert sorted(rows[name]["families"]) == types
    assert set(REGISTRY) == set(rows)


def test_methods_bind_to_a_profiling_shape_without_a_model():
    """Kernel sweeps bind methods to a bare shape (a namespace config, shared projections): the arch helpers
    must read it too."""
    from hetmem.profiling.sweep import SHAPES, LayerWeights, ShapeModel

    s = SHAPES["tiny"]
    model = ShapeModel(s, LayerWeights(s, torch.float32, "cpu"))
    for name in ("seer", "dsa"):
        m = get_method(name)
        m.bind(model)
        assert m._w["wq"].shape[0] == s.layers
