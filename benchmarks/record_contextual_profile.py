"""Profile the contextual-memory methods (memagent, hmt, lact) with ``hetmem profile`` and plan them with
``hetmem plan``; append the record docs/methods.md's method x step figures are generated from.

One real-model profile (``--model``, default smollm2) at one context length: each method runs whole over the
first LENGTH tokens of the packaged essays (phase ``context``, profiling/contextual.py); lact's fast-weight
layer runs on synthetic (k, v, q) at the model's shape, one layer timed and scaled. Figures per method and
step (**measured** times, **analytic** flops and bytes): ms, calls, GFLOP, flop/byte; per method the
memory-processing overhead. From plan.json (**modelled**): each method's best placement and its speedup
over the all-GPU plan.

    .venv/bin/python benchmarks/record_contextual_profile.py [--model smollm2] [--lengths 2k] [--threads 1]

Appends its record to benchmarks/results/record_contextual_profile.jsonl (benchmarks/_record.py).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

from _record import Record

STEPS = ("prepare", "relevancy", "retrieval", "apply", "rest", "total")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="memagent,hmt,lact")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--lengths", default="2k")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--decode-tokens", type=int, default=4, help="answer tokens (memagent, hmt)")
    ap.add_argument("--system", default="mi210+u55c")
    ap.add_argument("--baseline-system", default="mi210")
    ap.add_argument("--profile-dir", default=None,
                    help="record an existing `hetmem profile` output DIR made with these settings instead of running it "
                         "again (said in the record)")
    args = ap.parse_args()
    rec = Record().setting(**vars(args))
    import torch

    torch.set_num_threads(args.threads)  # the record's provenance names this process's threads

    from hetmem.cli import main as hetmem_main

    work = Path(tempfile.mkdtemp(prefix="hetmem-record-ctx-profile-"))
    prof_dir = Path(args.profile_dir) if args.profile_dir else work / "prof"
    prof_argv = ["profile", "--methods", args.methods, "--lengths", args.lengths, "--model", args.model,
                 "--threads", str(args.threads), "--decode-tokens", str(args.decode_tokens), "--out", str(prof_dir),
                 "--no-progress"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = hetmem_main(prof_argv)  # with --profile-dir: resumes it (every run done: nothing runs again)
    if code != 0:
        print(f"hetmem {' '.join(prof_argv)} failed (exit {code})", file=sys.stderr)
        return code
    prof = json.loads((prof_dir / "profile.json").read_text())
    if args.profile_dir:
        rec.setting(profile_created=prof.get("created"), profile_reused=True)
    rec.setting(hetmem_profile_argv=[a if a != str(prof_dir) else "DIR" for a in prof_argv],
                model_name=prof["model"], dtype=prof["dtype"])
    runs = []
    for run in prof["runs"]:
        key = f"{run['method']}@{run['length']}"
        if run["status"] != "ok":
            rec.detail(f"skipped.{key}", run.get("reason"))
            continue
        ph = run["phases"]["context"]
        rec.figure(f"{key}.total_ms", round(ph["total_ms"], 1), "ms")
        rec.figure(f"{key}.overhead", round(ph["overhead"], 4), "fraction",
                   note="(prepare + relevancy + retrieval) / end-to-end: " + ph.get("memory_processing", ""))
        rec.figure(f"{key}.overhead_incl_apply", round(ph["overhead_incl_apply"], 4), "fraction")
        rec.figure(f"{key}.context_tokens", ph["tokens"], "tokens")
        for k in ("llm_calls", "tokens_written"):
            if k in ph:
                rec.figure(f"{key}.{k}", ph[k], "calls" if k == "llm_calls" else "tokens")
        for r in prof["records"]:
            if (r["method"], r["length"], r["phase"], r["status"]) != (run["method"], run["length"], "context", "ok"):
                continue
            if r["step"] not in STEPS or r["ms"] is None:
                continue
            rec.figure(f"{key}.{r['step']}.ms", round(r["ms"], 1), "ms", note=r["time_source"])
            rec.figure(f"{key}.{r['step']}.calls", r["calls"], "calls")
            if r["flops"] is not None:
                rec.figure(f"{key}.{r['step']}.gflop", round(r["flops"] / 1e9, 4), "GFLOP", source="modelled", note="analytic count")
            if r["intensity"] is not None:
                rec.figure(f"{key}.{r['step']}.intensity", round(r["intensity"], 3), "flop/byte", source="modelled", note="analytic count")
        rec.detail(f"notes.{key}", ph.get("note"))
        runs.append(key)
    rec.detail("runs", runs)
    rec.detail("profile_table", buf.getvalue().rstrip("\n"))

    plan_argv = ["plan", "--profile", str(prof_dir / "profile.json"), "--system", args.system,
                 "--baseline-system", args.baseline_system, "--out", str(work / "plan")]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = hetmem_main(plan_argv)
    if code != 0:
        print(f"hetmem {' '.join(plan_argv)} failed (exit {code})", file=sys.stderr)
        return code
    plan = json.loads((work / "plan" / "plan.json").read_text())
    rec.detail("plan_command", f"hetmem plan --profile PROFILE --system {args.system} "
                               f"--baseline-system {args.baseline_system} --out DIR")
    for e in plan["entries"]:
        key = f"plan.{e['method']}@{e['size']}"
        rec.figure(f"{key}.latency_us", round(e["best"]["latency_us"], 3), "us", source="modelled",
                   note=f"best plan {e['best_key']} ({e['unit']})")
        rec.figure(f"{key}.speedup", round(e["speedup"], 3), "x", source="modelled")
        rec.detail(f"{key}.best", e["best_key"])
    rec.write(len(runs) == len(prof["runs"]))
    print(buf.getvalue())
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
