"""Property tests, one per selector (the Retrieval step of every selecting method), on scores with ties.

For each: the forced units (sink and recent pages/tokens) are always in; the count is exactly the budget
when there are enough units; no id repeats; and the ranked part is the true top-k of the scores under
the tie rule of ``ops.topk.topk_indices``: (score descending, id ascending), NaN ranked as -inf.
"""


import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hetmem.core.types import Memory, Query, Scores
from hetmem.methods.dsa import SharedTokenTopK
from hetmem.methods.oracle import TokenTopK
from hetmem.methods.quest import PageBudgetTopK, QuestRelevancy
from hetmem.methods.seer import BlockBudgetOrThreshold, Seer
from hetmem.methods.compressed import KeepSetRetrieval
from hetmem.ops.topk import budget_page_indices, candidate_range, topk_indices
from hetmem.testing import tiny_model

SETTINGS = settings(max_examples=60, deadline=None)

# Scores drawn from a handful of values (ties everywhere), from floats, or a mix with infinities.
VALUE = st.one_of(
    st.sampled_from([-1.0, 0.0, 0.5, 2.0]),
    st.floats(-4, 4, allow_nan=False, width=32),
    st.sampled_from([float("inf"), float("-inf"), -0.0]),
)


@st.composite
def score_rows(draw, rows, n, allow_nan=False):
    value = st.one_of(VALUE, st.just(float("nan"))) if allow_nan else VALUE
    vals = draw(st.lists(st.lists(value, min_size=n, max_size=n), min_size=rows, max_size=rows))
    return torch.tensor(vals, dtype=torch.float32).reshape(rows, n)


def ref_topk(row: list[float], k: int) -> list[int]:
    """The top ``k`` ids under (score descending, id ascending), NaN as -inf; returned ascending."""
    key = [(float("inf") if v != v else -v, i) for i, v in enumerate(row)]
    return sorted(i for _, i in sorted(key)[:k])


def assert_set_properties(ids: torch.Tensor, expect_count: int, n: int):
    assert ids.shape[-1] == expect_count
    rows = ids.reshape(-1, expect_count) if expect_count else ids.new_zeros(0, 0)
    for r in rows.tolist():
        assert r == sorted(set(r)), "ids must be ascending with no duplicates"
        assert all(0 <= i < n for i in r)


def forced(n, budget, sink, recent):
    """The forced ids under a budget: the recent window first, then the sink (budget_page_indices' rule)."""
    r = min(recent, n, budget)
    s = min(sink, n - r, budget - r)
    return set(range(s)) | set(range(n - r, n)), budget - r - s


# -- ops.topk.topk_indices (oracle's token top-k; the ranked part of every budget selector) ---------------
@SETTINGS
@given(data=st.data(), n=st.integers(1, 40), k=st.integers(0, 45), rows=st.integers(1, 3))
def test_topk_indices_is_the_true_topk_with_ties(data, n, k, rows):
    s = data.draw(score_rows(rows, n, allow_nan=True))
    idx = topk_indices(s, k)
    assert_set_properties(idx, min(k, n), n)
    for r in range(rows):
        assert idx[r].tolist() == ref_topk(s[r].tolist(), k)


def test_topk_tie_rule_lower_id_wins():
    s = torch.tensor([[1.0, 3.0, 1.0, 1.0, 0.0, 1.0]])
    assert topk_indices(s, 3).tolist() == [[0, 1, 2]]
    assert topk_indices(s, 1).tolist() == [[1]]
    # NaN ranks as -inf (and ties with it)
    assert topk_indices(torch.tensor([[float("nan"), 0.0, float("-inf")]]), 2).tolist() == [[0, 1]]
    assert topk_indices(torch.tensor([[float("-inf"), float("nan"), 0.0]]), 2).tolist() == [[0, 2]]
    assert topk_indices(torch.tensor([[-0.0, 0.0, 0.0]]), 1).tolist() == [[0]]  # -0.0 == 0.0: a tie


# -- ops.topk.budget_page_indices (quest, seer top-k, dsa, and the eviction keep-sets) --------------------
@SETTINGS
@given(data=st.data(), n=st.integers(1, 30), budget=st.integers(1, 35), sink=st.integers(0, 3),
       recent=st.integers(1, 4))
def test_budget_page_indices_properties(data, n, budget, sink, recent):
    lo, hi = min(sink, n), max(min(sink, n), n - recent)
    s = data.draw(score_rows(2, hi - lo))
    idx = budget_page_indices(s, lo, n, budget, sink, recent)
    assert_set_properties(idx, min(budget, n), n)
    if budget >= n:
        return
    must, k = forced(n, budget, sink, recent)
    for r in range(2):
        ids = set(idx[r].tolist())
        assert must <= ids
        assert sorted(ids - must) == [i + lo for i in ref_topk(s[r].tolist(), k)]


# -- quest: QuestRelevancy's candidate range + PageBudgetTopK ---------------------------------------------
@SETTINGS
@given(data=st.data(), n=st.integers(1, 30), budget=st.integers(1, 35), sink=st.integers(0, 3),
       recent=st.integers(1, 4), P=st.sampled_from([1, 4, 16]))
def test_quest_page_budget_topk(data, n, budget, sink, recent, P):
    length = n * P - data.draw(st.integers(0, P - 1))  # the last page may be partial
    lo, hi = candidate_range(n, sink, recent, budget)
    s = data.draw(score_rows(2, hi - lo)).reshape(1, 2, hi - lo)
    mem = Memory(kind="page-minmax", n_units=n, unit_size=P, meta={"length": length})
    sel = PageBudgetTopK(budget, sink, recent).select(Scores(s, offset=lo), mem)
    assert (sel.n_units, sel.unit_size, sel.length) == (n, P, length)
    assert_set_properties(sel.indices, min(budget, n), n)
    if budget < n:
        must, k = forced(n, budget, sink, recent)
        assert hi - lo >= k  # Relevancy scores enough candidates to fill the budget
        for h in range(2):
            ids = set(sel.indices[0, h].tolist())
            assert must <= ids and sorted(ids - must) == [i + lo for i in ref_topk(s[0, h].tolist(), k)]


def test_quest_relevancy_scores_exactly_the_candidates():
    mem = Memory(kind="page-minmax", n_units=10, unit_size=4, meta={"length": 40},
                 tensors={"kmin": torch.randn(1, 2, 10, 8), "kmax": torch.randn(1, 2, 10, 8)})
    sc = QuestRelevancy(sink_pages=2, recent_pages=3, budget_pages=6).score(mem, Query(vectors=torch.randn(1, 2, 2, 8)))
    assert (sc.offset, sc.n_units) == (2, 5)


# -- seer: top-k mode is budget_page_indices; threshold mode is a bitmap ----------------------------------
@SETTINGS
@given(data=st.data(), n=st.integers(1, 30), sink=st.integers(0, 3), recent=st.integers(1, 4),
       threshold=st.sampled_from([0.01, 0.1, 0.25, 0.5, 0.9]))
def test_seer_threshold_bitmap(data, n, sink, recent, threshold):
    lo, hi = candidate_range(n, sink, recent, 0)  # threshold mode ranks every candidate
    s = data.draw(score_rows(2, hi - lo, allow_nan=False)).clamp(-30, 30).reshape(1, 2, hi - lo)
    mem = Memory(kind="gated-block-keys", n_units=n, unit_size=16, meta={"length": n * 16})
    sel = BlockBudgetOrThreshold(10**6, sink, recent, threshold).select(Scores(s, offset=lo), mem)
    bm = sel.bitmap
    assert bm.shape == (1, 2, n) and bm.dtype == torch.bool
    assert bm[..., : min(sink, n)].all() and bm[..., max(0, n - recent):].all()
    if hi > lo:
        p = torch.softmax(s.double(), -1)
        want = p >= threshold  # ties at the threshold are in
        # float32 softmax may round a probability within ~1e-6 of the threshold either way
        clear = (p - threshold).abs() > 1e-5
        assert torch.equal(bm[..., lo:hi][clear], want[clear])


@SETTINGS
@given(data=st.data(), n=st.integers(1, 30), budget=st.integers(1, 35), sink=st.integers(0, 3),
       recent=st.integers(1, 4))
def test_seer_budget_mode(data, n, budget, sink, recent):
    lo, hi = candidate_range(n, sink, recent, budget)
    s = data.draw(score_rows(1, hi - lo)).reshape(1, 1, hi - lo)
    mem = Memory(kind="gated-block-keys", n_units=n, unit_size=8, meta={"length": n * 8})
    sel = BlockBudgetOrThreshold(budget, sink, recent, 0.0).select(Scores(s, offset=lo), mem)
    assert_set_properties(sel.indices, min(budget, n), n)
    if budget < n:
        must, k = forced(n, budget, sink, recent)
        ids = set(sel.indices[0, 0].tolist())
        assert must <= ids and sorted(ids - must) == [i + lo for i in ref_topk(s[0, 0].tolist(), k)]


def test_seer_threshold_mode_scores_every_candidate_whatever_the_budget():
    """Regression: in threshold mode the budget must not shrink the candidates. With the default budget
    (1024 tokens = 64 blocks) a context of < 64 blocks used to score no candidate at all, so the bitmap
    held only the sink and recent blocks."""
    model = tiny_model()
    cfg = model.config
    seer = Seer(threshold=0.05, page_size=8, sink_pages=1, recent_pages=1)
    seer.bind(model)
    pipe = seer.pipeline("cpu", None, layer_idx=0)
    H, D, n = cfg.num_key_value_heads, cfg.head_dim, 12
    mem = Memory(kind="gated-block-keys", n_units=n, unit_size=8, meta={"length": n * 8},
                 tensors={"kgated": torch.randn(1, H, 16, D)})
    sc = pipe.relevancy.score(mem, Query(vectors=torch.randn(1, H, 2, D)))
    assert (sc.offset, sc.n_units) == (1, n - 2)
    sel = pipe.retrieval.select(sc, mem)
    want = torch.softmax(sc.values, -1) >= 0.05
    assert torch.equal(sel.bitmap[..., 1 : n - 1], want)


# -- dsa: one shared token top-k, recent window forced -----------------------------------------------------
@SETTINGS
@given(data=st.data(), L=st.integers(1, 40), budget=st.integers(1, 45), recent=st.integers(1, 6),
       n_kv=st.integers(1, 3))
def test_dsa_shared_token_topk(data, L, budget, recent, n_kv):
    recent = min(recent, budget)  # DSA.validate: 1 <= recent <= budget
    hi = max(0, L - recent) if budget < L else 0  # LightningIndexerRelevancy's candidates
    s = data.draw(score_rows(2, hi))
    mem = Memory(kind="index-keys", n_units=L, unit_size=1, meta={"length": L, "n_kv": n_kv})
    sel = SharedTokenTopK(budget, recent).select(Scores(s), mem)
    assert sel.indices.shape[:2] == (2, n_kv)
    assert_set_properties(sel.indices, min(budget, L), L)
    assert torch.equal(sel.indices, sel.indices[:, :1].expand_as(sel.indices))  # shared by every head
    if budget < L:
        must, k = forced(L, budget, 0, recent)
        for b in range(2):
            ids = set(sel.indices[b, 0].tolist())
            assert must <= ids and sorted(ids - must) == ref_topk(s[b].tolist(), k)


# -- oracle: the exact top-``budget`` tokens ---------------------------------------------------------------
@SETTINGS
@given(data=st.data(), L=st.integers(1, 40), budget=st.integers(1, 45))
def test_oracle_token_topk(data, L, budget):
    s = data.draw(score_rows(2, L)).reshape(1, 2, L)
    mem = Memory(kind="exact-keys", n_units=L, unit_size=1, meta={"length": L})
    sel = TokenTopK(budget).select(Scores(s), mem)
    assert_set_properties(sel.indices, min(budget, L), L)
    for h in range(2):
        assert sel.indices[0, h].tolist() == ref_topk(s[0, h].tolist(), budget)


# -- streaming / h2o / snapkv: the keep-set (ops.evict.keep_indices) ---------------------------------------
@SETTINGS
@given(data=st.data(), L=st.integers(1, 40), budget=st.integers(1, 45), sink=st.integers(0, 4),
       recent=st.integers(1, 8), scored=st.booleans())
def test_keep_set_retrieval(data, L, budget, sink, recent, scored):
    sink = min(sink, budget - 1)
    recent = max(1, min(recent, budget - sink))
    lead = (1, 2)
    mem = Memory(kind="kv-keep-set", n_units=L, unit_size=1, meta={"length": L, "lead": lead})
    n_cand = max(0, L - sink - recent)  # what h2o's and snapkv's Relevancy score: [sink, L - recent)
    s = data.draw(score_rows(2, n_cand)).reshape(1, 2, n_cand) if scored else None
    sel = KeepSetRetrieval(budget, sink, recent).select(Scores(s, offset=sink) if scored else None, mem)
    if L <= budget:
        assert sel is None  # nothing to evict
        return
    assert_set_properties(sel.indices, budget, L)
    must, k = forced(L, budget, sink, recent)
    for h in range(2):
        ids = set(sel.indices[0, h].tolist())
        assert must <= ids
        rest = sorted(ids - must)
        if scored:
            assert rest == [i + sink for i in ref_topk(s[0, h].tolist(), k)]
        else:  # streaming: no scores, the candidates tie and the lowest ids fill the remainder
            assert rest == list(range(sink, sink + k))
