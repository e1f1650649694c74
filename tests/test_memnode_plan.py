"""hetmem plan --system host+memnode: the link model's fit, the layouts' bytes and times, the plan and schedule
files (the link calibration is seeded in the cache: no Ray here; tests/test_nodes_ray.py runs a schedule)."""

import json

import pytest

from hetmem.cli import main
from hetmem.hw import memnode
from hetmem.hw.memnode import LinkModel, fit_link, layout_bytes, link_key, save_link

from test_hw_cli import _profile


def test_fit_link_recovers_latency_per_array_and_bandwidth():
    true = {"latency_ms": 0.4, "per_array_ms": 0.02, "ms_per_byte": 1e-6}
    pts = [{"arrays": a, "bytes": b, "ms": true["latency_ms"] + a * true["per_array_ms"] + b * true["ms_per_byte"]}
           for a, b in ((0, 0), (2, 1 << 10), (2, 1 << 20), (64, 1 << 14), (16, 1 << 22))]
    fit = fit_link(pts)
    for k, v in true.items():
        assert fit[k] == pytest.approx(v, rel=1e-6)
    assert fit["mape_pct"] < 1e-6
    m = LinkModel(fit["latency_ms"], fit["per_array_ms"], fit["ms_per_byte"], 2)
    assert m.ms(2, 10, 1e6) == pytest.approx(2 * 0.4 + 10 * 0.02 + 1.0)
    assert m.bandwidth_gbs == pytest.approx(1.0)


def test_fit_link_recovers_the_compute_share():
    true = {"latency_ms": 0.3, "per_array_ms": 0.004, "ms_per_byte": 4e-7, "compute_share": 0.6}
    pts = [{"arrays": a, "bytes": b, "node_ms": w,
            "ms": true["latency_ms"] + a * true["per_array_ms"] + b * true["ms_per_byte"] + w * true["compute_share"]}
           for a, b, w in ((0, 0, 0.0), (2, 1 << 20, 0.0), (64, 1 << 14, 0.0), (8, 1 << 13, 0.5), (8, 1 << 13, 1.0))]
    fit = fit_link(pts)
    for k, v in true.items():
        assert fit[k] == pytest.approx(v, rel=1e-6)
    m = LinkModel(fit["latency_ms"], fit["per_array_ms"], fit["ms_per_byte"], 2, None, fit["compute_share"])
    assert m.ms(1, 8, 1 << 13, 1.0) == pytest.approx(pts[-1]["ms"])


def test_layout_bytes_calls_and_arrays():
    d = dict(kv_heads=2, group=3, head_dim=8, budget_pages=4, page_size=16)
    idx, kv, att = (layout_bytes(x, 2, **d) for x in ("index", "kv", "attention"))
    att2 = layout_bytes("attention", 2, rounds=2, **d)
    assert (idx["calls"], kv["calls"], att["calls"], att2["calls"]) == (1, 2, 1, 2)
    assert kv["to_head"] - idx["to_head"] == 2 * 4 * 16 * 8 * 4 * 2  # the selected pages' K and V
    assert att2["total"] < kv["total"] and idx["arrays"] < att2["arrays"]
    # one round: every node's candidates come back attended (id + [G, D] output + [G] lse each), nothing more goes
    assert att["to_node"] == idx["to_node"] + 2 * 8 * 4  # only the new token's V more than index
    assert att["to_head"] - idx["to_head"] == 2 * 2 * 4 * (8 + 3 * 8 * 4 + 3 * 4)


@pytest.fixture
def seeded_link(tmp_path, monkeypatch):
    monkeypatch.setattr(memnode, "link_cache_path", lambda: tmp_path / "link.json")
    import ray

    import torch

    save_link({"key": link_key(2, ray.__version__, torch.__version__), "source": "measured",
               "measured_at": "2026-11-25T00:00:00Z", "plain_call_ms": 1.5,
               "fit": {"latency_ms": 0.5, "per_array_ms": 0.01, "ms_per_byte": 5e-7, "mape_pct": 3.0}})


def test_plan_memnode_writes_layouts_and_a_runnable_schedule(tmp_path, capsys, seeded_link):
    prof = _profile(tmp_path / "profile.json")
    out = tmp_path / "plan"
    assert main(["plan", "--profile", str(prof), "--system", "host+memnode", "--memory-nodes", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "MODELLED" in text and "500 us per call" in text
    plan = json.loads((out / "plan.json").read_text())
    assert plan["link"]["cached"] and plan["link"]["measured_at"] == "2026-11-25T00:00:00Z" and plan["link"]["key"]["n_nodes"] == 2
    e = plan["entries"][0]
    assert set(e["layouts"]) == {"in-process", "index", "kv", "attention"}
    lay = e["layouts"]
    assert lay["kv"]["calls_per_layer"] == 2 and lay["index"]["link_us"] == pytest.approx(
        120 / 4 * (0.5 + 0.01 * layout_bytes("index", 2, **_dims())["arrays"] + 5e-7 * lay["index"]["bytes_per_layer"]) * 1e3,
        rel=1e-3)
    assert e["best_layout"] == min(("index", "kv", "attention"), key=lambda x: lay[x]["latency_us"])
    sch = json.loads((out / "schedule.json").read_text())
    assert sch["system"] == "host+memnode" and sch["rules"]["quest"][0]["layout"] == e["best_layout"]
    assert sch["rules"]["quest"][0]["memory_nodes"] == 2
    capsys.readouterr()
    assert main(["plan", "--paper", "--system", "host+memnode", "--out", str(tmp_path / "p2")]) == 2
    assert "give --profile" in capsys.readouterr().err


def _dims():
    from hetmem.methods import get_method

    m = get_method("quest")
    return dict(kv_heads=8, group=4, head_dim=128, budget_pages=m.budget_pages, page_size=m.page_size)


def test_devices_lists_the_memnode_system(capsys):
    from hetmem.cli import main

    assert main(["devices"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "host+memnode" in ln)
    assert "--system host+memnode" in line and "attention" in line
