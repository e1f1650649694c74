"""Device/link/system data files: the built-ins load, and bad files fail with one clear line."""

import json

import pytest

from hetmem.errors import HetmemError
from hetmem.hw.catalog import DATA_DIR, Catalog


def _cat(tmp_path, monkeypatch):
    monkeypatch.setenv("HETMEM_HW_DIR", str(tmp_path))
    return Catalog(calibrate_host=False)


def test_builtins_valid(tmp_path, monkeypatch):
    names = _cat(tmp_path, monkeypatch).validate_all()
    for n in ("device host-cpu", "device a100", "device h100", "device mi210", "device u55c",
              "system mi210", "system mi210+u55c", "system a100", "system a100+u55c", "system h100", "link rdma-100g"):
        assert n in names


def _dev(**over):
    d = json.loads((DATA_DIR / "devices" / "mi210.json").read_text())
    d["name"] = "mygpu"
    d.update(over)
    return d


def _write(tmp_path, kind, name, data):
    (tmp_path / kind).mkdir(parents=True, exist_ok=True)
    p = tmp_path / kind / f"{name}.json"
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


@pytest.mark.parametrize("over,msg", [
    ({"mem_bw_gbs": -5}, "'mem_bw_gbs' must be positive"),
    ({"mem_bw_gbs": "fast"}, "'mem_bw_gbs' must be a number"),
    ({"kind": "tpu"}, "field 'kind' must be one of"),
    ({"steps": ["prepare", "dance"]}, "field 'steps' must list"),
    ({"op_classes": {"warp": {"bw_eff": 0.5, "compute_eff": 0.5, "latency_us": 1}}}, "unknown op class 'warp'"),
    ({"op_classes": {"gemv": {"bw_eff": 1.5, "compute_eff": 0.5, "latency_us": 1}}}, "efficiencies must be in (0, 1]"),
    ({"power_w": {"idle": 10}}, "missing field 'power_w.active'"),
])
def test_bad_device_one_line(tmp_path, monkeypatch, over, msg):
    p = _write(tmp_path, "devices", "mygpu", _dev(**over))
    with pytest.raises(HetmemError) as e:
        _cat(tmp_path, monkeypatch).device("mygpu")
    assert msg in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)


def test_figure_without_source_rejected(tmp_path, monkeypatch):
    d = _dev()
    del d["sources"]["mem_bw_gbs"]
    _write(tmp_path, "devices", "mygpu", d)
    with pytest.raises(HetmemError, match="figure 'mem_bw_gbs' has no source"):
        _cat(tmp_path, monkeypatch).device("mygpu")


def _fpga(**over):
    d = json.loads((DATA_DIR / "devices" / "u55c.json").read_text())
    d["name"] = "myfpga"
    d.update(over)
    return d


@pytest.mark.parametrize("drop,over,msg", [
    ("macs_per_cycle", {}, "an fpga device needs 'macs_per_cycle'"),
    ("clock_mhz", {}, "needs 'clock_mhz'"),
    (None, {"macs_per_cycle": 6020}, "macs_per_cycle 6020 x 2 x clock_mhz 250 = 3.01 Top/s, but peak_tflops.int16 is 1.505"),
    (None, {"macs_per_cycle": 0}, "'macs_per_cycle' must be positive"),
])
def test_fpga_needs_its_compute_rate(tmp_path, monkeypatch, drop, over, msg):
    d = _fpga(**over)
    d.pop(drop, None)
    _write(tmp_path, "devices", "myfpga", d)
    with pytest.raises(HetmemError) as e:
        _cat(tmp_path, monkeypatch).device("myfpga")
    assert msg in str(e.value) and "\n" not in str(e.value)
    d = _fpga()
    del d["sources"]["macs_per_cycle"]
    _write(tmp_path, "devices", "myfpga", d)
    with pytest.raises(HetmemError, match="figure 'macs_per_cycle' has no source"):
        _cat(tmp_path, monkeypatch).device("myfpga")
    # a faster FPGA: the rate and the peak agree
    _write(tmp_path, "devices", "myfpga", _fpga(macs_per_cycle=6020, peak_tflops={"int16": 3.01}))
    assert _cat(tmp_path, monkeypatch).device("myfpga").macs_per_cycle == 6020


def test_invalid_json(tmp_path, monkeypatch):
    _write(tmp_path, "devices", "broken", "{not json")
    with pytest.raises(HetmemError, match="not valid JSON"):
        _cat(tmp_path, monkeypatch).device("broken")


def test_user_device_and_system_by_dropping_files(tmp_path, monkeypatch):
    _write(tmp_path, "devices", "mygpu", _dev(mem_bw_gbs=3000.0))
    _write(tmp_path, "systems", "mygpu+u55c", {"name": "mygpu+u55c", "devices": ["mygpu", "u55c"], "baseline": "mygpu",
                                               "links": [{"a": "mygpu", "b": "u55c", "link": "p2p-gpu-fpga"}]})
    s = _cat(tmp_path, monkeypatch).system("mygpu+u55c")
    assert s.devices["mygpu"].mem_bw_gbs == 3000.0 and ("u55c", "mygpu") in s.links


def test_bad_system_references(tmp_path, monkeypatch):
    _write(tmp_path, "systems", "s1", {"name": "s1", "devices": ["mi210", "nodev"], "links": []})
    with pytest.raises(HetmemError, match="unknown device 'nodev'"):
        _cat(tmp_path, monkeypatch).system("s1")
    _write(tmp_path, "systems", "s2", {"name": "s2", "devices": ["mi210"], "links": [{"a": "mi210", "b": "u55c", "link": "p2p-gpu-fpga"}]})
    with pytest.raises(HetmemError, match=r"links\[0\].b names 'u55c', which is not in its devices"):
        _cat(tmp_path, monkeypatch).system("s2")
    with pytest.raises(HetmemError, match="unknown system 'zzz'"):
        _cat(tmp_path, monkeypatch).system("zzz")


def test_bad_piecewise_link(tmp_path, monkeypatch):
    lk = json.loads((DATA_DIR / "links" / "p2p-gpu-fpga.json").read_text())
    lk["name"] = "badlink"
    lk["a_to_b"]["segments"] = [{"up_to": 128, "slope": 0.1, "intercept": 0.1}]
    _write(tmp_path, "links", "badlink", lk)
    with pytest.raises(HetmemError, match="last segment of a_to_b must have up_to null"):
        _cat(tmp_path, monkeypatch).link("badlink")


def test_host_cpu_filled_from_calibration(tmp_path, monkeypatch):
    from hetmem.hw.catalog import fill_from_calibration

    dev = _cat(tmp_path, monkeypatch).device("host-cpu")
    fill_from_calibration(dev, {"copy_gbps": 12.5, "matmul_gflops": 80.0, "measured_at": "x", "source": "measured"})
    assert dev.mem_bw_gbs == 12.5 and dev.peak("float32") == pytest.approx(80e9)
    assert "measured" in dev.sources["mem_bw_gbs"]


def test_toml_device(tmp_path, monkeypatch):
    (tmp_path / "devices").mkdir()
    (tmp_path / "devices" / "tgpu.toml").write_text('''
name = "tgpu"
kind = "gpu"
mem_bw_gbs = 900.0
mem_gb = 24
launch_us = 5.0
steps = ["prepare", "relevancy", "retrieval", "apply"]
[peak_tflops]
fp32 = 30.0
[power_w]
idle = 20.0
active = 280.0
[op_classes.gemv]
bw_eff = 0.6
compute_eff = 0.3
latency_us = 8.0
[sources]
peak_tflops = "a datasheet"
mem_bw_gbs = "a datasheet"
mem_gb = "a datasheet"
launch_us = "assumption"
power_w = "a datasheet"
op_classes = "assumption"
''')
    d = _cat(tmp_path, monkeypatch).device("tgpu")
    assert d.mem_bw_gbs == 900.0 and d.op("gemv").latency_us == 8.0


def test_op_fit_is_keyed_by_the_cores_this_process_may_use(tmp_path, monkeypatch):
    """The fitted op classes are reused only under the same affinity mask (as the calibration), not merely on
    a machine with the same core count."""
    import os

    from hetmem.hw import calibrate, host

    monkeypatch.setenv("HETMEM_CACHE", str(tmp_path))
    monkeypatch.setattr(calibrate.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    host.save_op_fit({"fit": 1})
    assert host.load_op_fit() == {"fit": 1}
    monkeypatch.setattr(calibrate.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert os.cpu_count() == calibrate.machine_info()["cpu_count"]  # same machine, fewer cores available
    assert host.load_op_fit() is None
