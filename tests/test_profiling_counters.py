"""Analytic op counts: each op against hand-computed values, and step counts against the real tensors."""

import pytest
import torch

from hetmem.core.types import DecodeTarget, Query
from hetmem.llm.paged_cache import PagedKVLayer
from hetmem.methods import get_method
from hetmem.ops.sparse_attention import gather_selected_kv
from hetmem.ops import counts as C
from hetmem.profiling.counters import StepCounter
from hetmem.core.timer import StepTimer, substep


def test_page_minmax_hand_computed():
    # B=1, H=2, L=10, D=4, pages of 4 -> 3 pages; fp32
    c = C.page_minmax(1, 2, 10, 4, 4, 4)
    assert (c.flops, c.bytes_read, c.bytes_written) == (160, 320, 192)


def test_page_minmax_update_hand_computed():
    mid = C.page_minmax_update(1, 2, 4, 5, 6, 4, 4)  # a token inside a page: running min and max
    assert (mid.flops, mid.bytes_read, mid.bytes_written) == (16, 96, 64)
    first = C.page_minmax_update(1, 2, 4, 4, 5, 4, 4)  # first token of a page: a copy
    assert (first.flops, first.bytes_read, first.bytes_written) == (0, 32, 64)
    span = C.page_minmax_update(1, 2, 4, 6, 10, 4, 4)  # recomputes pages 1..2 = tokens 4..9
    assert span.flops == 2 * 1 * 2 * 6 * 4


def test_quest_upper_bound_hand_computed():
    c = C.quest_upper_bound(1, 2, 3, 5, 4, 4)  # B, H_kv, G, N, D, e
    # clamps 48 + two matmuls 480 + sum 30 + max over G 20
    assert c.flops == 578
    assert c.bytes_read == 4 * (24 + 80) and c.bytes_written == 40
    assert c.cls == "gemv"


def test_topk_hand_computed():
    c = C.topk(2, 100, 8)  # log2(8) = 3: 2*100*3 + 2*8*3
    assert (c.flops, c.bytes_read, c.bytes_written) == (648, 800, 128)
    assert C.topk(2, 100, 0).flops == 0


def test_gather_attention_linear_hand_computed():
    g = C.gather_pages(1, 2, 32, 4, 2, 2)
    assert (g.flops, g.bytes_read, g.bytes_written) == (0, 1056, 1024)
    a = C.decode_attention(1, 2, 2, 10, 4, 4)
    assert (a.flops, a.bytes_read, a.bytes_written) == (840, 704, 64)
    p = C.prefill_attention(1, 2, 1, 3, 5, 4, 4)  # 12 causal pairs
    assert (p.flops, p.bytes_read, p.bytes_written) == (504, 256, 96)
    lin = C.linear("x", 2, 3, 5, 4)
    assert (lin.flops, lin.bytes_read, lin.bytes_written) == (60, 84, 40)
    assert C.intensity(60, 84, 40) == 60 / 124


def test_dense_layer_counts_weights_once():
    e, hidden, H, Hkv, D, inter = 2, 64, 4, 2, 16, 128
    ops = C.dense_layer(1, hidden, H, Hkv, D, inter, e)
    weights = hidden * (H + 2 * Hkv) * D + H * D * hidden + 3 * hidden * inter
    mm = [o for o in ops if o.op.endswith("_proj")]
    assert sum(o.flops for o in mm) == 2 * weights
    # activations read: x by q, k, v, gate, up (5 x hidden), attention output by o, MLP hidden by down
    assert sum(o.bytes_read for o in mm) == e * (weights + hidden * 5 + H * D + inter)


@pytest.mark.parametrize("in_place", [False, True])
def test_quest_step_counts_match_real_tensors(in_place, monkeypatch):
    """Through a real quest pipeline: counted bytes equal the bytes of the tensors the ops touch (Apply
    gathering the selected pages, or reading them in place with the compiled op: then no gather)."""
    from hetmem.ops import fast

    if in_place and not fast.available(torch.zeros(1)):
        pytest.skip(f"compiled ops unavailable: {fast.backend()}")
    if not in_place:
        monkeypatch.setattr(fast, "available", lambda *t: False)
    torch.manual_seed(0)
    B, Hkv, G, D, L, P = 1, 2, 2, 8, 200, 16
    method = get_method("quest", budget=64, page_size=P, dense_layers=0)
    timer = StepTimer()
    counter = StepCounter(timer)
    pipe = counter.wrap(method.pipeline("cpu", timer, layer_idx=0))
    layer = PagedKVLayer(P, pipe, reserve_tokens=L + 1)
    timer.phase = "prefill"
    layer.update(torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D))
    timer.phase = "decode"
    layer.update(torch.randn(B, Hkv, 1, D), torch.randn(B, Hkv, 1, D))
    q = torch.randn(B, Hkv, G, D)
    pipe.query_and_apply(layer.memory, Query(vectors=q), layer, DecodeTarget(q, D**-0.5))

    n_pages = -(-(L + 1) // P)  # 13
    n_cand = n_pages - 1 - 1  # minus the sink and the recent page
    f, br, bw, calls = counter.totals[("relevancy", "decode")]
    assert calls == 1
    assert br == q.nbytes + 2 * B * Hkv * n_cand * D * 4
    assert f == C.quest_upper_bound(B, Hkv, G, n_cand, D, 4).flops
    sel = pipe.select(layer.memory, Query(vectors=q))
    if in_place:  # no gather: Apply reads exactly the selected tokens' K and V
        assert ("apply.gather", "decode") not in counter.totals
        assert timer.phase_calls("apply.gather", "decode") == 0
        assert counter.totals[("apply", "decode")][1] >= 2 * B * Hkv * sel.selected_tokens * D * 4
        return
    # the gather: bytes written = the bytes of the K and V actually gathered
    k, v = gather_selected_kv(layer.buf_k, layer.buf_v, sel.indices, P, L + 1)
    g = counter.totals[("apply.gather", "decode")]
    assert g[2] == k.nbytes + v.nbytes
    assert timer.phase_calls("apply.gather", "decode") == 1  # the sub-step was timed too
    # prefill Prepare: one min and one max per key element
    assert counter.totals[("prepare", "prefill")][0] == 2 * B * Hkv * L * D


def test_substep_is_noop_outside_a_step():
    t = StepTimer()
    with substep("gather"):
        pass
    assert t.names() == []
    with t.step("apply"):
        with substep("gather"):
            pass
    assert t.names() == ["apply", "apply.gather"]
    assert set(t.summary()) == {"prepare", "relevancy", "retrieval", "apply"}  # `hetmem run --json` format kept


def test_seer_and_dsa_ops_hand_computed():
    p = C.block_pool_gate(1, 2, 1, 1, 4, 4, 4)  # one decode token into one block, gate 4x4
    assert (p.flops, p.bytes_read, p.bytes_written) == (80, 192, 64)
    g = C.gated_block_scores(1, 2, 3, 5, 4, 4, 4)
    assert (g.flops, g.bytes_read, g.bytes_written) == (178, 384, 40)
    q, sc = C.lightning_indexer(1, 2, 10, 4, 8)
    assert (q.flops, q.bytes_read, q.bytes_written) == (160, 392, 40)
    assert (sc.flops, sc.bytes_read, sc.bytes_written) == (220, 200, 40)


def test_seer_step_counts_match_real_tensors(monkeypatch):
    from hetmem.ops import fast

    monkeypatch.setattr(fast, "available", lambda *t: False)  # the gather path (the in-place one: quest's test)
    from hetmem.testing import tiny_model

    torch.manual_seed(0)
    model = tiny_model("llama", layers=2)
    method = get_method("seer", budget=64, page_size=16, dense_layers=0)
    method.bind(model)
    timer = StepTimer()
    counter = StepCounter(timer)
    pipe = counter.wrap(method.pipeline("cpu", timer, layer_idx=1))
    B, Hkv, G, D, L = 1, 2, 2, 16, 300
    layer = PagedKVLayer(16, pipe, reserve_tokens=L + 1)
    timer.phase = "decode"
    layer.update(torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D))
    q = torch.randn(B, Hkv, G, D)
    pipe.query_and_apply(layer.memory, Query(vectors=q), layer, DecodeTarget(q, D**-0.5))
    n_cand = -(-L // 16) - 2  # minus sink and recent
    assert counter.totals[("relevancy", "decode")][0] == C.gated_block_scores(B, Hkv, G, n_cand, D, D, 4).flops
    sel = pipe.select(layer.memory, Query(vectors=q))
    k, v = gather_selected_kv(layer.buf_k, layer.buf_v, sel.indices, 16, L)
    assert counter.totals[("apply.gather", "decode")][2] == k.nbytes + v.nbytes
    assert timer.phase_calls("apply.gather", "decode") == 1


def test_ops_cover_every_layer_not_the_last_call(monkeypatch):
    """Two layers (a dense one and a quest one, of different KV lengths) counted by one StepCounter: the
    apply step's per-op tally sums both calls, with each op's call count."""
    from hetmem.ops import fast
    from hetmem.profiling.counters import OpTally

    monkeypatch.setattr(fast, "available", lambda *t: False)  # the gather path, whose op shows in the tally

    torch.manual_seed(0)
    B, Hkv, G, D, P = 1, 2, 2, 8, 16
    method = get_method("quest", budget=64, page_size=P, dense_layers=1)
    timer = StepTimer()
    counter = StepCounter(timer)
    timer.phase = "decode"
    per_layer = []
    for idx, L in ((0, 100), (1, 300)):  # layer 0 is dense (dense_layers=1), layer 1 is quest
        pipe = counter.wrap(method.pipeline("cpu", timer, layer_idx=idx))
        layer = PagedKVLayer(P, pipe, reserve_tokens=L + 1)
        layer.update(torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D))
        q = torch.randn(B, Hkv, G, D)
        before = OpTally().merge(counter.ops.get(("apply", "decode"), OpTally()))
        pipe.query_and_apply(layer.memory, Query(vectors=q), layer, DecodeTarget(q, D**-0.5))
        after = counter.ops[("apply", "decode")]
        per_layer.append({op: after.by_op[op][1] - before.by_op.get(op, [None, 0.0])[1] for op in after.by_op})
    tally = counter.ops[("apply", "decode")]
    f, br, bw, calls = counter.totals[("apply", "decode")]
    assert calls == 2 and tally.total() == (f, br, bw)
    # attention ran in both layers (dense over 100 keys, quest over its budget), the gather only in the quest one
    assert tally.by_op["decode_attention"][4] == 2
    assert per_layer[0]["decode_attention"] > 0 and per_layer[1]["decode_attention"] > 0
    assert tally.by_op["decode_attention"][1] == per_layer[0]["decode_attention"] + per_layer[1]["decode_attention"]
    gather = [op for op in tally.by_op if "gather" in op]
    assert gather and all(tally.by_op[op][4] == 1 for op in gather)
    # the profile's list: per step call (mean over both calls) and the phase sums, with call counts
    ops = tally.as_list(calls)
    assert sum(o["total"]["flops"] for o in ops) == f
    assert abs(sum(o["flops"] for o in ops) - f / 2) < 1e-6 * f
    assert {o["op"]: o["calls"] for o in ops}["decode_attention"] == 2
