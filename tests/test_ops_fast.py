"""The compiled decode kernels (ops.fast) against plain references, and the torch fallback."""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hetmem.ops import fast
from hetmem.ops.block_pool import gated_block_scores, gated_block_scores_reference, gated_block_scores_torch
from hetmem.ops.index_score import index_scores, index_scores_reference, index_scores_torch
from hetmem.ops.page_score import quest_upper_bound_reference, quest_upper_bound_torch
from hetmem.ops.sparse_attention import decode_probs, paged_decode_attention

# HETMEM_OPS_EXAMPLES raises the examples for a stress run (e.g. 1000 with HETMEM_KERNEL_CFLAGS=-D_GLIBCXX_ASSERTIONS)
SETTINGS = settings(max_examples=int(os.environ.get("HETMEM_OPS_EXAMPLES", "25")), deadline=None)
needs_cpp = pytest.mark.skipif(not fast.available(torch.zeros(1)), reason=f"compiled ops unavailable: {fast.backend()}")


@needs_cpp
@SETTINGS
@given(G=st.integers(1, 9), N=st.integers(0, 40), D=st.one_of(st.integers(1, 70), st.sampled_from([16, 64, 128])),
       lo=st.integers(0, 3), seed=st.integers(0, 9999), low=st.sampled_from([None, torch.bfloat16, torch.float16]))
def test_quest_scores_match_the_definition(G, N, D, lo, seed, low):
    g = torch.Generator().manual_seed(seed)
    kmin = torch.randn(2, 3, N + lo + 2, D, generator=g)
    kmax = kmin + torch.rand(2, 3, N + lo + 2, D, generator=g)
    if low is not None:  # page bounds stored in 16 bits (--kv-dtype), accumulated in float32
        kmin, kmax = kmin.to(low), kmax.to(low)
    q = torch.randn(2, 3, G, D, generator=g)
    a, b = kmin[:, :, lo : lo + N], kmax[:, :, lo : lo + N]  # a slice, as Relevancy passes the candidates
    got = fast.quest_scores(q, a, b)
    ref = quest_upper_bound_reference(q, a, b)
    assert got.shape == (2, 3, N)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)
    assert torch.allclose(quest_upper_bound_torch(q, a, b), ref, atol=1e-4, rtol=1e-4)


def _topk_reference(row: list[float], k: int) -> list[int]:
    key = [float("-inf") if x != x else x for x in row]
    return sorted(sorted(range(len(row)), key=lambda i: (-key[i], i))[:k])


@needs_cpp
@SETTINGS
@given(n=st.integers(1, 60), k=st.integers(0, 60), seed=st.integers(0, 9999), ties=st.booleans())
def test_topk_ids_follow_the_tie_rule(n, k, seed, ties):
    k = min(k, n)
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 4, (3, n), generator=g).float() if ties else torch.randn(3, n, generator=g)
    s[0, ::7] = float("nan")
    got = fast.topk_ids(s, k)
    for r in range(3):
        assert got[r].tolist() == _topk_reference(s[r].tolist(), k)


@needs_cpp
@SETTINGS
@given(n_pages=st.integers(1, 12), P=st.one_of(st.integers(1, 9), st.sampled_from([16, 17, 33])), G=st.integers(1, 9), seed=st.integers(0, 9999),
       cut=st.integers(0, 8), start=st.integers(0, 20), softcap=st.sampled_from([None, 5.0]), sinks=st.booleans(),
       low=st.sampled_from([None, torch.bfloat16, torch.float16]), dims=st.sampled_from([(8, 6), (32, 16), (64, 64)]),
       BH=st.sampled_from([(1, 2), (2, 3), (1, 1)]), q_view=st.booleans())
def test_page_attention_equals_attention_over_the_selected_tokens(n_pages, P, G, seed, cut, start, softcap, sinks,
                                                                   low, dims, BH, q_view):
    g = torch.Generator().manual_seed(seed)
    B, H = BH
    D, Dv = dims  # multiples of 16 take the AVX-512 path where the CPU has it
    cap = n_pages * P
    length = max(1, cap - min(cut, P - 1))
    start = min(start, length - 1)
    k = torch.randn(B, H, cap, D + 2, generator=g)[..., :D]  # a strided view, as MLA's latent value is
    v = torch.randn(B, H, cap, Dv, generator=g)
    if low is not None:
        k, v = k.to(low), v.to(low)
    q = torch.randn(B, H, G, D + 3, generator=g)[..., 1 : D + 1] if q_view else torch.randn(B, H, G, D, generator=g)
    sk = torch.randn(H, G, generator=g) if sinks else None
    first, last = start // P, (length - 1) // P
    pick = torch.cat([torch.tensor([first, last]), torch.randint(first, last + 1, (n_pages // 2,), generator=g)])
    pages = pick.unique().expand(B, H, -1)  # sorted page ids, the same for both heads
    out = paged_decode_attention(q, k, v, pages, P, start, length, 0.3, softcap=softcap, sinks=sk)
    tok = (pages.unsqueeze(-1) * P + torch.arange(P)).flatten(-2)
    tok = tok[..., (tok[0, 0] >= start) & (tok[0, 0] < length)].contiguous()
    ks = torch.gather(k.float(), 2, tok.unsqueeze(-1).expand(*tok.shape, D))
    vs = torch.gather(v.float(), 2, tok.unsqueeze(-1).expand(*tok.shape, Dv))
    ref = decode_probs(q, ks, 0.3, softcap=softcap, sinks=sk).double() @ vs.double()
    assert torch.allclose(out.double(), ref, atol=1e-5)


@needs_cpp
def test_page_attention_reads_only_the_selected_pages():
    k, v = torch.randn(1, 2, 64, 8), torch.randn(1, 2, 64, 8)
    pages = torch.tensor([[[0, 3]], [[1, 2]]]).reshape(1, 2, 2)
    q = torch.randn(1, 2, 3, 8)
    ref = paged_decode_attention(q, k, v, pages, 16, 0, 64, 0.5)
    mask = torch.ones(1, 2, 4, 1, 1, dtype=torch.bool)
    mask.scatter_(2, pages.reshape(1, 2, 2, 1, 1), False)
    k.view(1, 2, 4, 16, 8).masked_fill_(mask, float("nan"))
    v.view(1, 2, 4, 16, 8).masked_fill_(mask, float("nan"))
    assert torch.equal(paged_decode_attention(q, k, v, pages, 16, 0, 64, 0.5), ref)


def test_torch_fallback_is_decided_once_and_said():
    env = dict(os.environ, HETMEM_KERNELS="torch")
    code = ("import torch; from hetmem.ops import fast; from hetmem.ops.sparse_attention import paged_decode_attention;"
            "print(fast.backend()['relevancy'], paged_decode_attention(torch.zeros(1,1,1,4), torch.zeros(1,1,4,4),"
            " torch.zeros(1,1,4,4), torch.zeros(1,1,1, dtype=torch.long), 4, 0, 4, 1.0))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["torch", "None"]


@needs_cpp
@SETTINGS
@given(D=st.sampled_from([16, 8]), G=st.integers(1, 9), low=st.sampled_from([None, torch.bfloat16]),
       ids=st.lists(st.integers(-3, 12), max_size=6))
def test_page_attention_edge_selections(D, G, low, ids):
    """No page selected (the output is 0), and page ids outside the buffers or past ``length`` (they add no token)."""
    k, v, q = torch.randn(2, 3, 32, D), torch.randn(2, 3, 32, D), torch.randn(2, 3, G, D)
    if low is not None:
        k, v = k.to(low), v.to(low)
    pages = torch.tensor(sorted(set(ids)), dtype=torch.long).expand(2, 3, -1)
    out = fast.page_attention(q, k, v, pages, 4, 0, 30, 0.5)
    keep = [i for i in sorted(set(ids)) if 0 <= i < 8]
    if not keep:
        assert torch.equal(out, torch.zeros(2, 3, G, D))
    else:
        ref = fast.page_attention(q, k, v, torch.tensor(keep).expand(2, 3, -1), 4, 0, 30, 0.5)
        assert torch.equal(out, ref)


@needs_cpp
def test_compiled_ops_refuse_bad_shapes():
    k = torch.randn(1, 2, 32, 16)
    with pytest.raises(RuntimeError, match="length <= capacity"):
        fast.page_attention(torch.randn(1, 2, 4, 16), k, k, torch.zeros(1, 2, 1, dtype=torch.long), 16, 0, 48, 1.0)
    with pytest.raises(RuntimeError, match="shapes disagree"):
        fast.page_attention(torch.randn(1, 2, 4, 8), k, k, torch.zeros(1, 2, 1, dtype=torch.long), 16, 0, 32, 1.0)
    with pytest.raises(RuntimeError, match="k must be in"):
        fast.topk_ids(torch.randn(2, 5), 6)
    with pytest.raises(RuntimeError, match="must match"):
        fast.quest_scores(torch.randn(1, 2, 4, 8), k, k)
    with pytest.raises(RuntimeError, match="must match"):
        fast.block_scores(torch.randn(1, 2, 8), k, 1.0)
    with pytest.raises(RuntimeError, match="shapes disagree"):
        fast.index_scores(torch.randn(1, 4, 8), torch.randn(1, 4), k[:, 0])


@needs_cpp
@SETTINGS
@given(B=st.integers(1, 3), Hi=st.integers(1, 9), L=st.integers(0, 70),
       D=st.one_of(st.integers(1, 40), st.sampled_from([16, 64, 128])), lo=st.integers(0, 3), seed=st.integers(0, 9999),
       low=st.sampled_from([None, torch.bfloat16, torch.float16]))
def test_index_scores_match_the_definition(B, Hi, L, D, lo, seed, low):
    g = torch.Generator().manual_seed(seed)
    kidx = torch.randn(B, 1, L + lo + 2, D, generator=g)  # the index keys' buffer [B, 1, cap, D]
    if low is not None:
        kidx = kidx.to(low)
    k = kidx[:, 0, lo : lo + L]  # a strided slice, as the indexer's Relevancy passes the candidates
    q, w = torch.randn(B, Hi, D, generator=g), torch.randn(B, Hi, generator=g)
    got = fast.index_scores(q, w, k)
    ref = index_scores_reference(q, w, k)
    assert got.shape == (B, L)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)
    assert torch.allclose(index_scores(q, w, k), ref, atol=1e-4, rtol=1e-4)
    if low is None:
        assert torch.allclose(index_scores_torch(q, w, k), ref, atol=1e-4, rtol=1e-4)


@needs_cpp
@SETTINGS
@given(B=st.integers(1, 2), H=st.integers(1, 4), N=st.integers(0, 45),
       E=st.one_of(st.integers(1, 40), st.sampled_from([16, 64, 128])), lo=st.integers(0, 3), seed=st.integers(0, 9999),
       low=st.sampled_from([None, torch.bfloat16, torch.float16]))
def test_block_scores_match_the_definition(B, H, N, E, lo, seed, low):
    g = torch.Generator().manual_seed(seed)
    kg = torch.randn(B, H, N + lo + 2, E, generator=g)  # seer's gated block summaries [B, H, n_cap, E]
    if low is not None:
        kg = kg.to(low)
    k = kg[:, :, lo : lo + N]  # the candidate blocks, a slice
    q = torch.randn(B, H, E, generator=g)
    got = fast.block_scores(q, k, 0.3)
    ref = gated_block_scores_reference(q, k.float(), 0.3)
    assert got.shape == (B, H, N)
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)
    assert torch.allclose(gated_block_scores(q, k, 0.3), ref, atol=1e-4, rtol=1e-4)
    if low is None:
        assert torch.allclose(gated_block_scores_torch(q, k, 0.3), ref, atol=1e-4, rtol=1e-4)
