"""The cost and energy model. Every figure it produces is *modelled*.

One op on one device:

    t = max(bytes / (mem_bw x bw_eff), ops / (peak[dtype] x compute_eff)) + latency     (roofline)

with ``bw_eff``, ``compute_eff`` and ``latency`` per op class (matmul, gemv, reduce, copy, topk,
threshold, gather, attention, sparse) from the device's data file. A step is the sum of its ops. On a device
whose top-k class is ``streaming-topk`` (the FPGA), top-k of n scores keeping k is a cycle count:

    cycles = ceil(n / lanes) + k + ceil(log2 k) x k ln(n / k)       (scan 16 per cycle, fill the k slots,
                                                                     then expected later insertions)

Fusion: Compute Relevancy and Retrieval on one device that can fuse them stream the scores straight
into the top-k unit: the score array is neither written nor re-read (only bytes leaving the device
count), the two stages overlap (time = the slower stage) and pay one latency.

Transfers: whenever a step's input lives on another device it is moved over the system's link
(one transfer per source device and step). Inputs: Prepare reads raw data (on the inference device);
Relevancy reads Memory (where Prepare ran) and the query (inference device); Retrieval reads the
scores; Apply reads the selection and the raw KV it gathers (inference device) and returns its
output to the inference device.

Energy = sum over devices of idle_w x wall + active_w x busy (``active_w`` is the power drawn on top
of idle while busy), over the devices a plan uses plus the inference device. Links draw nothing
in this model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hetmem.errors import HetmemError
from hetmem.hw.catalog import STEPS, Catalog, Device, System
from hetmem.ops.fpga_emu import FpgaCycles

_CLASS_ALIASES = {"dense": "matmul", "mixed": "sparse"}


@dataclass
class OpWork:
    cls: str
    flops: float = 0.0
    bytes_read: float = 0.0
    bytes_written: float = 0.0
    n: int | None = None  # top-k: scores per row
    k: int | None = None  # top-k: kept per row
    rows: int = 1
    name: str = ""

    @property
    def bytes(self) -> float:
        return self.bytes_read + self.bytes_written


@dataclass
class StepWork:
    step: str
    ops: list[OpWork]
    dtype: str = "float32"
    out_bytes: float = 0.0  # the step's output handed to the next step (Memory delta, scores, selection, result)
    raw_bytes: float = 0.0  # bytes it reads of raw data that lives on the inference device (prepare, apply)
    calls: float = 1.0  # calls per unit of work (e.g. per decode token: the sparse layers)
    measured_us: float | None = None  # measured per-call time where the workload came from a profile


@dataclass
class Workload:
    method: str
    size: int  # problem size: context tokens (or documents)
    steps: dict[str, StepWork]
    query_bytes: float = 0.0
    unit: str = "per decode token"
    source: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.method}@{self.size}"


def streaming_topk_cycles(n: int, k: int, lanes: int = 16) -> float:
    """Expected cycles of the FPGA streaming top-k (k slots, running minimum, ``lanes`` scores per cycle)."""
    if n <= 0 or k <= 0:
        return 0.0
    k = min(k, n)
    later = k * math.log(n / k) if n > k else 0.0  # expected insertions after the slots are full (random order)
    return math.ceil(n / lanes) + k + math.ceil(math.log2(max(k, 2))) * later


def op_time_us(op: OpWork, dev: Device, dtype: str, *, fused_stream: bool = False, with_latency: bool = True) -> float:
    cls = _CLASS_ALIASES.get(op.cls, op.cls)
    oc = dev.op(cls)
    bytes_ = op.bytes_read + op.bytes_written
    if fused_stream:
        bytes_ = op.bytes_written if op.cls == "topk" else op.bytes_read
    if oc.model == "streaming-topk" and op.n:
        cycles = streaming_topk_cycles(op.n, op.k or 1, dev.lanes) * max(1, op.rows)
        body = cycles / (dev.clock_mhz * 1e6) * 1e6
        body = max(body, bytes_ / (dev.mem_bw_gbs * 1e9 * oc.bw_eff) * 1e6)
    else:
        t_mem = bytes_ / (dev.mem_bw_gbs * 1e9 * oc.bw_eff) * 1e6
        t_cmp = op.flops / (dev.peak(dtype) * oc.compute_eff) * 1e6
        body = max(t_mem, t_cmp)
    return body + (oc.latency_us if with_latency else 0.0)


def step_time_us(sw: StepWork, dev: Device) -> float:
    return sum(op_time_us(op, dev, sw.dtype) for op in sw.ops)


def fused_time_us(rel: StepWork, ret: StepWork, dev: Device) -> float:
    """Relevancy streaming into retrieval on one device: the slower stage plus one latency."""
    t_rel = sum(op_time_us(o, dev, rel.dtype, fused_stream=True, with_latency=False) for o in rel.ops)
    t_ret = sum(op_time_us(o, dev, ret.dtype, fused_stream=True, with_latency=False) for o in ret.ops)
    lat = max([dev.op(_CLASS_ALIASES.get(o.cls, o.cls)).latency_us for o in rel.ops + ret.ops] or [0.0])
    return max(t_rel, t_ret) + lat


@dataclass
class Plan:
    devices: dict[str, str]  # step -> device name
    fused: bool
    step_us: dict[str, float]  # per step (fused: relevancy holds the fused time, retrieval 0)
    transfer_us: dict[str, float]  # per step: transfers into it (apply: also its result back)
    latency_us: float
    energy_uj: float
    busy_us: dict[str, float]
    feasible: bool = True
    source: str = "modelled"

    @property
    def edp(self) -> float:
        return self.latency_us * self.energy_uj

    def key(self) -> str:
        s = ",".join(self.devices.get(st, "-") for st in STEPS)
        return f"({s}){' fused' if self.fused else ''}"

    def as_dict(self) -> dict:
        return {
            "devices": self.devices, "fused_relevancy_retrieval": self.fused,
            "latency_us": round(self.latency_us, 3), "energy_uj": round(self.energy_uj, 3),
            "edp_us_uj": round(self.edp, 3), "step_us": {k: round(v, 3) for k, v in self.step_us.items()},
            "transfer_us": {k: round(v, 3) for k, v in self.transfer_us.items()},
            "busy_us": {k: round(v, 3) for k, v in self.busy_us.items()}, "source": "modelled",
        }


def evaluate(wl: Workload, system: System, devices: dict[str, str], fused: bool = False) -> Plan:
    """Model one placement of ``wl``'s steps (``devices``: step -> device name) on ``system``."""
    inf = system.inference
    st = wl.steps
    step_us: dict[str, float] = {}
    xfer: dict[str, float] = {}

    def move(step: str, sources: dict[str, float], dst: str, calls: float) -> None:
        t = sum(system.transfer_us(src, dst, b) for src, b in sources.items() if src != dst and b > 0)
        xfer[step] = xfer.get(step, 0.0) + t * calls

    # Prepare: raw data from the inference device.
    if "prepare" in st:
        d = devices["prepare"]
        step_us["prepare"] = step_time_us(st["prepare"], system.devices[d]) * st["prepare"].calls
        move("prepare", {inf: st["prepare"].raw_bytes}, d, st["prepare"].calls)
    mem_dev = devices.get("prepare", inf)
    mem_bytes = st["prepare"].out_bytes if "prepare" in st else 0.0
    if "relevancy" in st:
        d = devices["relevancy"]
        srcs: dict[str, float] = {}
        srcs[mem_dev] = srcs.get(mem_dev, 0.0) + mem_bytes
        srcs[inf] = srcs.get(inf, 0.0) + wl.query_bytes
        move("relevancy", srcs, d, st["relevancy"].calls)
        if fused and "retrieval" in st:
            step_us["relevancy"] = fused_time_us(st["relevancy"], st["retrieval"], system.devices[d]) * st["relevancy"].calls
            step_us["retrieval"] = 0.0
        else:
            step_us["relevancy"] = step_time_us(st["relevancy"], system.devices[d]) * st["relevancy"].calls
    if "retrieval" in st and not fused:
        d = devices["retrieval"]
        step_us["retrieval"] = step_time_us(st["retrieval"], system.devices[d]) * st["retrieval"].calls
        src = devices.get("relevancy", inf)
        move("retrieval", {src: st["relevancy"].out_bytes if "relevancy" in st else 0.0}, d, st["retrieval"].calls)
    if "apply" in st:
        d = devices["apply"]
        a = st["apply"]
        step_us["apply"] = step_time_us(a, system.devices[d]) * a.calls
        srcs = {}
        if "retrieval" in st:
            sel_dev = devices["retrieval"]
            srcs[sel_dev] = srcs.get(sel_dev, 0.0) + st["retrieval"].out_bytes
        srcs[inf] = srcs.get(inf, 0.0) + a.raw_bytes
        move("apply", srcs, d, a.calls)
        if d != inf:  # the result goes back to the model
            xfer["apply"] = xfer.get("apply", 0.0) + system.transfer_us(d, inf, a.out_bytes) * a.calls
    wall = sum(step_us.values()) + sum(xfer.values())
    busy: dict[str, float] = {}
    for s, t in step_us.items():
        busy[devices[s]] = busy.get(devices[s], 0.0) + t
    used = set(busy) | {inf}
    energy = sum(system.devices[d].idle_w * wall + system.devices[d].active_w * busy.get(d, 0.0) for d in used)
    feasible = math.isfinite(wall)
    return Plan(dict(devices), fused, step_us, xfer, wall, energy, busy, feasible)


def fpga_cycles(cyc: FpgaCycles, device: Device) -> float:
    """Clock cycles of an emulated kernel on ``device``: its counted cycles plus its MACs at the device
    file's ``macs_per_cycle``."""
    if cyc.macs and not device.macs_per_cycle:
        raise HetmemError(f"{device.path or device.name}: no 'macs_per_cycle': cannot time its emulated scoring kernels")
    return cyc.cycles + (cyc.macs / device.macs_per_cycle if cyc.macs else 0.0)


def fpga_modelled_us(cyc: FpgaCycles, device=None) -> float:
    """Time of an emulated kernel on the FPGA device (default u55c), compute only (no host<->FPGA transfer):
    max(cycles / clock, HBM bytes / (bw x bw_eff)) + latency, cycles from ``fpga_cycles``."""
    if device is None:
        device = Catalog(calibrate_host=False).device("u55c")
    if not device.clock_mhz:
        raise HetmemError(f"{device.path or device.name}: no 'clock_mhz': cannot time emulated FPGA kernels on it")
    oc = device.op("gemv")
    t = max(fpga_cycles(cyc, device) / (device.clock_mhz * 1e6), cyc.hbm_bytes / (device.mem_bw_gbs * 1e9 * oc.bw_eff))
    return t * 1e6 + oc.latency_us
