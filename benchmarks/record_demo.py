"""Run ``hetmem demo --json`` and append its record: the README's demo table is generated from it.

The demo hides a 5-digit passkey in essay filler and asks for it with dense attention and with Quest at
a quarter of the context as budget (src/hetmem/cli/demo.py ``cmd_demo``). This wrapper runs it in this
process (so the torch thread count it sets is the one the demo ran with), keeps the demo's JSON object
whole in the record's details, and names its figures: per run, whether the answer was right, prefill
and decode wall time, and each step's decode time and calls. All times are measured.

    .venv/bin/python benchmarks/record_demo.py [--threads 1] [--seed 0] [-- extra hetmem demo options]

Appends its record to benchmarks/results/record_demo.jsonl (benchmarks/_record.py).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys

import torch
from _record import Record

STEPS = ("prepare", "relevancy", "retrieval", "apply")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    ap.add_argument("--seed", type=int, default=0, help="passkey seed (the demo's own default is random)")
    ap.add_argument("demo_args", nargs="*", help="more `hetmem demo` options, after --")
    args = ap.parse_args()
    rec = Record().setting(**vars(args))
    torch.set_num_threads(args.threads)

    from hetmem.cli import main as hetmem_main

    argv = ["demo", "--json", "--seed", str(args.seed), *args.demo_args]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = hetmem_main(argv)
    text = buf.getvalue().strip()
    if code not in (0, 1) or not text:
        print(f"hetmem {' '.join(argv)} failed (exit {code})", file=sys.stderr)
        return code or 1
    demo = json.loads(text.splitlines()[-1])
    rec.setting(hetmem_argv=argv, model_name=demo["model"])
    task = demo["task"]
    rec.figure("prompt_tokens", next(iter(demo["runs"].values()))["tokens"]["prompt"], "tokens")
    for label, run in demo["runs"].items():
        key = run["method"]
        rec.figure(f"{key}.correct", int(run["correct"]), "bool", note=f"{label}: passkey {task['passkey']} in the answer")
        rec.figure(f"{key}.prefill_ms", round(run["prefill_ms"], 1), "ms")
        rec.figure(f"{key}.decode_ms", round(run["decode_ms"], 1), "ms")
        rec.figure(f"{key}.generated_tokens", run["tokens"]["generated"], "tokens")
        for s in STEPS:
            st = run["steps"][s]
            rec.figure(f"{key}.{s}.decode_ms", round(st["phases"].get("decode", {}).get("ms", 0.0), 1), "ms")
            rec.figure(f"{key}.{s}.decode_calls", st["phases"].get("decode", {}).get("calls", 0), "calls")
    rec.detail("demo", demo)
    rec.write(demo["correct"])
    print(json.dumps({label: {"answer": r["answer"], "correct": r["correct"]} for label, r in demo["runs"].items()}))
    return code


if __name__ == "__main__":
    sys.exit(main())
