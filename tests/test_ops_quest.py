"""Each Quest op against a plain reference, on random inputs."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hetmem.ops.page_minmax import page_minmax, update_page_minmax
from hetmem.ops.page_score import quest_upper_bound, quest_upper_bound_reference
from hetmem.ops.sparse_attention import (
    dense_attention_reference,
    gather_pages,
    gather_selected_kv,
    grouped_decode_attention,
)
from hetmem.ops.topk import budget_page_indices, threshold_bitmap, topk_indices

SETTINGS = settings(max_examples=25, deadline=None)


def _ref_minmax(keys, P):
    L = keys.shape[2]
    mins, maxs = [], []
    for p in range(math.ceil(L / P)):
        blk = keys[:, :, p * P : (p + 1) * P]
        mins.append(blk.min(dim=2).values)
        maxs.append(blk.max(dim=2).values)
    return torch.stack(mins, 2), torch.stack(maxs, 2)


@SETTINGS
@given(L=st.integers(1, 70), P=st.integers(1, 17), seed=st.integers(0, 10_000))
def test_page_minmax_matches_reference(L, P, seed):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, 3, L, 5, generator=g)
    mn, mx = page_minmax(keys, P)
    rmn, rmx = _ref_minmax(keys, P)
    assert torch.equal(mn, rmn) and torch.equal(mx, rmx)


@SETTINGS
@given(L=st.integers(1, 60), P=st.integers(1, 9), steps=st.integers(1, 20), seed=st.integers(0, 10_000))
def test_incremental_update_equals_from_scratch(L, P, steps, seed):
    """Prefill span then single-token decode updates keep every page's bounds exact."""
    g = torch.Generator().manual_seed(seed)
    total = L + steps
    keys = torch.randn(1, 2, total, 4, generator=g)
    n_cap = math.ceil(total / P)
    kmin, kmax = torch.empty(1, 2, n_cap, 4), torch.empty(1, 2, n_cap, 4)
    update_page_minmax(kmin, kmax, keys, 0, L, P)
    for t in range(L, total):
        update_page_minmax(kmin, kmax, keys, t, t + 1, P)
    rmn, rmx = _ref_minmax(keys, P)
    assert torch.equal(kmin, rmn) and torch.equal(kmax, rmx)


@SETTINGS
@given(G=st.integers(1, 4), N=st.integers(1, 12), P=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_quest_upper_bound_matches_definition_and_bounds_true_scores(G, N, P, seed):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, 2, N * P, 8, generator=g)
    q = torch.randn(1, 2, G, 8, generator=g)
    mn, mx = page_minmax(keys, P)
    ub = quest_upper_bound(q, mn, mx)
    assert torch.allclose(ub, quest_upper_bound_reference(q, mn, mx), atol=1e-4)
    # it really is an upper bound of every true q.k in the page, for every head of the group
    true = (q @ keys.transpose(-1, -2)).reshape(1, 2, G, N, P).amax(-1).amax(2)
    assert torch.all(ub >= true - 1e-4)


@SETTINGS
@given(n=st.integers(1, 40), k=st.integers(0, 45), seed=st.integers(0, 10_000))
def test_topk_indices_are_the_largest_sorted(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(3, n, generator=g)
    idx = topk_indices(s, k)
    kk = min(k, n)
    assert idx.shape == (3, kk)
    assert torch.all(idx[:, 1:] > idx[:, :-1])
    for r in range(3):
        chosen = set(idx[r].tolist())
        ref = set(torch.argsort(s[r], descending=True)[:kk].tolist())
        assert chosen == ref


def test_threshold_bitmap():
    s = torch.tensor([[0.1, 0.5, 0.9, 0.5]])
    assert threshold_bitmap(s, 0.5).tolist() == [[False, True, True, True]]


@SETTINGS
@given(
    n_pages=st.integers(1, 30), budget=st.integers(1, 35), sink=st.integers(0, 2), recent=st.integers(1, 3),
    seed=st.integers(0, 10_000),
)
def test_budget_page_indices_keeps_sink_recent_and_top(n_pages, budget, sink, recent, seed):
    g = torch.Generator().manual_seed(seed)
    lo = min(sink, n_pages)
    hi = max(lo, n_pages - recent)
    scores = torch.randn(2, hi - lo, generator=g)
    idx = budget_page_indices(scores, lo, n_pages, budget, sink, recent)
    assert idx.shape[-1] == min(budget, n_pages)
    assert torch.all(idx[:, 1:] > idx[:, :-1])  # sorted, unique
    assert torch.all(idx[:, -1] == n_pages - 1)  # the most recent page is always kept
    if budget < n_pages:
        r = min(recent, budget)
        s_ = min(sink, n_pages - r, budget - r)
        k = budget - r - s_
        for row in range(2):
            ids = idx[row].tolist()
            assert set(range(s_)) <= set(ids)
            assert set(range(n_pages - r, n_pages)) <= set(ids)
            picked = [i for i in ids if s_ <= i < n_pages - r]
            assert len(picked) == k
            best = set((torch.argsort(scores[row], descending=True)[:k] + lo).tolist())
            assert set(picked) == best


@SETTINGS
@given(n_pages=st.integers(1, 10), k=st.integers(1, 10), P=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_gather_pages_matches_loop(n_pages, k, P, seed):
    g = torch.Generator().manual_seed(seed)
    buf = torch.randn(2, 3, n_pages * P + 3, 4, generator=g)  # capacity not a multiple of P
    idx = torch.randint(0, n_pages, (2, 3, k), generator=g)
    out = gather_pages(buf, idx, P)
    for b in range(2):
        for h in range(3):
            ref = torch.cat([buf[b, h, i * P : (i + 1) * P] for i in idx[b, h].tolist()])
            assert torch.equal(out[b, h], ref)


@SETTINGS
@given(L=st.integers(1, 50), P=st.integers(1, 8), G=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_sparse_attention_with_every_page_equals_dense(L, P, G, seed):
    g = torch.Generator().manual_seed(seed)
    cap = math.ceil(L / P) * P + P  # cache buffers hold whole pages
    k = torch.randn(1, 2, cap, 8, generator=g)
    v = torch.randn(1, 2, cap, 8, generator=g)
    q = torch.randn(1, 2, G, 8, generator=g)
    n_pages = math.ceil(L / P)
    idx = torch.arange(n_pages).expand(1, 2, n_pages)
    ks, vs = gather_selected_kv(k, v, idx, P, L)
    assert ks.shape[2] == L
    out = grouped_decode_attention(q, ks, vs, 0.35)
    ref = dense_attention_reference(q, k[:, :, :L], v[:, :, :L], 0.35)
    assert torch.allclose(out, ref, atol=1e-5)


def test_sparse_attention_subset_equals_attention_over_subset():
    g = torch.Generator().manual_seed(0)
    P, L = 4, 30
    k, v = torch.randn(1, 1, 32, 8, generator=g), torch.randn(1, 1, 32, 8, generator=g)
    q = torch.randn(1, 1, 2, 8, generator=g)
    idx = torch.tensor([[[0, 3, 7]]])  # page 7 = tokens 28..29 (partial)
    ks, vs = gather_selected_kv(k, v, idx, P, L)
    tokens = [0, 1, 2, 3, 12, 13, 14, 15, 28, 29]
    assert ks.shape[2] == len(tokens)
    ref = dense_attention_reference(q, k[:, :, tokens], v[:, :, tokens], 0.3)
    assert torch.allclose(grouped_decode_attention(q, ks, vs, 0.3), ref, atol=1e-5)
