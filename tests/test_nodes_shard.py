"""Memory-node sharding and merges, without Ray: the global top-k from per-node candidates is exactly the
in-process selection (ties included), and the log-sum-exp merge of partial attention is attention."""

from __future__ import annotations

import torch

from hetmem.ops.sparse_attention import grouped_decode_attention
from hetmem.ops.topk import budget_page_indices, candidate_range
from hetmem.runtime.nodes.shard import (local_tokens, local_topk, merge_candidates, merge_page_partials, merge_partials,
                                       split_tokens)


def test_split_tokens_by_page_and_local_counts():
    P, N = 4, 3
    segs = split_tokens(2, 19, P, N)
    assert segs == {0: [(2, 4), (12, 16)], 1: [(4, 8), (16, 19)], 2: [(8, 12)]}
    for L in range(0, 40):
        counts = [local_tokens(i, L, P, N) for i in range(N)]
        assert sum(counts) == L
        owned = split_tokens(0, L, P, N)
        assert counts == [sum(b - a for a, b in owned.get(i, [])) for i in range(N)]


def test_merged_candidates_give_the_in_process_selection_with_ties():
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        n = int(torch.randint(5, 60, (1,), generator=g))
        budget, sink, recent = int(torch.randint(3, 12, (1,), generator=g)), 1, 2
        # few distinct values: many ties at the k-th score
        full = torch.randint(0, 4, (2, 3, n), generator=g).float()
        lo, hi = candidate_range(n, sink, recent, budget)
        want = budget_page_indices(full[..., lo:hi], lo, n, budget, sink, recent)
        for N in (1, 2, 3):
            ids, vals = [], []
            for node in range(N):
                local = full[..., node::N]
                i, v = local_topk(local, 0, budget, node, N)
                ids.append(i)
                vals.append(v)
            merged = merge_candidates(ids, vals, lo, hi)
            got = budget_page_indices(merged, lo, n, budget, sink, recent)
            assert torch.equal(got, want), (trial, N)


def test_log_sum_exp_merge_is_attention():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 3, 8, generator=g)
    k = torch.randn(1, 2, 20, 8, generator=g)
    v = torch.randn(1, 2, 20, 8, generator=g)
    sinks = torch.randn(2, 3, generator=g)
    want = grouped_decode_attention(q, k, v, 0.3, sinks=sinks)
    outs, lses = [], []
    for part in (slice(0, 7), slice(7, 20), slice(20, 20)):  # the last node holds nothing selected
        w = (q @ k[:, :, part].transpose(-1, -2)) * 0.3
        lse = torch.logsumexp(w, -1) if w.shape[-1] else torch.full(w.shape[:-1], float("-inf"))
        p = torch.exp(w - lse.unsqueeze(-1))
        outs.append(p @ v[:, :, part])
        lses.append(lse)
    torch.testing.assert_close(merge_partials(outs, lses, sinks), want, rtol=1e-5, atol=1e-6)


def test_page_partials_merge_is_attention_over_exactly_the_selected_pages():
    """The single-round attention layout's merge: per-page partials of more pages than selected (padding -1
    included, a partial last page), merged for a different selection per KV head, equal dense attention masked
    to exactly the selected tokens (with a sink logit); a selected page without a partial gives None."""
    g = torch.Generator().manual_seed(2)
    B, H, G, D, P, n_pages, length = 1, 2, 3, 8, 4, 9, 34  # page 8 holds 2 tokens
    q = torch.randn(B, H, G, D, generator=g)
    k = torch.randn(B, H, n_pages * P, D, generator=g)
    v = torch.randn(B, H, n_pages * P, D, generator=g)
    sinks = torch.randn(H, G, generator=g)
    pages = torch.tensor([[[0, 8, 3, 5, 6, -1], [1, 8, 2, 4, 7, 5]]])  # what the nodes attended, per KV head
    C = pages.shape[-1]
    outs = torch.zeros(B, H, C, G, D)
    lses = torch.full((B, H, C, G), float("-inf"))
    for h in range(H):
        for c in range(C):
            p = int(pages[0, h, c])
            if p < 0:
                continue
            toks = [t for t in range(p * P, (p + 1) * P) if t < length]
            w = (q[0, h] @ k[0, h, toks].T) * 0.3
            lse = torch.logsumexp(w, -1)
            lses[0, h, c] = lse
            outs[0, h, c] = torch.exp(w - lse.unsqueeze(-1)) @ v[0, h, toks]
    selected = torch.tensor([[[0, 3, 8], [2, 5, 8]]])
    got = merge_page_partials(pages, outs, lses, selected, sinks)
    for h in range(H):
        toks = [t for p in selected[0, h].tolist() for t in range(p * P, (p + 1) * P) if t < length]
        want = grouped_decode_attention(q[:, h : h + 1], k[:, h : h + 1, toks], v[:, h : h + 1, toks], 0.3,
                                        sinks=sinks[h : h + 1])
        torch.testing.assert_close(got[:, h : h + 1], want, rtol=1e-5, atol=1e-6)
    assert merge_page_partials(pages, outs, lses, torch.tensor([[[0, 3, 8], [2, 3, 8]]]), sinks) is None


def test_cli_refuses_bad_node_options_in_one_line(tmp_path, capsys):
    from hetmem.cli import main

    ctx = tmp_path / "c.txt"
    ctx.write_text("some context")
    base = ["run", "--method", "quest", "--model", "smollm2", "--context", str(ctx), "--question", "q?"]
    for extra, want in ((["--memory-nodes", "0"], "--memory-nodes must be at least 1"),
                        (["--layout", "kv"], "--layout needs --memory-nodes"),
                        (["--memory-nodes", "2", "--method", "dense"], "runs sparse-attention methods")):
        args = base + extra
        if "--method" in extra:
            args = [a for a in base if a not in ("quest",)]
            args.remove("--method")
            args += extra[:2] + ["--method", "dense"]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("hetmem: error:") and want in err and "\n" not in err, err


def test_node_page_partials_compiled_equals_torch():
    """The memory node's per-page partials (one-round attention layout): the compiled op (``ops.fast.page_partials``,
    pages read in place) equals the torch reference, with padding pages, the partial last page and a soft-cap
    on either node of two; both equal attention over each page's tokens computed directly."""
    import dataclasses

    import numpy as np

    from hetmem.core.timer import StepTimer
    from hetmem.methods import get_method
    from hetmem.ops import fast
    from hetmem.runtime.nodes.node import MemoryNode
    from hetmem.testing import tiny_model

    if not fast.available(torch.zeros(1)):
        import pytest

        pytest.skip("no compiled ops on this machine")
    m = get_method("quest", budget=64, page_size=8, dense_layers=0)
    m.bind(tiny_model(layers=1, max_position_embeddings=1024))
    pipe = m.pipeline("cpu", StepTimer(enabled=False), layer_idx=0)
    rel = dataclasses.replace(pipe.relevancy, sink_pages=0, recent_pages=0, budget_pages=0)
    g = torch.Generator().manual_seed(3)
    H, G, D, L, P, N = 2, 3, 16, 7 * 8 + 5, 8, 2  # 8 global pages striped over 2 nodes; the last one partial
    for node_id, softcap in [(0, None), (1, None), (1, 20.0)]:
        node = MemoryNode(node_id, 1)
        node.call([{"op": "setup", "cache": "c", "layer": 0, "node": node_id, "n_nodes": N, "page_size": P,
                    "store_v": True, "prepare": pipe.prepare, "relevancy": rel}])
        n_loc = sum(1 for p in range(-(-L // P)) if p % N == node_id)
        toks = sum(min(P, L - p * P) for p in range(-(-L // P)) if p % N == node_id)
        k = torch.randn(1, H, toks, D, generator=g)
        v = torch.randn(1, H, toks, D, generator=g)
        node.call([{"op": "append", "cache": "c", "layer": 0, "start": 0, "end": L, "k": k.numpy(), "v": v.numpy()}])
        sh = node.shards[("c", 0)]
        q = torch.randn(1, H, G, D, generator=g)
        pages = torch.tensor([[[0, n_loc - 1, -1, 1], [n_loc - 1, -1, 2, 0]]])
        req = {"scale": 0.25, "softcap": softcap, "length": L, "n_pages": -(-L // P)}
        got_out, got_lse = node._page_partials(sh, q, pages, req)
        ref_out, ref_lse = node._page_partials_torch(sh, q, pages, req)
        torch.testing.assert_close(got_lse, ref_lse, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_out, ref_out, rtol=1e-5, atol=1e-5)
        for h in range(H):  # and directly: local page j holds local tokens j*P .. min((j+1)*P, toks)
            for c, j in enumerate(pages[0, h].tolist()):
                if j < 0:
                    assert torch.isinf(got_lse[0, h, c]).all() and not got_out[0, h, c].any()
                    continue
                t = list(range(j * P, min((j + 1) * P, toks)))
                w = q[0, h] @ k[0, h, t].T * 0.25
                if softcap:
                    w = torch.tanh(w / softcap) * softcap
                torch.testing.assert_close(got_lse[0, h, c], torch.logsumexp(w, -1), rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(got_out[0, h, c], torch.softmax(w, -1) @ v[0, h, t], rtol=1e-5, atol=1e-5)
        assert np.isfinite(got_out.numpy()).all()
