"""The host CPU device, filled from the profiler's *measured* calibration.

``hetmem.hw.calibrate.calibrate("cpu", "float32")`` gives copy bandwidth (bytes read +
written per second) and fp32 matmul throughput on this machine (cached per machine). Those replace
the fallback figures of ``data/devices/host-cpu.json``. Per-op-class efficiencies and latencies
for this host can be fitted by ``benchmarks/model_accuracy.py --fit`` (a separate micro-benchmark
set); the fit is cached next to the calibration and loaded here when present.
"""

from __future__ import annotations

import json
from pathlib import Path

from hetmem.hw.catalog import Device, OpClass


def op_fit_path() -> Path:
    from hetmem.llm.models import cache_dir

    return cache_dir() / "hw-host-opclasses.json"


def machine_key() -> str:
    from hetmem.hw.calibrate import machine_info

    return machine_info("cpu")["key"]


def load_op_fit() -> dict | None:
    p = op_fit_path()
    try:
        return json.loads(p.read_text()).get(machine_key())
    except (OSError, ValueError, ImportError):
        return None


def save_op_fit(fit: dict) -> Path:
    p = op_fit_path()
    data = {}
    if p.exists():
        try:
            data = json.loads(p.read_text())
        except ValueError:
            data = {}
    data[machine_key()] = fit
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=1))
    return p


def fill_from_calibration(dev: Device, calibration: dict | None = None) -> Device:
    """Overwrite the host device's bandwidth and peaks with measured figures (in place)."""
    try:
        if calibration is None:
            from hetmem.hw.calibrate import calibrate

            calibration = calibrate("cpu", "float32")
    except Exception as exc:  # no calibration module or it failed: keep the file's fallback, say so
        dev.note = (f"host-cpu: no measured calibration ({type(exc).__name__}: {exc}); using the fallback "
                    f"figures in {dev.path}")
        return dev
    nominal_fp32 = dev.peak_tflops.get("fp32", 1.0)
    fp32 = calibration["matmul_gflops"] / 1e3
    dev.peak_tflops = {k: v * fp32 / nominal_fp32 for k, v in dev.peak_tflops.items()}
    dev.peak_tflops["fp32"] = fp32
    dev.mem_bw_gbs = float(calibration["copy_gbps"])
    dev.calibration = {k: calibration.get(k) for k in ("copy_gbps", "matmul_gflops", "measured_at", "source")}
    dev.sources["mem_bw_gbs"] = f"measured on this machine (hetmem.hw.calibrate, {calibration.get('measured_at')})"
    dev.sources["peak_tflops"] = "measured fp32 matmul on this machine; other dtypes scaled from the file's ratios"
    fit = load_op_fit()
    if fit:
        for cls, oc in fit.get("op_classes", {}).items():
            dev.op_classes[cls] = OpClass(oc["bw_eff"], oc["compute_eff"], oc["latency_us"])
        dev.sources["op_classes"] = f"fitted on this machine by benchmarks/model_accuracy.py --fit ({fit.get('fitted_at')})"
    return dev
