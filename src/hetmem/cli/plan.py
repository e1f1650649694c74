"""``hetmem plan`` (place each step of a profiled method on a system's devices) and ``hetmem devices``."""

from __future__ import annotations

import json
import sys

from hetmem.errors import HetmemError
from hetmem.files import check_out_dir
from hetmem.hw.catalog import Catalog, user_dir
from hetmem.hw.planner import OBJECTIVES, plan_workload, schedule_from_plans, table
from hetmem.hw.memnode import LAYOUTS, SYSTEM as MEMNODE_SYSTEM, LinkModel, plan_layouts
from hetmem.hw.workloads import paper_workloads, read_profile, workloads_from_profile
from hetmem.methods import get_method, param_specs
from hetmem.runtime.nodes.linkcal import calibrate_link


def cmd_plan(args) -> int:
    if args.objective not in OBJECTIVES:
        raise HetmemError(f"unknown objective '{args.objective}': use one of {', '.join(OBJECTIVES)}")
    if not args.profile and not args.paper:
        raise HetmemError("give --profile profile.json (from hetmem profile) or --paper (the paper-shaped workloads)")
    if args.system == MEMNODE_SYSTEM:
        return cmd_plan_memnode(args)
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


def _layout_dims(profile: dict, method: str) -> dict:
    """What the layouts' bytes depend on: the profiled model's shape and the method's page budget."""
    shape = profile.get("shape") or {}
    params = next((r.get("params") or {} for r in profile["records"] if r.get("method") == method), {})
    m = get_method(method, **{k: v for k, v in params.items() if k in {s.name for s in param_specs(type(get_method(method)))}})
    kv = int(shape.get("kv_heads") or 1)
    return {"kv_heads": kv, "group": max(1, int(shape.get("heads") or kv) // kv), "head_dim": int(shape.get("head_dim") or 64),
            "budget_pages": int(getattr(m, "budget_pages", 0) or 0), "page_size": int(getattr(m, "page_size", 16)),
            "batch": int(profile.get("batch") or 1), "elem": {"float32": 4}.get(str(profile.get("dtype")), 2),
            "forced_pages": int(getattr(m, "sink_pages", 0) or 0) + int(getattr(m, "recent_pages", 0) or 0)}


def cmd_plan_memnode(args) -> int:
    """``--system host+memnode``: each profiled sparse-attention workload in-process and in the three layouts on
    N local memory nodes, with the link calibrated on this machine (``hw.memnode``, ``runtime.nodes.linkcal``)."""
    if args.paper:
        raise HetmemError(f"--system {MEMNODE_SYSTEM} plans a profile (hetmem profile ... --out DIR): give --profile")
    if args.objective != "latency":
        raise HetmemError(f"--system {MEMNODE_SYSTEM} plans for latency only (no energy model of a local node)")
    n = args.memory_nodes
    if n < 1:
        raise HetmemError(f"--memory-nodes must be at least 1 (got {n})")
    profile = read_profile(args.profile)
    workloads = [w for w in workloads_from_profile(profile, phase="decode", kv_dtype=args.kv_dtype)
                 if not args.methods or w.method in {m.strip() for m in args.methods.split(",")}]
    workloads = [w for w in workloads if getattr(get_method(w.method), "family", "") == "sparse-attention"]
    if not workloads:
        raise HetmemError("the profile has no sparse-attention decode workload to place on memory nodes")
    out = check_out_dir(args.out, "--out", ("plan.json", "schedule.json"))
    link_entry = calibrate_link(n, force=args.recalibrate_link)
    link = LinkModel.of(link_entry)
    host = Catalog().device("host-cpu")
    entries = []
    for w in workloads:
        opts = plan_layouts(w, host, link, _layout_dims(profile, w.method))
        best = min(LAYOUTS, key=lambda lay: opts[lay]["latency_us"])
        entries.append({"method": w.method, "size": w.size, "unit": w.unit, "workload_source": w.source,
                        "memory_nodes": n, "layouts": opts, "best_layout": best,
                        "best": {"latency_us": opts[best]["latency_us"]},
                        "vs_in_process": round(opts[best]["latency_us"] / opts["in-process"]["latency_us"], 4),
                        "source": "modelled"})
    link_rec = {k: link_entry.get(k) for k in ("key", "key_id", "measured_at", "source", "statistic", "fit",
                                               "transport", "plain_call_ms", "other_transports_call_ms", "cached")}
    plan = {"schema": "hetmem.plan/1", "source": "modelled", "system": MEMNODE_SYSTEM, "objective": "latency",
            "note": "latencies are modelled: the steps on the calibrated host CPU, the head<->node link by a model "
                    "calibrated on this machine (link)", "memory_nodes": n, "link": link_rec,
            "host_calibration": host.calibration, "input": args.profile, "entries": entries}
    rules: dict[str, list[dict]] = {}
    for e in sorted(entries, key=lambda e: (e["method"], e["size"])):
        rs = rules.setdefault(e["method"], [])
        rule = {"max_size": None, "devices": {s: w for s, w in e["layouts"][e["best_layout"]]["where"].items()},
                "layout": e["best_layout"], "memory_nodes": n, "planned_at_size": e["size"],
                "predicted_latency_us": e["best"]["latency_us"], "source": "modelled"}
        if rs:
            rs[-1]["max_size"] = int((rs[-1]["planned_at_size"] + e["size"]) // 2)
            if rs[-1]["layout"] == rule["layout"]:
                rs[-1]["max_size"] = None
                continue
        rs.append(rule)
    schedule = {"schema": "hetmem.schedule/1", "system": MEMNODE_SYSTEM, "objective": "latency",
                "size_unit": "context tokens", "devices": {"head": "the model's process", "nodes": "memory nodes"},
                "rules": rules, "note": "a rule runs the method on its memory_nodes local nodes in its layout "
                                        "(hetmem run --placement FILE)"}
    (out / "plan.json").write_text(json.dumps(plan, indent=1))
    (out / "schedule.json").write_text(json.dumps(schedule, indent=1))
    f = link.bandwidth_gbs
    print(f"Layouts on {MEMNODE_SYSTEM} ({n} local node(s)); every latency is MODELLED. Link (measured "
          f"{link_entry['measured_at']}{', cached' if link_entry.get('cached') else ''}): {link.latency_ms * 1e3:.0f} us "
          f"per call + {link.per_array_ms * 1e3:.1f} us per array + bytes / {f:.2f} GB/s + "
          f"{link.compute_share:.2f} x the nodes' compute")
    print(f"{'method':<12} {'size':>8} {'in-process us':>14} {'index us':>10} {'kv us':>10} {'attention us':>13}  best")
    for e in entries:
        L = e["layouts"]
        print(f"{e['method'][:12]:<12} {e['size']:>8} {L['in-process']['latency_us']:>14.0f} {L['index']['latency_us']:>10.0f} "
              f"{L['kv']['latency_us']:>10.0f} {L['attention']['latency_us']:>13.0f}  {e['best_layout']}")
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
    print(f"  system {MEMNODE_SYSTEM:<14} host-cpu+ray-memory-nodes  (this machine's CPU as the head and N local Ray "
          f"memory nodes, the link calibrated here; layouts {', '.join(LAYOUTS)}: hetmem plan --system "
          f"{MEMNODE_SYSTEM} --profile P --memory-nodes N)")
    return 0


def register(subparsers, run_parser) -> None:  # noqa: ARG001
    p = subparsers.add_parser("plan", help="place each step of a profiled method on a system's devices (modelled)")
    p.add_argument("--profile", help="profile.json from hetmem profile")
    p.add_argument("--paper", action="store_true", help="plan the paper-shaped workloads instead of a profile")
    p.add_argument("--system", default="mi210+u55c",
                   help=f"a system file name (see hetmem devices), or {MEMNODE_SYSTEM}: this machine's CPU as the head "
                        "and local Ray memory nodes, the link calibrated here (the three layouts)")
    p.add_argument("--baseline-system", default=None,
                   help="system whose all-GPU plan is the baseline (default: the same system)")
    p.add_argument("--objective", default="latency", help="latency, energy or edp")
    p.add_argument("--phase", default="decode", help="profile phase to plan (decode or prefill; decode also takes the contextual-memory "
                                                    "methods' one phase, context, per context token)")
    p.add_argument("--methods", default=None, help="only these methods (comma separated)")
    p.add_argument("--kv-dtype", default=None,
                   help="re-target the profile's KV bytes to this dtype (e.g. bfloat16 for a GPU; default: as profiled)")
    p.add_argument("--out", required=True, help="directory for plan.json and schedule.json")
    p.add_argument("--memory-nodes", type=int, default=2, metavar="N",
                   help=f"--system {MEMNODE_SYSTEM}: the local memory nodes to plan for (default 2)")
    p.add_argument("--recalibrate-link", action="store_true",
                   help=f"--system {MEMNODE_SYSTEM}: measure the head<->node link again instead of using the cached calibration")
    p.set_defaults(func=cmd_plan)

    d = subparsers.add_parser("devices", help="list (or --validate) the device, link and system data files")
    d.add_argument("--validate", action="store_true")
    d.set_defaults(func=cmd_devices)

