"""Planner: enumeration (with fusion), ranking, the paper prototype example (arXiv 2603.29002), and schedules."""

import pytest

from hetmem.hw.catalog import Catalog
from hetmem.hw.cost import evaluate
from hetmem.hw.planner import enumerate_plans, plan_workload, rank, schedule_from_plans
from hetmem.hw.workloads import design_example, lserve


@pytest.fixture(scope="module")
def cat():
    return Catalog(calibrate_host=False)


def test_enumerates_every_assignment_and_fusion(cat):
    s = cat.system("mi210+u55c")
    plans = enumerate_plans(design_example(), s)
    # prepare, apply: GPU only; relevancy, retrieval: GPU or FPGA -> 4 assignments, + 1 fused (both on the FPGA)
    assert len(plans) == 5
    assert sum(p.fused for p in plans) == 1
    keys = {p.key() for p in plans}
    assert "(mi210,u55c,mi210,mi210)" in keys and "(mi210,u55c,u55c,mi210) fused" in keys


def test_three_device_system_counts(cat):
    s = cat.system("mi210+host")  # host CPU can run all four steps, mi210 all four
    plans = enumerate_plans(design_example(), s)
    assert len(plans) == 2 ** 4  # no fusion on either


def test_ranking_orders_by_objective(cat):
    s = cat.system("mi210+u55c")
    plans = enumerate_plans(lserve(32768), s)
    for obj, f in (("latency", lambda p: p.latency_us), ("energy", lambda p: p.energy_uj), ("edp", lambda p: p.edp)):
        r = rank(plans, obj)
        assert [f(p) for p in r] == sorted(f(p) for p in r)


def test_design_example_reproduced(cat):
    """the paper (arXiv 2603.29002): all-GPU 376.3 us; best (GPU, FPGA, FPGA, GPU) 279.5 us."""
    s = cat.system("mi210+u55c")
    wl = design_example()
    allg = evaluate(wl, s, {k: "mi210" for k in wl.steps})
    assert allg.latency_us == pytest.approx(376.3, abs=0.5)
    unf = evaluate(wl, s, {"prepare": "mi210", "relevancy": "u55c", "retrieval": "u55c", "apply": "mi210"})
    assert unf.latency_us == pytest.approx(279.5, rel=0.03)  # ours 284.6: we also charge the query + block delta to the FPGA
    e = plan_workload(wl, s, "latency")
    assert e["best"]["devices"] == {"prepare": "mi210", "relevancy": "u55c", "retrieval": "u55c", "apply": "mi210"}
    assert e["speedup"] > 1.3


def test_schedule_rules_keyed_on_size(cat):
    s = cat.system("mi210+u55c")
    es = [plan_workload(lserve(L), s, "latency") for L in (8192, 32768, 131072)]
    sch = schedule_from_plans(es, s, "latency")
    rules = sch["rules"]["lserve"]
    assert rules[-1]["max_size"] is None
    assert all(set(r["devices"]) == {"prepare", "relevancy", "retrieval", "apply"} for r in rules)


def test_topk_shape_from_counts():
    from hetmem.hw.cost import OpWork
    from hetmem.hw.workloads import _topk_shape
    from hetmem.ops.counts import topk

    for rows, n, k in ((8, 1023, 62), (1, 16373, 2032), (4, 500, 100)):
        c = topk(rows, n, k)
        op = OpWork("topk", c.flops, c.bytes_read, c.bytes_written)
        assert _topk_shape(op, 1, 8 if rows != 4 else 4) == (rows, n, k)
