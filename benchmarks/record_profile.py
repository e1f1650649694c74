"""Run ``hetmem profile`` (and ``hetmem plan`` on its output) and append the record the README's profile
and placement figures are generated from.

Default: the kernel sweep at the llama3-8b shape for dense and quest at 4k, 16k and 64k tokens, one torch
thread (steadier on a shared machine), then ``hetmem plan --system mi210+u55c --baseline-system mi210``
on that profile. Figures, per method and length, from profile.json's ``runs[]`` and ``records[]``
(all **measured**): decode ms per token, the memory-processing overhead (and with Apply), and each step's
decode ms per token; from plan.json (all **modelled**): each (method, length)'s best plan, its latency,
the all-GPU latency and the speedup. With ``--image PATH`` the profile's overhead.png is copied there
and its sha256 recorded (the README shows docs/img/profile-overhead-llama3-8b.png).

    .venv/bin/python benchmarks/record_profile.py [--lengths 4k,16k,64k] [--shape llama3-8b] [--threads 1]
                                                   [--image docs/img/profile-overhead-llama3-8b.png]

Appends its record to benchmarks/results/record_profile.jsonl (benchmarks/_record.py).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

from _record import ROOT, Record

STEPS = ("prepare", "relevancy", "retrieval", "apply", "apply.gather", "rest")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="dense,quest")
    ap.add_argument("--lengths", default="4k,16k,64k")
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--decode-tokens", type=int, default=4)
    ap.add_argument("--system", default="mi210+u55c", help="hetmem plan --system (empty: no plan)")
    ap.add_argument("--baseline-system", default="mi210")
    ap.add_argument("--image", default=None, help="copy overhead.png here (repository-relative path)")
    args = ap.parse_args()
    rec = Record().setting(**vars(args))

    from hetmem.cli import main as hetmem_main

    work = Path(tempfile.mkdtemp(prefix="hetmem-record-profile-"))
    prof_argv = ["profile", "--methods", args.methods, "--lengths", args.lengths, "--shape", args.shape,
                 "--threads", str(args.threads), "--decode-tokens", str(args.decode_tokens), "--out", str(work / "prof"),
                 "--no-progress"]
    code = hetmem_main(prof_argv)
    if code != 0:
        print(f"hetmem {' '.join(prof_argv)} failed (exit {code})", file=sys.stderr)
        return code
    prof = json.loads((work / "prof" / "profile.json").read_text())
    rec.setting(hetmem_profile_argv=[a if a != str(work / "prof") else "DIR" for a in prof_argv], profile_threads=prof["threads"],
                calibration={k: prof["calibration"].get(k) for k in ("copy_gbps", "matmul_gflops", "threads")})
    runs = []
    for run in prof["runs"]:
        key = f"{run['method']}@{run['length']}"
        if run["status"] != "ok":
            rec.detail(f"skipped.{key}", run.get("reason"))
            continue
        dec = run["phases"]["decode"]
        n = dec["tokens"]
        rec.figure(f"{key}.decode_ms_per_token", round(dec["ms_per_token"], 1), "ms/token")
        rec.figure(f"{key}.overhead", round(dec["overhead"], 4), "fraction",
                   note="(prepare + relevancy + retrieval + apply.gather) / decode time")
        rec.figure(f"{key}.overhead_incl_apply", round(dec["overhead_incl_apply"], 4), "fraction")
        for r in prof["records"]:
            if (r["method"], r["length"], r["phase"], r["status"]) == (run["method"], run["length"], "decode", "ok") \
                    and r["step"] in STEPS and r["ms"] is not None:
                rec.figure(f"{key}.{r['step']}.ms_per_token", round(r["ms"] / n, 2), "ms/token")
        runs.append(key)
    rec.detail("runs", runs)
    rec.detail("time_source", sorted({r["time_source"] for r in prof["records"] if r["status"] == "ok"}))

    if args.system:
        plan_argv = ["plan", "--profile", str(work / "prof" / "profile.json"), "--system", args.system,
                     "--baseline-system", args.baseline_system, "--out", str(work / "plan")]
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = hetmem_main(plan_argv)
        if code != 0:
            print(f"hetmem {' '.join(plan_argv)} failed (exit {code})", file=sys.stderr)
            return code
        plan = json.loads((work / "plan" / "plan.json").read_text())
        rec.detail("plan_table", buf.getvalue().rstrip("\n"))
        rec.detail("plan_command", f"hetmem plan --profile PROFILE --system {args.system} "
                                   f"--baseline-system {args.baseline_system} --out DIR")
        for e in plan["entries"]:
            key = f"plan.{e['method']}@{e['size']}"
            rec.figure(f"{key}.latency_us", round(e["best"]["latency_us"], 1), "us", source="modelled",
                       note=f"best plan {e['best_key']}")
            rec.figure(f"{key}.all_gpu_latency_us", round(e["all_gpu"]["latency_us"], 1), "us", source="modelled")
            rec.figure(f"{key}.speedup", round(e["speedup"], 3), "x", source="modelled")

    if args.image:
        dst = ROOT / args.image
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(work / "prof" / "overhead.png", dst)
        rec.detail("image", {"path": args.image, "sha256": hashlib.sha256(dst.read_bytes()).hexdigest()})
    rec.write(True)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
