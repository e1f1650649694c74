"""The executor: run a method with each step on the backend its placement names.

A placement comes from a ``schedule.json`` (``hetmem plan`` writes one; it can be hand written):
rules per method keyed on problem size (context tokens) -> a device per step. A device name is
mapped to a backend:

    cpu / host-cpu / memnode (emulated on the host)  -> cpu
    cuda / any gpu device (mi210, a100, h100, ...)   -> cuda when a CUDA device is present, else cpu (said so)
    fpga-emu / any fpga device (u55c)                -> fpga-emu: the emulated FPGA kernels (ops.fpga_emu)

A step runs on a backend through the implementation registered for its kind there
(``hetmem.core.registry``): on cpu and cuda the method's own step, on fpga-emu the emulated kernel
of ``runtime/fpga_steps.py``. A kind with no implementation on the placed backend is refused.

cpu and cuda steps are timed (*measured*); fpga-emu steps run on the host for their function and
their time is *modelled* from the emulator's counts and the FPGA device file. The run record
says, per step, which device and backend ran it and whether its time is measured or modelled.
Data crossing between the host (or GPU) and the FPGA is not moved for real here: its time is
*modelled* over the catalogue's link between the device the model runs on and the FPGA, and added
to ``*_ms_fpga_modelled`` (``fpga_modelled`` in the record says what those figures include).
"""

from __future__ import annotations

from pathlib import Path

import torch

from hetmem.core.registry import devices_for, impl_for
from hetmem.core.steps import STEP_NAMES
from hetmem.errors import HetmemError
from hetmem.files import read_json_file
from hetmem.hw.catalog import Catalog
from hetmem.runtime.fpga_steps import ModelLedger  # importing fpga_steps registers the fpga-emu kernels

BACKENDS = ("cpu", "cuda", "fpga-emu")
PHASES = ("prefill", "decode")


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
        if self._ledger.on_fpga and self._ledger.link_info is None:
            connect_link(self._ledger, device)
        for role in STEP_NAMES:
            step = getattr(pipe, role)
            be = self._backends.get(role)
            if step is not None and be is not None:
                setattr(pipe, role, self._implement(role, step, be, device, timer))
        self._send_memory(pipe, timer)
        return pipe

    def _implement(self, role: str, step, backend: str, device, timer):
        """The step of ``role`` on ``backend``: the registered implementation of the step's kind there."""
        kind = getattr(step, "kind", None)
        impl = impl_for(kind, backend)
        if impl is None or impl.role != role:
            where = " or ".join(devices_for(kind)) or "no device (its class declares no kind: hetmem.core.registry)"
            raise HetmemError(f"{self._method.name}'s {role} step ({kind or type(step).__name__}) has no {backend} "
                              f"kernel; place it on {where}")
        if isinstance(step, impl):  # the method's own step: it runs where the model runs
            want = "cuda" if backend == "cuda" else "cpu"
            if not str(device).startswith(want):
                raise HetmemError(f"{role} placed on {backend} but the model runs on {device}: run with --device "
                                  f"{want}, or place it on {str(device).split(':')[0]}")
            step.device = device
            return step
        return impl(step, self._ledger, timer)  # another device's kernel, built from the method's step

    def _send_memory(self, pipe, timer) -> None:
        """A relevancy kernel on the FPGA reads Memory that Prepare writes off it: as each Prepare call
        returns (outside its measured time), the units it wrote are charged as a transfer to the FPGA."""
        sync = getattr(pipe.relevancy, "memory_sync_bytes", None)
        if sync is None or pipe.prepare is None:
            return
        build, ledger, state = pipe.build, self._ledger, {"memory": None, "length": 0}

        def build_and_send(raw, memory=None):
            mem = build(raw, memory)
            if mem is not None:
                if mem is not state["memory"]:
                    state["memory"], state["length"] = mem, 0
                ledger.move("relevancy", timer.phase, sync(mem, state["length"]), "prepare", to_fpga=True)
                state["length"] = mem.meta["length"]
            return mem

        pipe.build = build_and_send


def connect_link(ledger: ModelLedger, model_device) -> None:
    """Give the ledger the catalogue's link between where the model runs and the FPGA: the link of the first
    system (by name) whose inference device is of that kind (gpu for cuda, else cpu) and holds the FPGA."""
    fpga = ledger.device.name
    want = "gpu" if str(model_device).startswith("cuda") else "cpu"
    cat = Catalog(calibrate_host=False)
    unreadable = []
    for name in cat.names("systems"):
        try:
            system = cat.system(name)
        except HetmemError:  # a broken system file fails the commands that use it; here it is named below
            unreadable.append(name)
            continue
        inf = system.inference
        lk = system.link(inf, fpga) if system.devices[inf].kind == want else None
        if lk is not None:
            ledger.link = lk
            ledger.link_info = {"name": lk[0].name, "system": system.name, "between": [inf, fpga],
                                "description": lk[0].description}
            return
    ledger.link = None
    skipped = f" (unreadable system files: {', '.join(unreadable)})" if unreadable else ""
    ledger.link_info = {"name": None,
                        "reason": f"no system in the catalogue links a {want} inference device to {fpga}{skipped}"}


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
    ledger = ModelLedger(device=fdev, fused=fused, on_fpga=frozenset(s for s, b in backends.items() if b == "fpga-emu"))
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
    label = fpga_modelled_label(ledger)
    for ph in PHASES:
        key = f"{ph}_ms"
        if key in rec:
            swap = sum(rec["steps"][st]["phases"].get(ph, {}).get("ms", 0.0) - emu[st].get(ph, 0.0) for st in emu)
            rec[f"{ph}_ms_fpga_modelled"] = round(rec[key] + swap + label["transfer_ms"][ph], 3)
    rec["placement"] = placement
    rec["fpga_modelled"] = label
    rec["time_source"] = ("mixed: steps on cpu/cuda measured, fpga-emu steps modelled; "
                          "prefill_ms/decode_ms are measured host wall time (including the emulation); "
                          "*_ms_fpga_modelled replace the emulation's wall time with the modelled FPGA time and add "
                          "the modelled host<->FPGA transfers (fpga_modelled says what they include and exclude)")
    return rec


def fpga_modelled_label(ledger: ModelLedger) -> dict:
    """What ``*_ms_fpga_modelled`` include and exclude, the FPGA and link they were modelled with, and the
    modelled transfers (per phase, and per step and phase)."""
    dev = ledger.device
    per_step: dict[str, dict] = {}
    for (st, ph), n in sorted(ledger.xfer_bytes.items()):
        per_step.setdefault(st, {})[ph] = {"transfer_ms": round(ledger.xfer_us.get((st, ph), 0.0) / 1e3, 4),
                                           "bytes": int(n), "transfers": ledger.xfers[(st, ph)]}
    link = ledger.link_info or {"name": None, "reason": "no step on the FPGA"}
    xfer = ("modelled host<->FPGA transfers over the link (latency + bytes / its bandwidth, one per crossing): "
            "the Memory Prepare writes (per call, the units it changed), the query side, scores and selections, "
            "wherever they pass between a step off the FPGA and one on it")
    includes = ["measured host wall time of everything but the fpga-emu steps (steps on cpu/cuda, the model, the loop)",
                "modelled FPGA compute of the fpga-emu steps: max(MACs / macs_per_cycle + streaming-unit cycles at "
                "clock_mhz, HBM bytes / (mem_bw_gbs x bw_eff)) + the op class latency, from the FPGA's device file"]
    excludes = ["the emulation's own host wall time (replaced by the modelled time)",
                "overlap of transfers with compute: every transfer adds to the time"]
    if link.get("name"):
        includes.append(xfer)
    else:
        excludes.append(f"host<->FPGA transfers: {link['reason']}")
    return {
        "figures": [f"{ph}_ms_fpga_modelled" for ph in PHASES], "source": "modelled",
        "fpga_steps": sorted(ledger.on_fpga),
        "fpga": {"device": dev.name, "file": dev.path, "clock_mhz": dev.clock_mhz, "macs_per_cycle": dev.macs_per_cycle,
                 "mem_bw_gbs": dev.mem_bw_gbs} if dev is not None and ledger.on_fpga else None,
        "link": link, "includes": includes, "excludes": excludes,
        "transfer_ms": {ph: round(sum(us for (_, p), us in ledger.xfer_us.items() if p == ph) / 1e3, 4) for ph in PHASES},
        "transfer_bytes": {ph: int(sum(n for (_, p), n in ledger.xfer_bytes.items() if p == ph)) for ph in PHASES},
        "per_step": per_step,
    }


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
    fm = rec.get("fpga_modelled") or {}
    if fm.get("fpga_steps"):
        lk = fm["link"]
        via = f"over {lk['name']} ({lk['system']})" if lk.get("name") else f"not modelled: {lk['reason']}"
        lines.append(f"host<->FPGA transfers (modelled, {via}): prefill {fm['transfer_ms']['prefill']:.3f} ms, "
                     f"decode {fm['transfer_ms']['decode']:.3f} ms")
    lines.append(f"end-to-end (measured, incl. emulation): prefill {rec['prefill_ms']:.1f} ms, decode {rec['decode_ms']:.1f} ms; "
                 f"with fpga-emu steps at their modelled time and the transfers: decode "
                 f"{rec.get('decode_ms_fpga_modelled', rec['decode_ms']):.1f} ms")
    notes = [f"  {k}: {v['note']}" for k, v in rec["placement"].items() if v.get("note")]
    return "\n".join(lines + (["notes:"] + notes if notes else []))
