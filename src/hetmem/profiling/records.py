"""profile.json records (schema ``hetmem.profile/1``, docs/profile-schema.md) and the resumable store."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from hetmem.errors import HetmemError
from hetmem.files import write_json_atomic
from hetmem.ops.counts import intensity
from hetmem.profiling.counters import OpTally

SCHEMA = "hetmem.profile/1"
STEP_ORDER = ("prepare", "relevancy", "retrieval", "apply", "apply.gather", "rest", "total")
MEMORY_STEPS = ("prepare", "relevancy", "retrieval", "apply.gather")
OP_CLASS = {"prepare": "reduce", "relevancy": "gemv", "retrieval": "topk", "apply": "attention",
            "apply.gather": "gather", "rest": "dense", "total": "mixed"}


def _r(x, nd=4):
    return None if x is None else round(float(x), nd)


def phase_records(*, base: dict, phase: str, timer, counter, total_ms: float | None, tokens: int, layers: int,
                  scale: float = 1.0, time_source: str = "measured", rest: OpTally | None = None, rest_calls: int = 0,
                  extra_counts: dict[str, OpTally] | None = None) -> tuple[list[dict], dict]:
    """Records for one phase of one (method, length) run, and the phase's summary for ``runs[]``.

    Step times and counts come from ``timer``/``counter`` and are multiplied by ``scale``. ``rest`` holds
    the analytic counts of the work outside the steps (dense layer parts, LM head) over the whole phase,
    in ``rest_calls`` layer calls; ``extra_counts`` holds analytic counts for steps timed outside a
    pipeline (prefill attention, timed as Apply by the attention hook), over the whole phase. Every
    record's ``ops`` covers every call of the step in the phase (all layers, all tokens).
    """
    extra_counts = extra_counts or {}
    recs: list[dict] = []
    step_ms: dict[str, float] = {}
    names = [n for n in STEP_ORDER[:5] if timer.phase_calls(n, phase) > 0]
    for name in names:
        ms = timer.phase_ms(name, phase) * scale
        calls = int(round(timer.phase_calls(name, phase) * scale))
        step_ms[name] = ms
        tally = extra_counts.get(name)
        if tally is None and counter is not None:
            tally = counter.ops.get((name, phase))
        if tally is not None:
            flops, br, bw = (v * scale for v in tally.total())
            ops = tally.as_list(calls, scale)
        else:
            flops = br = bw = None
            ops = []
        recs.append(_record(base, phase, name, ms, calls, tokens, layers, flops, br, bw, ops, time_source))
    if total_ms is not None:
        tot_ms = total_ms
        rest_ms = max(0.0, tot_ms - sum(v for k, v in step_ms.items() if k != "apply.gather"))
        f, br, bw = rest.total() if rest else (None, None, None)
        recs.append(_record(base, phase, "rest", rest_ms, rest_calls, tokens, layers, f, br, bw,
                            rest.as_list(rest_calls) if rest else [], time_source))
        parts = [r for r in recs if r["step"] != "apply.gather"]
        tf = sum(r["flops"] for r in parts) if all(r["flops"] is not None for r in parts) else None
        tbr = sum(r["bytes_read"] for r in parts) if tf is not None else None
        tbw = sum(r["bytes_written"] for r in parts) if tf is not None else None
        recs.append(_record(base, phase, "total", tot_ms, 0, tokens, layers, tf, tbr, tbw, [], time_source))
    summary: dict = {"tokens": tokens, "total_ms": _r(total_ms, 3)}
    if total_ms:
        mem = sum(step_ms.get(s, 0.0) for s in MEMORY_STEPS)
        summary["overhead"] = _r(mem / total_ms)
        summary["overhead_incl_apply"] = _r(sum(step_ms.get(s, 0.0) for s in ("prepare", "relevancy", "retrieval", "apply")) / total_ms)
        if phase == "decode" and tokens:
            summary["ms_per_token"] = _r(total_ms / tokens, 3)
    return recs, summary


def _record(base, phase, step, ms, calls, tokens, layers, flops, br, bw, ops, time_source) -> dict:
    per = max(calls, 1)
    return {
        **base,
        "phase": phase,
        "step": step,
        "part_of": "apply" if step == "apply.gather" else None,
        "op_class": OP_CLASS[step],
        "status": "ok",
        "reason": None,
        "ms": _r(ms),
        "time_source": time_source,
        "calls": calls,
        "tokens": tokens,
        "layers": layers,
        "flops": flops,
        "bytes_read": br,
        "bytes_written": bw,
        "intensity": _r(intensity(flops, br, bw), 6),
        "count_source": "analytic",
        "per_call": {
            "ms": _r(ms / per, 6) if calls else None,
            "flops": None if flops is None or not calls else flops / per,
            "bytes_read": None if br is None or not calls else br / per,
            "bytes_written": None if bw is None or not calls else bw / per,
        },
        "ops": ops,
    }


def skipped_records(base: dict, steps: list[str], reason: str, phase: str = "decode") -> list[dict]:
    out = []
    for s in steps:
        r = _record(base, phase, s, None, 0, 0, base.get("layers", 0), None, None, None, [], "not run")
        r.update(status="skipped", reason=reason, ms=None)
        out.append(r)
    return out


class ProfileStore:
    """profile.json in DIR: loaded on start (resume), rewritten atomically after every run."""

    def __init__(self, out_dir: Path, meta: dict, resume_keys: tuple[str, ...]):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "profile.json"
        self.doc = {"schema": SCHEMA, **meta, "runs": [], "records": []}
        if self.path.exists():
            try:
                old = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise HetmemError(f"{self.path} exists but is not valid JSON ({exc}); use another --out") from None
            if old.get("schema") != SCHEMA:
                raise HetmemError(f"{self.path} is not a {SCHEMA} profile; use another --out")
            for k in resume_keys:
                if _norm(old.get(k)) != _norm(meta.get(k)):
                    raise HetmemError(f"{self.path} was made with a different {k} ({_short(old.get(k))}); "
                                      "use another --out to profile these settings")
            old_m = old.get("settings", {}).get("methods", {})
            for name, params in self.doc.get("settings", {}).get("methods", {}).items():
                if name in old_m and _norm(old_m[name]) != _norm(params):
                    raise HetmemError(f"{self.path} profiled {name} with other parameters ({_short(old_m[name])}); "
                                      "use another --out")
            self.doc["runs"] = old.get("runs", [])
            self.doc["records"] = old.get("records", [])
            # the union of lengths and methods profiled so far
            s_old, s_new = old.get("settings", {}), self.doc.get("settings", {})
            if s_old and s_new:
                s_new["lengths"] = sorted(set(s_old.get("lengths", [])) | set(s_new.get("lengths", [])))
                s_new["methods"] = {**s_old.get("methods", {}), **s_new.get("methods", {})}

    def done(self, method: str, length: int) -> bool:
        return any(r["method"] == method and r["length"] == length for r in self.doc["runs"])

    def add(self, run: dict, records: list[dict]) -> None:
        self.doc["runs"].append(run)
        self.doc["records"].extend(records)
        self.save()

    def save(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.doc["created"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        write_json_atomic(self.path, self.doc)


def _norm(v):
    return json.loads(json.dumps(v, sort_keys=True)) if v is not None else None


def _short(v) -> str:
    s = json.dumps(v)
    return s if len(s) < 60 else s[:57] + "..."
