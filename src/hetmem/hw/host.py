"""Per-op-class efficiencies and latencies fitted for this host by ``benchmarks/model_accuracy.py --fit``
(a separate micro-benchmark set), cached next to the calibration and keyed by the machine.
``Catalog`` applies them, with the measured calibration, to the host device (``fill_from_calibration``)."""

from __future__ import annotations

import json
from pathlib import Path

from hetmem.hw.calibrate import machine_info
from hetmem.settings import cache_dir


def op_fit_path() -> Path:
    return cache_dir() / "hw-host-opclasses.json"


def machine_key() -> str:
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
