"""``hetmem plan`` (place each step of a profiled method on a system's devices) and ``hetmem devices``."""

from __future__ import annotations

import json
import sys

from hetmem.errors import HetmemError
from hetmem.files import check_out_dir
from hetmem.hw.catalog import Catalog, user_dir
from hetmem.hw.planner import OBJECTIVES, plan_workload, schedule_from_plans, table
from hetmem.hw.workloads import paper_workloads, read_profile, workloads_from_profile


def cmd_plan(args) -> int:
    if args.objective not in OBJECTIVES:
        raise HetmemError(f"unknown objective '{args.objective}': use one of {', '.join(OBJECTIVES)}")
    if not args.profile and not args.paper:
        raise HetmemError("give --profile profile.json (from hetmem profile) or --paper (the paper-shaped workloads)")
    cat = Catalog()
    system = cat.system(args.system)
    base_sys = cat.system(args.baseline_system) if args.baseline_system else None
    for d in system.devices.values():
        if d.note:
            print(f"note: {d.note}", file=sys.stderr)
    if args.profile:
        profile = read_profile(args.profile)
        workloads = workloads_from_profile(profile, phase=args.phase, kv_dtype=args.kv_dtype)
    else:
        profile = None
        workloads = paper_workloads()
    if args.methods:
        keep = {m.strip() for m in args.methods.split(",")}
        workloads = [w for w in workloads if w.method in keep]
        if not workloads:
            raise HetmemError(f"no workload for methods {sorted(keep)} in the input")
    entries = [plan_workload(w, system, args.objective, base_sys) for w in workloads]
    out = check_out_dir(args.out, "--out", ("plan.json", "schedule.json"))
    devices = {}
    for n, d in system.devices.items():
        devices[n] = {"kind": d.kind, "mem_bw_gbs": d.mem_bw_gbs, "file": d.path,
                      "calibration": d.calibration, "note": d.note or None}
    plan = {
        "schema": "hetmem.plan/1", "source": "modelled",
        "note": "every latency and energy figure here is produced by hetmem's device models (modelled), not measured",
        "system": system.name, "baseline_system": (base_sys or system).name, "objective": args.objective,
        "devices": devices, "input": args.profile or "paper-shaped workloads (hetmem.hw.workloads)",
        "kv_dtype": getattr(args, "kv_dtype", None) or "as profiled",
        "units": {"latency": "us", "energy": "uJ", "per": "see each entry's unit"},
        "entries": entries,
    }
    (out / "plan.json").write_text(json.dumps(plan, indent=1))
    (out / "schedule.json").write_text(json.dumps(schedule_from_plans(entries, system, args.objective), indent=1))
    print(table(entries, system, args.objective))
    print(f"\nwrote {out / 'plan.json'} and {out / 'schedule.json'}", file=sys.stderr)
    return 0


def cmd_devices(args) -> int:
    cat = Catalog()
    if args.validate:
        names = cat.validate_all()
        print(f"ok: {len(names)} files valid ({', '.join(names)})")
        return 0
    print(f"devices, links and systems (built-in; add your own under {user_dir()}/devices|links|systems/)")
    for n in cat.names("devices"):
        d = cat.device(n)
        peaks = ", ".join(f"{k} {v:g}" for k, v in d.peak_tflops.items())
        print(f"  device {n:<9} {d.kind:<7} {d.mem_bw_gbs:8.1f} GB/s  {d.mem_gb:g} GB  TFLOPs: {peaks}  steps: {','.join(d.steps)}")
        if d.note:
            print(f"           note: {d.note}")
    for n in cat.names("links"):
        lk = cat.link(n)
        print(f"  link   {n:<14} {lk.kind:<9} {lk.description}")
    for n in cat.names("systems"):
        s = cat.system(n)
        print(f"  system {n:<14} {'+'.join(s.devices)}  ({s.description})")
    return 0


def register(subparsers, run_parser) -> None:  # noqa: ARG001
    p = subparsers.add_parser("plan", help="place each step of a profiled method on a system's devices (modelled)")
    p.add_argument("--profile", help="profile.json from hetmem profile")
    p.add_argument("--paper", action="store_true", help="plan the paper-shaped workloads instead of a profile")
    p.add_argument("--system", default="mi210+u55c", help="a system file name (see hetmem devices)")
    p.add_argument("--baseline-system", default=None,
                   help="system whose all-GPU plan is the baseline (default: the same system)")
    p.add_argument("--objective", default="latency", help="latency, energy or edp")
    p.add_argument("--phase", default="decode", help="profile phase to plan (decode or prefill; decode also takes the contextual-memory "
                                                    "methods' one phase, context, per context token)")
    p.add_argument("--methods", default=None, help="only these methods (comma separated)")
    p.add_argument("--kv-dtype", default=None,
                   help="re-target the profile's KV bytes to this dtype (e.g. bfloat16 for a GPU; default: as profiled)")
    p.add_argument("--out", required=True, help="directory for plan.json and schedule.json")
    p.set_defaults(func=cmd_plan)

    d = subparsers.add_parser("devices", help="list (or --validate) the device, link and system data files")
    d.add_argument("--validate", action="store_true")
    d.set_defaults(func=cmd_devices)

