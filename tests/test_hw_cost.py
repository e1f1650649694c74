"""Cost model: hand-computed cases, the P2P piecewise link, fusion, transfers and energy."""

import math

import pytest

from hetmem.hw.catalog import Catalog
from hetmem.hw.cost import OpWork, StepWork, Workload, evaluate, op_time_us, streaming_topk_cycles


@pytest.fixture(scope="module")
def cat():
    return Catalog(calibrate_host=False)


def test_p2p_piecewise(cat):
    lk = cat.link("p2p-gpu-fpga")
    # GPU -> FPGA, 64 KB: bw = 0.0572196*64 + 0.146989 GB/s
    bw = 0.0572196 * 64 + 0.146989
    assert lk.transfer_us(64 * 1024, forward=True) == pytest.approx(64 * 1024 / (bw * 1e9) * 1e6)
    assert lk.transfer_us(1 << 20, forward=True) == pytest.approx((1 << 20) / 4.0e9 * 1e6)  # > 128 KB: 4 GB/s
    # FPGA -> GPU: three pieces
    assert lk.transfer_us(256, forward=False) == pytest.approx(256 / ((0.04026109 * 0.25 + 0.263686) * 1e9) * 1e6)
    kb = 1024
    assert lk.transfer_us(kb * 1024, forward=False) == pytest.approx(kb * 1024 / ((3.5729e-5 * kb + 4.135097) * 1e9) * 1e6)
    assert lk.transfer_us(100 << 20, forward=False) == pytest.approx((100 << 20) / 6.09e9 * 1e6)
    # small transfers are latency bound: 256 B of top-k ids take ~0.9 us
    assert 0.85 < lk.transfer_us(256, forward=False) < 1.0


def test_roofline_op_hand_computed(cat):
    dev = cat.device("a100")
    oc = dev.op("gemv")
    op = OpWork("gemv", flops=2e6, bytes_read=8e6, bytes_written=0)
    want = max(8e6 / (1555e9 * oc.bw_eff), 2e6 / (19.5e12 * oc.compute_eff)) * 1e6 + oc.latency_us
    assert op_time_us(op, dev, "float32") == pytest.approx(want)
    # compute bound at fp16 matmul
    mm = OpWork("matmul", flops=1e12, bytes_read=1e6)
    oc = dev.op("matmul")
    assert op_time_us(mm, dev, "float16") == pytest.approx(1e12 / (312e12 * oc.compute_eff) * 1e6 + oc.latency_us)


def test_streaming_topk_model(cat):
    # top-64 of 8192: 512 scan + 64 fill + 6 * 64 ln(128) insert cycles at 250 MHz
    cyc = streaming_topk_cycles(8192, 64)
    assert cyc == pytest.approx(512 + 64 + 6 * 64 * math.log(128))
    dev = cat.device("u55c")
    t = op_time_us(OpWork("topk", bytes_read=8192 * 4, bytes_written=256, n=8192, k=64), dev, "int16")
    assert t == pytest.approx(cyc / 250e6 * 1e6 + 0.2)
    assert abs(t - 10.1) < 0.5  # the prototype's FPGA model: 10.1 us


def _wl():
    rel = StepWork("relevancy", [OpWork("gemv", flops=1e6, bytes_read=1 << 20, bytes_written=4096)], "float16", out_bytes=4096)
    ret = StepWork("retrieval", [OpWork("topk", flops=1024, bytes_read=4096, bytes_written=256, n=1024, k=64)], "float16", out_bytes=256)
    app = StepWork("apply", [OpWork("attention", flops=1e6, bytes_read=1 << 20)], "float16", out_bytes=256)
    return Workload("t", 1024, {"relevancy": rel, "retrieval": ret, "apply": app}, query_bytes=512)


def test_transfer_charged_when_input_elsewhere(cat):
    s = cat.system("mi210+u55c")
    lk = cat.link("p2p-gpu-fpga")
    wl = _wl()
    p = evaluate(wl, s, {"relevancy": "mi210", "retrieval": "u55c", "apply": "mi210"})
    assert p.transfer_us["relevancy"] == 0
    assert p.transfer_us["retrieval"] == pytest.approx(lk.transfer_us(4096, True))  # scores GPU -> FPGA
    assert p.transfer_us["apply"] == pytest.approx(lk.transfer_us(256, False))  # selection FPGA -> GPU
    assert p.latency_us == pytest.approx(sum(p.step_us.values()) + sum(p.transfer_us.values()))
    allg = evaluate(wl, s, {"relevancy": "mi210", "retrieval": "mi210", "apply": "mi210"})
    assert sum(allg.transfer_us.values()) == 0


def test_fused_counts_only_bytes_leaving(cat):
    s = cat.system("mi210+u55c")
    wl = _wl()
    d = {"relevancy": "u55c", "retrieval": "u55c", "apply": "mi210"}
    unf, fus = evaluate(wl, s, d, fused=False), evaluate(wl, s, d, fused=True)
    dev = s.devices["u55c"]
    bw = dev.mem_bw_gbs * 1e9 * 0.85
    t_rel = (1 << 20) / bw * 1e6  # scores are not written
    t_ret = streaming_topk_cycles(1024, 64) / 250e6 * 1e6  # scores not re-read
    assert fus.step_us["relevancy"] == pytest.approx(max(t_rel, t_ret) + 0.2)
    assert fus.step_us["retrieval"] == 0 and fus.latency_us < unf.latency_us


def test_energy_formula(cat):
    s = cat.system("mi210+u55c")
    p = evaluate(_wl(), s, {"relevancy": "u55c", "retrieval": "u55c", "apply": "mi210"})
    g, f = s.devices["mi210"], s.devices["u55c"]
    want = (g.idle_w * p.latency_us + g.active_w * p.busy_us["mi210"]) + (f.idle_w * p.latency_us + f.active_w * p.busy_us["u55c"])
    assert p.energy_uj == pytest.approx(want)
