"""The placement planner: every assignment of a workload's steps to a system's devices, ranked.

For each step, the candidates are the system's devices that can run it (``steps`` in the device
file); every combination is modelled (``hw.cost.evaluate``), plus a fused variant wherever
Relevancy and Retrieval share a device that can fuse them. Plans are ranked by latency, energy or
energy-delay product. Every figure is *modelled*.
"""

from __future__ import annotations

import itertools
import math

from hetmem.errors import HetmemError
from hetmem.hw.catalog import STEPS, System
from hetmem.hw.cost import Plan, Workload, evaluate

OBJECTIVES = ("latency", "energy", "edp")


def _score(p: Plan, objective: str) -> float:
    if not p.feasible:
        return math.inf
    return {"latency": p.latency_us, "energy": p.energy_uj, "edp": p.edp}[objective]


def enumerate_plans(wl: Workload, system: System) -> list[Plan]:
    steps = [s for s in STEPS if s in wl.steps]
    cands = []
    for s in steps:
        c = [d for d, dev in system.devices.items() if s in dev.steps]
        if not c:
            raise HetmemError(f"no device of system '{system.name}' can run step '{s}' of {wl.method}")
        cands.append(c)
    plans = []
    for combo in itertools.product(*cands):
        devs = dict(zip(steps, combo))
        plans.append(evaluate(wl, system, devs, fused=False))
        if ("relevancy" in devs and "retrieval" in devs and devs["relevancy"] == devs["retrieval"]
                and system.devices[devs["relevancy"]].fusion):
            plans.append(evaluate(wl, system, devs, fused=True))
    return plans


def rank(plans: list[Plan], objective: str = "latency") -> list[Plan]:
    if objective not in OBJECTIVES:
        raise HetmemError(f"unknown objective '{objective}': use one of {', '.join(OBJECTIVES)}")
    return sorted(plans, key=lambda p: (_score(p, objective), p.latency_us, len(set(p.devices.values()))))


def baseline_plan(wl: Workload, system: System) -> Plan:
    """Every step on the system's baseline device (the all-GPU plan)."""
    b = system.baseline
    return evaluate(wl, system, {s: b for s in STEPS if s in wl.steps}, fused=False)


def _mp(p: Plan) -> float:
    return p.latency_us - p.step_us.get("apply", 0.0)


def plan_workload(wl: Workload, system: System, objective: str = "latency", baseline_system: System | None = None) -> dict:
    plans = rank(enumerate_plans(wl, system), objective)
    best = plans[0]
    if not best.feasible:
        raise HetmemError(f"no feasible placement of {wl.method} on {system.name} (missing links?)")
    base = baseline_plan(wl, baseline_system or system)
    return {
        "method": wl.method, "size": wl.size, "unit": wl.unit, "workload_source": wl.source,
        "objective": objective, "source": "modelled",
        "best": best.as_dict(), "best_key": best.key(),
        "all_gpu": base.as_dict(), "all_gpu_key": base.key(),
        "speedup": round(base.latency_us / best.latency_us, 4),
        "energy_ratio": round(base.energy_uj / best.energy_uj, 4),
        # the same ratios without Apply (the memory-processing steps and their transfers only)
        "speedup_memory_processing": round(_mp(base) / _mp(best), 4) if _mp(best) > 0 else None,
        "plans_considered": len(plans),
        "top": [dict(p.as_dict(), key=p.key()) for p in plans[:5]],
    }


def schedule_from_plans(entries: list[dict], system: System, objective: str) -> dict:
    """Rules keyed on problem size -> devices, per method (as the prototype's scheduler uses)."""
    rules: dict[str, list[dict]] = {}
    by_method: dict[str, list[dict]] = {}
    for e in entries:
        by_method.setdefault(e["method"], []).append(e)
    for m, es in by_method.items():
        es.sort(key=lambda e: e["size"])
        out: list[dict] = []
        for i, e in enumerate(es):
            rule = {"max_size": None if i == len(es) - 1 else int((e["size"] + es[i + 1]["size"]) // 2),
                    "devices": e["best"]["devices"], "fused_relevancy_retrieval": e["best"]["fused_relevancy_retrieval"],
                    "planned_at_size": e["size"], "predicted_latency_us": e["best"]["latency_us"], "source": "modelled"}
            if out and out[-1]["devices"] == rule["devices"] and out[-1]["fused_relevancy_retrieval"] == rule["fused_relevancy_retrieval"]:
                out[-1]["max_size"] = rule["max_size"]  # merge equal neighbours
                continue
            out.append(rule)
        rules[m] = out
    return {
        "schema": "hetmem.schedule/1", "system": system.name, "objective": objective,
        "size_unit": "context tokens (documents for RAG)",
        "devices": {d: system.devices[d].kind for d in system.devices},
        "rules": rules,
        "note": "a rule applies to problem sizes up to max_size (null: any larger size); devices map each step to a device of the system",
    }


def table(entries: list[dict], system: System, objective: str) -> str:
    hdr = (f"Placement plans on {system.name} (objective: {objective}); every figure is MODELLED by hetmem's device models\n"
           f"{'method':<24} {'size':>8} {'best plan (prepare,relevancy,retrieval,apply)':<46} {'lat us':>10} "
           f"{'all-GPU us':>10} {'speedup':>8} {'energy x':>8} {'mem-proc x':>10}")
    lines = [hdr, "-" * len(hdr.splitlines()[1])]
    foot = ("speedup, energy x: all-GPU plan / best plan (latency, energy); mem-proc x: the same speedup without Apply "
            "(prepare + relevancy + retrieval + transfers)")
    for e in entries:
        lines.append(f"{e['method'][:24]:<24} {e['size']:>8} {e['best_key'][:46]:<46} {e['best']['latency_us']:>10.1f} "
                     f"{e['all_gpu']['latency_us']:>10.1f} {e['speedup']:>7.2f}x {e['energy_ratio']:>7.2f}x "
                     + (f"{e['speedup_memory_processing']:>9.2f}x" if e['speedup_memory_processing'] else f"{'-':>10}"))
    return "\n".join(lines + [foot])
