"""Emulated FPGA kernels against the float references (differences only at quantisation ties)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hetmem.hw.cost import fpga_modelled_us
from hetmem.ops import fpga_emu
from hetmem.ops.page_score import quest_upper_bound
from hetmem.ops.topk import topk_indices


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 300), st.integers(1, 40), st.integers(0, 10_000))
def test_streaming_topk_is_stable_topk(rows, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(-20, 20, (rows, n), generator=g)  # many ties on purpose
    got, cyc = fpga_emu.streaming_topk(s, k)
    assert torch.equal(got, fpga_emu.topk_reference_stable(s, k))
    kk = min(k, n)
    assert cyc.cycles >= rows * (-(-n // 16) + kk)


def test_streaming_topk_matches_float_topk_without_ties():
    s = torch.randn(8, 4096)
    got, cyc = fpga_emu.streaming_topk(s, 64)
    assert torch.equal(got, topk_indices(s, 64))
    # one row of 8,192 random scores: the emulator's cycle count is close to the cost model's expectation
    from hetmem.hw.cost import streaming_topk_cycles

    _, c1 = fpga_emu.streaming_topk(torch.randn(1, 8192), 64)
    assert abs(c1.cycles / streaming_topk_cycles(8192, 64) - 1) < 0.25


def _boundary_ok(float_scores, sel_a, sel_b, tol):
    """Selections may differ only in units whose float score is within ``tol`` of the k-th largest."""
    for r in range(float_scores.shape[0]):
        a, b = set(sel_a[r].tolist()), set(sel_b[r].tolist())
        if a == b:
            continue
        kth = float_scores[r, sel_b[r]].min()
        for u in a ^ b:
            assert abs(float(float_scores[r, u]) - float(kth)) <= tol, (r, u)


def test_int16_quest_selection_matches_float_reference():
    torch.manual_seed(0)
    B, H, G, N, D, k = 1, 4, 4, 512, 64, 32
    q = torch.randn(B, H, G, D)
    keys = torch.randn(B, H, N, 16, D)
    kmin, kmax = keys.amin(3), keys.amax(3)
    ref = quest_upper_bound(q, kmin, kmax)
    ui, scale, cyc = fpga_emu.quest_upper_bound_int16(q, kmin, kmax)
    # quantisation error bound: D products of two int16 roundings per term
    tol = 2 * D * (float(q.abs().max()) * float(kmax.abs().max().clamp(min=kmin.abs().max())) / 32767) * 2
    assert (ui * scale - ref).abs().max() <= tol
    sel_f = topk_indices(ref.reshape(H, N), k)
    sel_q, _ = fpga_emu.streaming_topk(ui.reshape(H, N), k)
    _boundary_ok(ref.reshape(H, N), sel_q, sel_f, 2 * tol)
    agree = np.mean([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(sel_q, sel_f)])
    assert agree > 0.95


def test_gemv_int16():
    torch.manual_seed(1)
    q, keys = torch.randn(128), torch.randn(1000, 128)
    s, scale, _ = fpga_emu.gemv_int16(q, keys)
    assert torch.allclose(s * scale, keys @ q, atol=0.02)


def test_threshold_bitmap_words_of_128():
    torch.manual_seed(2)
    s = torch.randn(3, 300)
    packed, bits, cyc = fpga_emu.threshold_bitmap_128(s, 0.5)
    assert packed.shape == (3, 3, 16) and packed.dtype == torch.uint8
    assert torch.equal(bits, s >= 0.5)
    assert torch.equal(fpga_emu.unpack_bitmap_128(packed, 300), s >= 0.5)
    assert cyc.cycles == 3 * 3 * 8  # one 128-key word takes 8 cycles at 16 compares per cycle
    # quantised scores against a quantised threshold: differences only within one quantum of it
    qi, sc = fpga_emu.quantize_int16(s)
    _, qbits, _ = fpga_emu.threshold_bitmap_128(qi, round(0.5 / sc))
    diff = qbits ^ (s >= 0.5)
    assert bool(((s[diff] - 0.5).abs() <= sc).all())


def test_bm25_16_lanes_matches_float():
    from hetmem.ops.bm25 import bm25_scores, build_bm25, tokenize

    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(200)]
    docs = [" ".join(rng.choice(words, size=rng.integers(5, 40))) for _ in range(400)]
    stats = build_bm25([tokenize(d) for d in docs], k1=1.2, b=0.0)
    terms = stats.term_ids(tokenize("w1 w5 w17 w42 w99"))
    ref = bm25_scores(stats, terms)
    si, scale, cyc = fpga_emu.bm25_int16(stats.weights, terms)
    assert np.abs(si * scale - ref).max() <= len(terms) * scale
    posts = sum(stats.weights.indptr[t + 1] - stats.weights.indptr[t] for t in terms)
    assert cyc.cycles == sum(-(-(stats.weights.indptr[t + 1] - stats.weights.indptr[t]) // 16) for t in terms) and posts > 0
    k = 20
    sel_q, _ = fpga_emu.streaming_topk(torch.from_numpy(si)[None], k)
    sel_f = fpga_emu.topk_reference_stable(torch.from_numpy(ref)[None], k)
    _boundary_ok(torch.from_numpy(ref)[None], sel_q, sel_f, 2 * len(terms) * scale)


def test_index_scores_int16_matches_float():
    from hetmem.ops.index_score import index_scores

    torch.manual_seed(3)
    q, w, k = torch.randn(1, 16, 64), torch.rand(1, 16), torch.randn(1, 500, 64)
    s, scale, cyc = fpga_emu.index_scores_int16(q, w, k)
    ref = index_scores(q, w, k)
    assert (s * scale - ref).abs().max() < 1e-2 * ref.abs().max()
    sel_q, _ = fpga_emu.streaming_topk(s, 50)
    sel_f = fpga_emu.topk_reference_stable(ref, 50)
    _boundary_ok(ref, sel_q, sel_f, 2e-2 * float(ref.abs().max()))


def test_ledger_fused_charges_only_the_topk_beyond_scoring():
    from hetmem.runtime.fpga_steps import ModelLedger

    rel, ret = fpga_emu.FpgaCycles(cycles=1000, hbm_bytes=0), fpga_emu.FpgaCycles(cycles=3000, hbm_bytes=0)
    unf, fus = ModelLedger(), ModelLedger(fused=True)
    for led in (unf, fus):
        led.charge("relevancy", "decode", rel)
        led.charge("retrieval", "decode", ret)
    lat = fpga_modelled_us(fpga_emu.FpgaCycles())
    assert unf.us[("retrieval", "decode")] == pytest.approx(3000 / 250 + lat)
    assert fus.us[("retrieval", "decode")] == pytest.approx((3000 - 1000) / 250)  # 250 cycles per us at 250 MHz
    assert fus.us[("relevancy", "decode")] == unf.us[("relevancy", "decode")]


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 40), st.integers(1, 12), st.integers(0, 2), st.integers(1, 3), st.integers(0, 10_000))
def test_fpga_page_topk_is_the_one_budget_assembly(n, budget, sink, recent, seed):
    """The fpga-emu retrieval is ops.topk.budget_page_indices with the streaming unit as its ranker."""
    from hetmem.core.timer import StepTimer
    from hetmem.core.types import Memory, Scores
    from hetmem.methods.quest import PageBudgetTopK
    from hetmem.ops.topk import budget_page_indices, candidate_range
    from hetmem.runtime.fpga_steps import FpgaPageBudgetTopK, ModelLedger

    lo, hi = candidate_range(n, sink, recent, budget)
    vals = torch.randint(-5, 5, (1, 2, hi - lo), generator=torch.Generator().manual_seed(seed)).double()  # ties
    mem = Memory(kind="page-minmax", n_units=n, unit_size=16, meta={"length": 16 * n})
    ledger = ModelLedger()
    sel = FpgaPageBudgetTopK(PageBudgetTopK(budget, sink, recent), ledger, StepTimer()).select(Scores(vals, lo), mem)
    ref = budget_page_indices(vals, lo, n, budget, sink, recent, topk=fpga_emu.topk_reference_stable)
    assert torch.equal(sel.indices, ref)
    r = min(recent, n, budget)
    k = budget - r - min(sink, n - r, budget - r)  # the ranked part of the budget
    want = fpga_emu.streaming_topk(vals, k)[1].cycles if budget < n and k > 0 else 0.0  # the unit's cycles, charged
    assert ledger.cycles[("retrieval", "prefill")] == want


def test_fpga_compute_rate_comes_from_the_device_file():
    import dataclasses

    from hetmem.hw.catalog import Catalog

    dev = Catalog(calibrate_host=False).device("u55c")
    lat = dev.op("gemv").latency_us
    cyc = fpga_emu.FpgaCycles(macs=dev.macs_per_cycle * 1000)  # 1,000 cycles of the scoring array
    assert fpga_modelled_us(cyc, dev) == pytest.approx(1000 / dev.clock_mhz + lat)
    slower = dataclasses.replace(dev, macs_per_cycle=dev.macs_per_cycle / 2)
    assert fpga_modelled_us(cyc, slower) == pytest.approx(2000 / dev.clock_mhz + lat)
    # a scoring kernel counts MACs, not cycles: its time follows the device's rate
    _, _, c = fpga_emu.gemv_int16(torch.randn(1, 2, 64), torch.randn(1, 2, 4096, 64))
    assert c.macs == 2 * 4096 * 64 and c.cycles == 0


def test_ledger_transfers_take_the_link_direction_and_skip_on_chip_peers():
    from hetmem.hw.catalog import Catalog
    from hetmem.runtime.fpga_steps import ModelLedger

    link = Catalog(calibrate_host=False).link("p2p-gpu-fpga")  # a = GPU, b = FPGA; asymmetric
    led = ModelLedger(on_fpga=frozenset({"relevancy", "retrieval"}), link=(link, True))
    led.move("relevancy", "decode", 1 << 20, "model", to_fpga=True)
    led.move("retrieval", "decode", 1 << 20, "apply", to_fpga=False)
    led.move("retrieval", "decode", 1 << 20, "relevancy", to_fpga=True)  # scores stay on the FPGA
    assert led.xfer_us[("relevancy", "decode")] == pytest.approx(link.transfer_us(1 << 20, True))
    assert led.xfer_us[("retrieval", "decode")] == pytest.approx(link.transfer_us(1 << 20, False))
    assert link.transfer_us(1 << 20, True) != link.transfer_us(1 << 20, False)
    assert led.xfers[("retrieval", "decode")] == 1 and led.xfer_bytes[("retrieval", "decode")] == 1 << 20
