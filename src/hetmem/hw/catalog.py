"""Devices, links and systems as data files, validated on load.

Built-in files live in ``hetmem/hw/data/{devices,links,systems}/*.json`` (``.toml`` works too).
A user adds or overrides one by dropping a file with the same layout into ``$HETMEM_HW_DIR``
(default ``~/.config/hetmem/hw``): ``devices/mydev.json``, ``systems/mygpu+u55c.json``, ...
A user file whose ``name`` matches a built-in one replaces it.

Every figure needs a source: a device file must cite one under ``sources`` for each of its
figure fields (``peak_tflops``, ``mem_bw_gbs``, ``mem_gb``, ``launch_us``, ``power_w``,
``op_classes``). Anything wrong is reported as one line naming the file and the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from hetmem.errors import HetmemError
from hetmem.files import read_user_text
from hetmem.hw.calibrate import calibrate
from hetmem.hw.host import load_op_fit
from hetmem.settings import hw_user_dir

DATA_DIR = Path(__file__).parent / "data"
STEPS = ("prepare", "relevancy", "retrieval", "apply")
OP_CLASSES = ("matmul", "gemv", "reduce", "copy", "topk", "threshold", "gather", "attention", "sparse")
DEVICE_KINDS = ("cpu", "gpu", "fpga", "memnode")
DEVICE_FIGURES = ("peak_tflops", "mem_bw_gbs", "mem_gb", "launch_us", "power_w", "op_classes")


def user_dir() -> Path:
    return hw_user_dir()


@dataclass
class OpClass:
    bw_eff: float
    compute_eff: float
    latency_us: float
    model: str = "roofline"  # or "streaming-topk" (FPGA top-k unit)


@dataclass
class Device:
    name: str
    kind: str
    description: str
    peak_tflops: dict[str, float]
    mem_bw_gbs: float
    mem_gb: float
    launch_us: float
    idle_w: float
    active_w: float  # power drawn on top of idle while busy
    steps: tuple[str, ...]
    fusion: bool
    op_classes: dict[str, OpClass]
    sources: dict[str, str]
    clock_mhz: float | None = None
    lanes: int = 16
    macs_per_cycle: float | None = None  # FPGA: int16 multiply-accumulates per clock of its scoring kernels
    path: str = ""
    calibration: dict | None = None  # host CPU: the measured calibration that filled it
    note: str = ""

    def peak(self, dtype: str) -> float:
        """Peak ops/s at ``dtype`` (falls back to fp32, then the largest figure)."""
        key = _dtype_key(dtype)
        tf = self.peak_tflops.get(key) or self.peak_tflops.get("fp32") or max(self.peak_tflops.values())
        return tf * 1e12

    def op(self, cls: str) -> OpClass:
        if cls in self.op_classes:
            return self.op_classes[cls]
        for alt in {"attention": "gather", "threshold": "reduce", "copy": "reduce", "gather": "sparse", "topk": "sparse"}.get(cls, ""), "sparse":
            if alt and alt in self.op_classes:
                return self.op_classes[alt]
        return OpClass(0.5, 0.3, self.launch_us)


@dataclass
class LinkDir:
    model: str  # "piecewise" | "latency-bandwidth"
    gbs: float = 0.0
    segments: list[tuple[float | None, float, float]] = field(default_factory=list)  # (up_to_kb, slope, intercept)

    def bandwidth_gbs(self, nbytes: float) -> float:
        if self.model == "latency-bandwidth":
            return self.gbs
        kb = nbytes / 1024.0
        for up_to, slope, intercept in self.segments:
            if up_to is None or kb <= up_to:
                return slope * kb + intercept
        return self.segments[-1][1] * kb + self.segments[-1][2]


@dataclass
class Link:
    name: str
    kind: str
    description: str
    a_to_b: LinkDir
    b_to_a: LinkDir
    latency_us: float
    sources: dict[str, str]
    path: str = ""

    def transfer_us(self, nbytes: float, forward: bool = True) -> float:
        """Modelled time to move ``nbytes`` (forward: a -> b)."""
        if nbytes <= 0:
            return 0.0
        d = self.a_to_b if forward else self.b_to_a
        return self.latency_us + nbytes / (d.bandwidth_gbs(nbytes) * 1e9) * 1e6


@dataclass
class System:
    name: str
    description: str
    devices: dict[str, Device]
    baseline: str
    inference: str
    links: dict[tuple[str, str], tuple[Link, bool]]  # (src, dst) -> (link, forward)
    path: str = ""

    def link(self, src: str, dst: str) -> tuple[Link, bool] | None:
        return self.links.get((src, dst))

    def transfer_us(self, src: str, dst: str, nbytes: float) -> float:
        if src == dst or nbytes <= 0:
            return 0.0
        lk = self.links.get((src, dst))
        if lk is None:
            return math.inf
        return lk[0].transfer_us(nbytes, lk[1])


def _dtype_key(dtype: str) -> str:
    d = str(dtype).replace("torch.", "").lower()
    return {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16",
            "int16": "int16", "int8": "int8", "float8": "fp8", "float64": "fp64"}.get(d, d)


# ---------------------------------------------------------------------------------------------------
# reading and validation


def _read(path: Path) -> dict:
    text = read_user_text(path, "device data file")
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # json.JSONDecodeError, tomllib.TOMLDecodeError
        raise HetmemError(f"{path}: not valid {path.suffix[1:].upper()}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise HetmemError(f"{path}: the top level must be an object")
    return data


def _need(d: dict, key: str, path, typ, where: str = ""):
    label = f"{where}.{key}" if where else key
    if key not in d:
        raise HetmemError(f"{path}: missing field '{label}'")
    v = d[key]
    if typ is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise HetmemError(f"{path}: field '{label}' must be a number (got {v!r})")
        return float(v)
    if not isinstance(v, typ):
        raise HetmemError(f"{path}: field '{label}' must be a {typ.__name__} (got {type(v).__name__})")
    return v


def _pos(d, key, path, where="", allow_zero=False) -> float:
    v = _need(d, key, path, float, where)
    if v < 0 or (v == 0 and not allow_zero):
        label = f"{where}.{key}" if where else key
        raise HetmemError(f"{path}: field '{label}' must be {'non-negative' if allow_zero else 'positive'} (got {v:g})")
    return v


def parse_device(data: dict, path) -> Device:
    name = _need(data, "name", path, str)
    kind = _need(data, "kind", path, str)
    if kind not in DEVICE_KINDS:
        raise HetmemError(f"{path}: field 'kind' must be one of {', '.join(DEVICE_KINDS)} (got {kind!r})")
    sources = _need(data, "sources", path, dict)
    for f in DEVICE_FIGURES:
        if not str(sources.get(f, "")).strip():
            raise HetmemError(f"{path}: figure '{f}' has no source: add sources.{f} citing where it comes from")
    peaks = _need(data, "peak_tflops", path, dict)
    if not peaks:
        raise HetmemError(f"{path}: field 'peak_tflops' is empty")
    peak = {k: _pos(peaks, k, path, "peak_tflops") for k in peaks}
    power = _need(data, "power_w", path, dict)
    idle = _pos(power, "idle", path, "power_w", allow_zero=True)
    active = _pos(power, "active", path, "power_w", allow_zero=True)
    steps = _need(data, "steps", path, list)
    bad = [s for s in steps if s not in STEPS]
    if bad or not steps:
        raise HetmemError(f"{path}: field 'steps' must list some of {', '.join(STEPS)} (got {steps!r})")
    ocs = {}
    for cls, oc in _need(data, "op_classes", path, dict).items():
        if cls not in OP_CLASSES:
            raise HetmemError(f"{path}: unknown op class '{cls}' (use {', '.join(OP_CLASSES)})")
        if not isinstance(oc, dict):
            raise HetmemError(f"{path}: op_classes.{cls} must be an object")
        where = f"op_classes.{cls}"
        bw, ce = _pos(oc, "bw_eff", path, where), _pos(oc, "compute_eff", path, where)
        if bw > 1 or ce > 1:
            raise HetmemError(f"{path}: {where} efficiencies must be in (0, 1] (got bw_eff={bw:g}, compute_eff={ce:g})")
        model = oc.get("model", "roofline")
        if model not in ("roofline", "streaming-topk"):
            raise HetmemError(f"{path}: {where}.model must be 'roofline' or 'streaming-topk' (got {model!r})")
        ocs[cls] = OpClass(bw, ce, _pos(oc, "latency_us", path, where, allow_zero=True), model)
    clock = data.get("clock_mhz")
    if clock is not None:
        clock = _pos(data, "clock_mhz", path)
    if any(o.model == "streaming-topk" for o in ocs.values()) and clock is None:
        raise HetmemError(f"{path}: a streaming-topk op class needs 'clock_mhz'")
    macs = _fpga_macs_per_cycle(data, path, kind, clock, peak, sources)
    fusion = data.get("fusion", False)
    if not isinstance(fusion, bool):
        raise HetmemError(f"{path}: field 'fusion' must be true or false")
    return Device(
        name=name, kind=kind, description=str(data.get("description", "")), peak_tflops=peak,
        mem_bw_gbs=_pos(data, "mem_bw_gbs", path), mem_gb=_pos(data, "mem_gb", path),
        launch_us=_pos(data, "launch_us", path, allow_zero=True), idle_w=idle, active_w=active,
        steps=tuple(steps), fusion=fusion, op_classes=ocs, sources={k: str(v) for k, v in sources.items()},
        clock_mhz=clock, lanes=int(data.get("lanes", 16)), macs_per_cycle=macs, path=str(path),
    )


def _fpga_macs_per_cycle(data: dict, path, kind: str, clock, peak: dict, sources: dict) -> float | None:
    """An FPGA's emulated kernels are timed from its clock and MACs per cycle: both required, the MAC rate
    with a source and equal (within 1%) to its int16 peak, so the planner's roofline and the emulator's
    cycle count model the same hardware."""
    if kind != "fpga" and "macs_per_cycle" not in data:
        return None
    if kind == "fpga" and clock is None:
        raise HetmemError(f"{path}: an fpga device needs 'clock_mhz' (its kernels' clock; the emulator counts cycles)")
    if "macs_per_cycle" not in data:
        raise HetmemError(f"{path}: an fpga device needs 'macs_per_cycle' (int16 multiply-accumulates per clock "
                          f"of its scoring kernels)")
    macs = _pos(data, "macs_per_cycle", path)
    if not str(sources.get("macs_per_cycle", "")).strip():
        raise HetmemError(f"{path}: figure 'macs_per_cycle' has no source: add sources.macs_per_cycle")
    if clock is not None and "int16" in peak:
        tops = 2 * macs * clock * 1e6 / 1e12
        if abs(tops / peak["int16"] - 1) > 0.01:
            raise HetmemError(f"{path}: macs_per_cycle {macs:g} x 2 x clock_mhz {clock:g} = {tops:.4g} Top/s, but "
                              f"peak_tflops.int16 is {peak['int16']:g}: make them agree (the planner uses the peak, "
                              f"the emulated kernels the MAC rate)")
    return macs


def _parse_dir(d, path, where) -> LinkDir:
    if not isinstance(d, dict):
        raise HetmemError(f"{path}: field '{where}' must be an object")
    model = _need(d, "model", path, str, where)
    if model == "latency-bandwidth":
        return LinkDir(model, gbs=_pos(d, "gbs", path, where))
    if model == "piecewise":
        if d.get("size_unit", "KB") != "KB":
            raise HetmemError(f"{path}: {where}.size_unit must be 'KB'")
        segs = _need(d, "segments", path, list, where)
        if not segs:
            raise HetmemError(f"{path}: {where}.segments is empty")
        out, prev = [], 0.0
        for i, s in enumerate(segs):
            w = f"{where}.segments[{i}]"
            if not isinstance(s, dict) or "up_to" not in s:
                raise HetmemError(f"{path}: {w} needs up_to (KB, or null for the last), slope and intercept")
            up = s["up_to"]
            if up is None and i != len(segs) - 1:
                raise HetmemError(f"{path}: {w}.up_to is null but it is not the last segment")
            if up is not None:
                up = _pos(s, "up_to", path, w)
                if up <= prev:
                    raise HetmemError(f"{path}: {w}.up_to must increase ({up:g} after {prev:g})")
                prev = up
            slope = _pos(s, "slope", path, w, allow_zero=True)
            icpt = _pos(s, "intercept", path, w)
            out.append((up, slope, icpt))
        if out[-1][0] is not None:
            raise HetmemError(f"{path}: the last segment of {where} must have up_to null (it covers every larger size)")
        return LinkDir(model, segments=out)
    raise HetmemError(f"{path}: {where}.model must be 'piecewise' or 'latency-bandwidth' (got {model!r})")


def parse_link(data: dict, path) -> Link:
    name = _need(data, "name", path, str)
    sources = _need(data, "sources", path, dict)
    for f in ("a_to_b", "b_to_a", "latency_us"):
        if not str(sources.get(f, "")).strip():
            raise HetmemError(f"{path}: figure '{f}' has no source: add sources.{f}")
    return Link(
        name=name, kind=str(data.get("kind", "")), description=str(data.get("description", "")),
        a_to_b=_parse_dir(data.get("a_to_b"), path, "a_to_b"), b_to_a=_parse_dir(data.get("b_to_a"), path, "b_to_a"),
        latency_us=_pos(data, "latency_us", path, allow_zero=True), sources=sources, path=str(path),
    )


def fill_from_calibration(dev: Device, calibration: dict | None = None) -> Device:
    """Overwrite the host device's bandwidth and peaks with measured figures (in place)."""
    try:
        if calibration is None:
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


class Catalog:
    """Every device, link and system file (built-in, then the user's dir overriding by name)."""

    def __init__(self, extra_dirs: list[Path] | None = None, calibrate_host: bool = True):
        self.calibrate_host = calibrate_host
        self.files: dict[str, dict[str, Path]] = {"devices": {}, "links": {}, "systems": {}, "workloads": {}}
        dirs = [DATA_DIR, user_dir(), *(extra_dirs or [])]
        for base in dirs:
            for kind in self.files:
                d = Path(base) / kind
                if not d.is_dir():
                    continue
                for p in sorted(d.iterdir()):
                    if p.suffix in (".json", ".toml") and p.is_file():
                        self.files[kind][self._name_of(p)] = p
        self._devices: dict[str, Device] = {}
        self._links: dict[str, Link] = {}

    @staticmethod
    def _name_of(p: Path) -> str:
        try:
            data = json.loads(p.read_text()) if p.suffix == ".json" else None
            if isinstance(data, dict) and isinstance(data.get("name"), str):
                return data["name"]
        except Exception:
            pass
        return p.stem

    def names(self, kind: str) -> list[str]:
        return sorted(self.files[kind])

    def device(self, name: str) -> Device:
        if name not in self._devices:
            if name not in self.files["devices"]:
                raise HetmemError(f"unknown device '{name}': known devices are {', '.join(self.names('devices'))}")
            p = self.files["devices"][name]
            dev = parse_device(_read(p), p)
            if dev.kind == "cpu" and self.calibrate_host and _read(p).get("calibrated"):
                fill_from_calibration(dev)
            self._devices[name] = dev
        return self._devices[name]

    def link(self, name: str) -> Link:
        if name not in self._links:
            if name not in self.files["links"]:
                raise HetmemError(f"unknown link '{name}': known links are {', '.join(self.names('links'))}")
            p = self.files["links"][name]
            self._links[name] = parse_link(_read(p), p)
        return self._links[name]

    def system(self, name: str) -> System:
        if name not in self.files["systems"]:
            raise HetmemError(f"unknown system '{name}': known systems are {', '.join(self.names('systems'))}")
        p = self.files["systems"][name]
        data = _read(p)
        _need(data, "name", p, str)
        devnames = _need(data, "devices", p, list)
        if not devnames:
            raise HetmemError(f"{p}: field 'devices' is empty")
        devices = {}
        for dn in devnames:
            try:
                devices[dn] = self.device(dn)
            except HetmemError as exc:
                raise HetmemError(f"{p}: {exc}") from None
        baseline = data.get("baseline", devnames[0])
        inference = data.get("inference", baseline)
        for f, v in (("baseline", baseline), ("inference", inference)):
            if v not in devices:
                raise HetmemError(f"{p}: field '{f}' names '{v}', which is not in its devices")
        links = {}
        for i, lk in enumerate(_need(data, "links", p, list)):
            if not isinstance(lk, dict) or not {"a", "b", "link"} <= set(lk):
                raise HetmemError(f"{p}: links[{i}] needs a, b and link")
            for end in ("a", "b"):
                if lk[end] not in devices:
                    raise HetmemError(f"{p}: links[{i}].{end} names '{lk[end]}', which is not in its devices")
            try:
                link = self.link(lk["link"])
            except HetmemError as exc:
                raise HetmemError(f"{p}: links[{i}]: {exc}") from None
            links[(lk["a"], lk["b"])] = (link, True)
            links[(lk["b"], lk["a"])] = (link, False)
        return System(data["name"], str(data.get("description", "")), devices, baseline, inference, links, str(p))

    def validate_all(self) -> list[str]:
        """Load every file; returns the names loaded (raises on the first bad file)."""
        out = []
        for n in self.names("devices"):
            self.device(n)
            out.append(f"device {n}")
        for n in self.names("links"):
            self.link(n)
            out.append(f"link {n}")
        for n in self.names("systems"):
            self.system(n)
            out.append(f"system {n}")
        return out


def load_system(name: str, **kw) -> System:
    return Catalog(**kw).system(name)
