"""The executor: run a method with each step on the backend its placement names.

A placement comes from a ``schedule.json`` (``hetmem plan`` writes one; it can be hand written):
rules per method keyed on problem size (context tokens) -> a device per step. A device name is
mapped to a backend:

    cpu / host-cpu / memnode (emulated on the host)  -> cpu
    cuda / any gpu device (mi210, a100, h100, ...)   -> cuda when a CUDA device is present, else cpu (said so)
    fpga-emu / any fpga device (u55c)                -> fpga-emu: the emulated FPGA kernels (ops.fpga_emu)

cpu and cuda steps are timed (*measured*); fpga-emu steps run on the host for their function and
their time is *modelled* from the emulator's cycle count and the FPGA device file. The run record
says, per step, which device and backend ran it and whether its time is measured or modelled.
Transfers between devices are not emulated here (``hetmem plan`` models them).
"""

from __future__ import annotations

from pathlib import Path

import torch

from hetmem.core.steps import STEP_NAMES
from hetmem.errors import HetmemError
from hetmem.files import read_json_file
from hetmem.hw.catalog import Catalog
from hetmem.runtime.fpga_steps import FPGA_STEPS
from hetmem.runtime.fpga_steps import ModelLedger

BACKENDS = ("cpu", "cuda", "fpga-emu")


def read_schedule(path: str | Path) -> dict:
    data = read_json_file(path, "placement file")
    if not isinstance(data, dict) or not isinstance(data.get("rules"), dict):
        raise HetmemError(f"placement file {path} has no 'rules' object (method -> list of size rules)")
    for m, rules in data["rules"].items():
        if not isinstance(rules, list) or not rules:
            raise HetmemError(f"placement file {path}: rules for '{m}' must be a non-empty list")
        for i, r in enumerate(rules):
            if not isinstance(r, dict) or not isinstance(r.get("devices"), dict):
                raise HetmemError(f"placement file {path}: rules.{m}[{i}] needs a 'devices' object (step -> device)")
            bad = [s for s in r["devices"] if s not in STEP_NAMES]
            if bad:
                raise HetmemError(f"placement file {path}: rules.{m}[{i}] names unknown step(s) {bad}")
            ms = r.get("max_size")
            if ms is not None and (not isinstance(ms, int) or ms < 1):
                raise HetmemError(f"placement file {path}: rules.{m}[{i}].max_size must be a positive integer or null")
    return data


def pick_rule(schedule: dict, method: str, size: int) -> dict:
    rules = schedule["rules"].get(method)
    if rules is None:
        raise HetmemError(f"the placement has no rules for method '{method}' (it has: {', '.join(schedule['rules'])})")
    for r in rules:
        if r.get("max_size") is None or size <= r["max_size"]:
            return r
    return rules[-1]


def backend_of(device: str, cuda_ok: bool | None = None) -> tuple[str, str]:
    """(backend, note) for a device name of a placement."""
    cuda_ok = torch.cuda.is_available() if cuda_ok is None else cuda_ok
    if device in BACKENDS:
        if device == "cuda" and not cuda_ok:
            return "cpu", "no CUDA device here: ran on cpu"
        return device, ""

    cat = Catalog(calibrate_host=False)
    if device not in cat.files["devices"]:
        raise HetmemError(f"placement names unknown device '{device}': use cpu, cuda, fpga-emu or one of "
                          f"{', '.join(cat.names('devices'))}")
    kind = cat.device(device).kind
    if kind == "fpga":
        return "fpga-emu", f"{device} emulated (ops.fpga_emu), time modelled"
    if kind == "gpu":
        return ("cuda", "") if cuda_ok else ("cpu", f"no CUDA device here: {device}'s step ran on cpu (measured)")
    if kind == "memnode":
        return "cpu", f"{device} emulated by the host CPU"
    return "cpu", ""


class PlacedMethod:
    """A method whose pipelines put each step on its placed backend (everything else is the method's)."""

    def __init__(self, method, backends: dict[str, str], ledger, fpga_device=None):
        self._method = method
        self._backends = backends
        self._ledger = ledger

    def __getattr__(self, name):
        return getattr(self._method, name)

    def pipeline(self, device, timer, **kw):
        pipe = self._method.pipeline(device, timer, **kw)
        for role in STEP_NAMES:
            step = getattr(pipe, role)
            if step is None:
                continue
            be = self._backends.get(role)
            if be is None:
                continue
            if be == "fpga-emu":
                entry = FPGA_STEPS.get(type(step).__name__)
                if entry is None or entry[0] != role:
                    raise HetmemError(f"{self._method.name}'s {role} step ({type(step).__name__}) has no fpga-emu kernel; "
                                      f"place it on cpu or cuda")
                setattr(pipe, role, entry[1](step, self._ledger, timer))
            else:
                want = "cuda" if be == "cuda" else "cpu"
                if not str(device).startswith(want):
                    raise HetmemError(f"{role} placed on {be} but the model runs on {device}: run with --device "
                                      f"{want}, or place it on {str(device).split(':')[0]}")
                step.device = device
        return pipe


def place(method, rule: dict) -> tuple[PlacedMethod, dict, object]:
    placement, backends = {}, {}
    for step, dev in rule["devices"].items():
        be, note = backend_of(dev)
        backends[step] = be
        placement[step] = {"device": dev, "backend": be, "time_source": "modelled" if be == "fpga-emu" else "measured",
                           **({"note": note} if note else {})}
    fdev = Catalog(calibrate_host=False).device("u55c")
    for step, dev in rule["devices"].items():
        if backends[step] == "fpga-emu" and dev not in BACKENDS:
            fdev = Catalog(calibrate_host=False).device(dev)
    fused = bool(rule.get("fused_relevancy_retrieval")) and backends.get("relevancy") == backends.get("retrieval") == "fpga-emu"
    ledger = ModelLedger(device=fdev, fused=fused)
    if fused:
        placement["retrieval"]["note"] = ("fused with relevancy on the FPGA: its modelled time is only what the streaming "
                                          "top-k adds beyond the scoring it overlaps")
    return PlacedMethod(method, backends, ledger), placement, ledger


def apply_ledger(rec: dict, placement: dict, ledger) -> dict:
    """Replace fpga-emu steps' measured emulation time with their modelled time; label every step."""
    emu = {}
    for step, info in placement.items():
        s = rec["steps"].get(step)
        if s is None:
            continue
        if info["backend"] == "fpga-emu":
            emu_ms = {ph: p["ms"] for ph, p in s["phases"].items()}
            for ph, p in s["phases"].items():
                p["emulation_wall_ms"] = p["ms"]
                p["ms"] = round(ledger.us.get((step, ph), 0.0) / 1e3, 4)
            s["ms"] = round(sum(p["ms"] for p in s["phases"].values()), 4)
            s["source"] = "modelled"
            s["device"] = info["device"]
            emu[step] = emu_ms
        else:
            s["source"] = "measured"
            s["device"] = f"{info['device']} ({info['backend']})" if info["device"] != info["backend"] else info["backend"]
    for ph in ("prefill", "decode"):
        key = f"{ph}_ms"
        if key in rec:
            swap = sum(rec["steps"][st]["phases"].get(ph, {}).get("ms", 0.0) - emu[st].get(ph, 0.0) for st in emu)
            rec[f"{ph}_ms_fpga_modelled"] = round(rec[key] + swap, 3)
    rec["placement"] = placement
    rec["time_source"] = ("mixed: steps on cpu/cuda measured, fpga-emu steps modelled; "
                          "prefill_ms/decode_ms are measured host wall time (including the emulation); "
                          "*_ms_fpga_modelled replace the emulation's wall time with the modelled FPGA time")
    return rec


def placement_table(rec: dict) -> str:
    lines = ["Per-step placement and time (summed over layers; source says measured on this machine or modelled)",
             f"{'step':<10} {'device (backend)':<28} {'prefill ms':>11} {'decode ms':>11} {'calls':>7}  source"]
    for step in STEP_NAMES:
        s = rec["steps"].get(step)
        if s is None or not s.get("calls"):
            continue
        pl = rec["placement"].get(step, {})
        dev = f"{pl.get('device', s.get('device'))} ({pl.get('backend', '?')})"
        pre = s["phases"].get("prefill", {}).get("ms", 0.0)
        dec = s["phases"].get("decode", {}).get("ms", 0.0)
        lines.append(f"{step:<10} {dev:<28} {pre:>11.3f} {dec:>11.3f} {s['calls']:>7}  {s['source']}")
    lines.append(f"end-to-end (measured, incl. emulation): prefill {rec['prefill_ms']:.1f} ms, decode {rec['decode_ms']:.1f} ms; "
                 f"with fpga-emu steps at their modelled time: decode {rec.get('decode_ms_fpga_modelled', rec['decode_ms']):.1f} ms")
    notes = [f"  {k}: {v['note']}" for k, v in rec["placement"].items() if v.get("note")]
    return "\n".join(lines + (["notes:"] + notes if notes else []))
